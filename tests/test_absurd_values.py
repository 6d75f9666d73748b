"""Issue 30, bug 4: an absurd option value ends `vae-ext` with one line naming the option.

A float that overflows float32 (or Adam's float32 step), an integer beyond 64 bits, a model beyond
memory, a size the allocator refuses: each used to end in a traceback from deep inside PyTorch, and
`--hidden 20000000` in the OOM killer. Usage errors (the parser's) exit with 2, the rest with 1;
nothing is written. The memory checks run under a fixed VAE_EXT_MEMORY_LIMIT, so that they do not
depend on this machine's memory, and nothing here allocates the sizes it names.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vae_ext
from vae_ext.cli.config import TrainConfig
from vae_ext.cli.errors import ConfigError

from helpers import assert_one_line_error, read_csv, run_cli, train_one_epoch

PKG_ROOT = Path(vae_ext.__file__).resolve().parents[1]
TINY = ["--hidden", "8", "--latent", "2", "--batch-size", "256", "--no-progress"]
BIG = "99999999999999999999"  # beyond 64 bits

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_one_epoch(tmp_path_factory.mktemp("absurd") / "run", *TINY)


@pytest.mark.parametrize("argv,match", [
    (["train", "--lr", "4e37"], "argument --lr: expected at most 3.4e+37"),
    (["train", "--lr", "4e37", "--skip-nonfinite", "3"], "argument --lr: expected at most 3.4e+37"),
    (["train", "--lr", "1e39"], "argument --lr"),
    (["train", "--beta", "1e39"], "argument --beta: expected at most 3.4e+38"),
    (["train", "--free-bits", "1e39"], "argument --free-bits: expected at most 3.4e+38"),
    (["train", "--seed", "18446744073709551615"], "argument --seed: expected at most 2^63 - 1"),
    (["eval", "{run}", "--seed", "18446744073709551615"], "argument --seed: expected at most 2^63 - 1"),
    (["train", "--latent", BIG], "argument --latent: expected at most 2^63 - 1"),
    (["train", "--hidden", BIG], "argument --hidden: expected sizes below 2^63"),
    (["train", "--arch", "conv", "--channels", BIG], "argument --channels: expected sizes below 2^63"),
    (["train", "--batch-size", BIG], "argument --batch-size"),
    (["train", "--epochs", BIG], "argument --epochs"),
    (["train", "--threads", "100000"], "argument --threads: expected at most 1,024"),
    (["eval", "{run}", "--threads", BIG], "argument --threads"),
    (["eval", "{run}", "--k", BIG], "argument --k"),
    (["eval", "{run}", "--batch-size", BIG], "argument --batch-size"),
    (["sweep", "--latent", "2,2"], "argument --latent: each latent size once: 2"),
    (["sweep", "--latent", f"2,{BIG}"], "argument --latent"),
])
def test_an_absurd_value_is_a_usage_error(capsys, tmp_path, trained, argv, match):
    argv = [a.format(run=trained) for a in argv]
    rc, _, err = run_cli(capsys, *argv, *(["--out", tmp_path / "r"] if argv[0] != "eval" else []))
    assert_one_line_error(rc, err, match, status=2)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,match", [
    (["--latent", "3000000000"], "--arch mlp --hidden 400 --latent 3000000000 --batch-size 128: training this "
                                 "model (3,606,000,052,064 parameters) would need about"),
    (["--hidden", "20000000"], "--hidden 20000000 --latent 20"),
    (["--arch", "conv", "--channels", "100000"], "--channels 100000"),
    (["--latent", str(2**63 - 1)], "the model is too large to build"),
    (["--arch", "conv", "--channels", str(2**63 - 1)], "--channels 9223372036854775807: the model is too large"),
])
def test_a_model_beyond_memory_is_refused_before_it_is_built(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.setenv("VAE_EXT_MEMORY_LIMIT", "1G")
    rc, _, err = run_cli(capsys, "train", *argv, "--epochs", "1", "--no-progress", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, match)
    assert not (tmp_path / "r").exists()


def test_the_memory_check_counts_the_batch(capsys, tmp_path, monkeypatch):
    """A model that fits, with a batch whose activations do not: the message names --batch-size."""
    monkeypatch.setenv("VAE_EXT_MEMORY_LIMIT", "24M")
    argv = ["train", "--hidden", "4000", "--epochs", "1", "--no-progress"]
    rc, _, err = run_cli(capsys, *argv, "--batch-size", "1000", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "--hidden 4000 --latent 20 --batch-size 1000: training this model")
    assert run_cli(capsys, *argv, "--batch-size", "8", "--out", tmp_path / "r")[0] == 0


def test_hidden_20000000_is_refused_not_killed(tmp_path):
    """The run that the OOM killer ended: in a subprocess whose address space is capped at 4 GiB, so
    that even a regression cannot take the machine's memory."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VAE_EXT_MEMORY_LIMIT": "2G",
           "PYTHONPATH": str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    p = subprocess.run([sys.executable, "-m", "vae_ext", "train", "--hidden", "20000000", "--epochs", "1",
                        "--no-progress", "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env,
                       timeout=300, cwd=tmp_path, preexec_fn=cap)
    assert_one_line_error(p.returncode, p.stderr, "--hidden 20000000", "would need about")
    assert not (tmp_path / "r").exists()


def _allocator_refuses(monkeypatch):
    """No memory limit can be known, and the allocator refuses the model, as it does for --latent 3e9."""
    import vae_ext.cli.train as T

    monkeypatch.setattr(T, "check_fits", lambda *a, **k: None)
    real = T.VAE

    def vae(**kw):
        if torch.empty(0).device.type == "meta":
            return real(**kw)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4800000000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(T, "VAE", vae)


def test_the_allocators_refusal_names_the_options(capsys, tmp_path, monkeypatch):
    _allocator_refuses(monkeypatch)
    rc, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "--arch mlp --hidden 8 --latent 2: out of memory building the model "
                          "(DefaultCPUAllocator: can't allocate memory")


def test_out_of_memory_later_is_one_line(capsys, tmp_path, monkeypatch):
    """A refusal the model's check did not foresee (a step's allocation; CUDA's OutOfMemoryError)."""
    import vae_ext.cli.train as T

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(T, "_loss_and_gradients", oom)
    rc, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)", "--batch-size")


@pytest.mark.parametrize("field,value,match", [
    ("lr", 4e37, "--lr: expected at most 3.4e+37 (Adam's first step"),
    ("beta", 1e39, "--beta: expected at most 3.4e+38"),
    ("free_bits", 1e39, "--free-bits: expected at most 3.4e+38"),
    ("seed", 2**64 - 1, "--seed: expected at most 2^63 - 1"),
    ("latent", 10**20, "--latent: expected at most 2^63 - 1"),
    ("epochs", 10**20, "--epochs"),
    ("hidden", [10**20], "--hidden: expected sizes below 2^63"),
])
def test_train_config_refuses_them_too(field, value, match):
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    assert match in str(e.value)


def test_the_largest_values_accepted_work(capsys, tmp_path):
    """The bounds are not too tight: the largest seed and lr run (an lr this large diverges, in one line)."""
    rc, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--seed", str(2**63 - 1), "--out", tmp_path / "a")
    assert rc == 0, err
    assert len(read_csv(tmp_path / "a" / "metrics.csv")) == 1
    rc, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--lr", "3.4e37", "--out", tmp_path / "b")
    assert_one_line_error(rc, err, "training diverged")
