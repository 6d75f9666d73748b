"""Reliability of `vae-ext train` (issue 16, items 4-7): SIGKILL at random moments and resume, one
writer per run folder, bit-for-bit reproducibility across thread counts, and --skip-nonfinite."""
from __future__ import annotations

import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vae_ext
from vae_ext.cli.checkpoint import load_checkpoint
from vae_ext.cli.runlock import RunLock

from helpers import assert_one_line_error, read_csv, run_cli

PKG_ROOT = Path(vae_ext.__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--latent", "2", "--batch-size", "256", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")





def assert_finite_checkpoint(out, epoch):
    ck = load_checkpoint(out)
    assert ck["epoch"] == epoch
    assert all(torch.isfinite(v).all() for v in ck["model_state"].values())
    return ck


def start_train(out, *extra, epochs=1000):
    """`python -m vae_ext train` in a subprocess; returns once it printed 'training on' (it runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "vae_ext", "train", "--epochs", str(epochs), "--out", str(out),
                          *TINY, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         cwd=out.parent)
    for line in p.stdout:
        if line.startswith("training on"):
            return p
    p.wait(timeout=60)
    raise AssertionError(f"the run ended before training (status {p.returncode}): {p.stderr.read()}")


# --------------------------------------------------------------------------- 4: crash safety


def test_sigkill_at_random_moments_then_resume(tmp_path):
    """Killed (SIGKILL: no handler runs) three times at seeded random moments, resumed each time."""
    rng = random.Random(16)
    out = tmp_path / "run"
    epochs = 8
    for _ in range(3):
        resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
        p = start_train(out, "--plot-every", "2", *resume, epochs=epochs)
        time.sleep(rng.uniform(0.0, 1.2))
        p.kill()
        p.communicate(timeout=60)
        if (out / "checkpoint.pt").exists():  # whatever the moment, what is there is complete
            ck = assert_finite_checkpoint(out, load_checkpoint(out)["epoch"])
            assert [r["epoch"] for r in read_csv(out / "metrics.csv")][-1] in (str(ck["epoch"]), str(ck["epoch"] + 1))
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else []
    p = start_train(out, *resume, epochs=epochs)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert [r["epoch"] for r in read_csv(out / "metrics.csv")] == [str(e) for e in range(1, epochs + 1)]
    assert_finite_checkpoint(out, epochs)
    assert not [q.name for q in out.iterdir() if q.name.endswith(".tmp")]


# --------------------------------------------------------------------------- 5: one writer per folder


def test_a_second_writer_is_refused_with_the_holders_pid(capsys, tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--epochs", "1", "--out", out, *TINY)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fresh = tmp_path / "fresh"  # a run that has not finished its first epoch yet
    with RunLock(out), RunLock(fresh):  # as running `vae-ext train`s hold them
        for folder, argv in ((out, ["train", "--resume", out, "--epochs", "2", "--no-progress"]),
                             (fresh, ["train", "--out", fresh, *TINY]),
                             (out, ["sweep", "--latent", "1", "--epochs", "1", "--k", "2", "--out", out, *TINY[:2],
                                    "--no-progress"])):
            rc, _, err = run_cli(capsys, *argv)
            assert_one_line_error(rc, err, str(folder), f"pid {os.getpid()}", "in use by another vae-ext run")
    assert [p.name for p in fresh.iterdir()] == [".vae-ext.lock"]
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    files = lambda d: {k: v for k, v in d.items() if k != ".vae-ext.lock"}  # noqa: E731
    assert files(after) == files(before)
    assert run_cli(capsys, "train", "--resume", out, "--epochs", "2", "--no-progress")[0] == 0  # released


def test_a_killed_run_leaves_no_stuck_lock(capsys, tmp_path):
    """A real run holds the folder (a second one is refused, naming its pid); SIGKILL frees it."""
    out = tmp_path / "run"
    first = start_train(out)
    try:
        while not (out / "checkpoint.pt").exists():
            time.sleep(0.05)
        rc, _, err = run_cli(capsys, "train", "--resume", out, "--no-progress")
        assert_one_line_error(rc, err, str(out), f"pid {first.pid}")
    finally:
        first.kill()
        first.communicate(timeout=60)
    rc, stdout, err = run_cli(capsys, "train", "--resume", out, "--epochs", str(load_checkpoint(out)["epoch"] + 1),
                          "--no-progress")
    assert rc == 0, err


def test_the_lock_is_refused_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(vae_ext.cli.errors.ConfigError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


# --------------------------------------------------------------------------- 6: reproducible to the bit


def test_same_seed_same_bits_with_one_or_two_threads(capsys, tmp_path):
    """Identical metrics.csv (but for `seconds`, wall-clock time) and weights, --threads 1 vs 2."""
    argv = ["train", "--epochs", "2", "--hidden", "64", "--latent", "4", "--batch-size", "512", "--warmup", "1",
            "--seed", "3", "--no-progress"]
    for threads in (1, 2):
        assert run_cli(capsys, *argv, "--threads", threads, "--out", tmp_path / f"t{threads}")[0] == 0
    a, b = read_csv(tmp_path / "t1" / "metrics.csv"), read_csv(tmp_path / "t2" / "metrics.csv")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a) == strip(b) and len(a) == 2
    sa, sb = load_checkpoint(tmp_path / "t1")["model_state"], load_checkpoint(tmp_path / "t2")["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- 7: --skip-nonfinite


def _poison_gradients(monkeypatch, calls):
    """Make the gradients of the given (1-based) training steps NaN, as an overflow would."""
    import vae_ext.cli.train as T

    real, n = T._loss_and_gradients, {"step": 0}

    def poisoned(net, model, *a, **k):
        terms = real(net, model, *a, **k)
        n["step"] += 1
        if n["step"] in calls:
            next(model.parameters()).grad.fill_(math.nan)
        return terms

    monkeypatch.setattr(T, "_loss_and_gradients", poisoned)


def test_skip_nonfinite_skips_and_counts(capsys, tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, {2, 3, 8})  # 6 steps per epoch: two in epoch 1, one in epoch 2
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--epochs", "2", "--skip-nonfinite", "3", "--out", out, *TINY)
    assert rc == 0, err
    rows = read_csv(out / "metrics.csv")
    assert [r["skipped"] for r in rows] == ["2", "1"] and [r["step"] for r in rows] == ["6", "12"]
    assert all(math.isfinite(float(r["train_nelbo"])) for r in rows)
    assert_finite_checkpoint(out, 2)


def test_skip_nonfinite_stops_after_n_in_a_row(capsys, tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, {8, 9})
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--epochs", "3", "--skip-nonfinite", "2", "--out", out, *TINY)
    assert_one_line_error(rc, err, "2 steps in a row with a non-finite loss or gradient", "epoch 2")
    assert_finite_checkpoint(out, 1)


def test_without_the_option_no_checkpoint_holds_a_nonfinite_weight(capsys, tmp_path, monkeypatch):
    """A step that leaves a NaN weight at the end of epoch 2 (its loss was still finite): the run stops
    with one line and the checkpoint keeps epoch 1, finite."""
    import vae_ext.cli.train as T

    real, n = T.train_step, {"step": 0}

    def step(net, model, *a, **k):
        terms = real(net, model, *a, **k)
        n["step"] += 1
        if n["step"] == 12:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)
        return terms

    monkeypatch.setattr(T, "train_step", step)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--epochs", "3", "--out", out, *TINY)
    assert_one_line_error(rc, err, "training diverged")
    assert_finite_checkpoint(out, 1)
    assert len(read_csv(out / "metrics.csv")) == 1
