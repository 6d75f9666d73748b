"""Reliability of `vae-ext train` (issue 16, items 4-7): SIGKILL at random moments and resume, one
writer per run folder (locked before it is read: issue 30), bit-for-bit reproducibility at a fixed
thread count, and --skip-nonfinite."""
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


def _held(folder) -> bool:
    """Whether a RunLock holds ``folder`` now (two open files of one process conflict too)."""
    try:
        RunLock(folder).acquire().release()
    except vae_ext.cli.errors.ConfigError:
        return True
    return False


def test_the_run_folder_is_locked_before_its_checkpoint_is_read(capsys, tmp_path, monkeypatch):
    """Issue 30, bug 3: every way of resuming (and a sweep that resumes its models) reads the
    checkpoint holding the lock of the folder it will write."""
    import vae_ext.cli.checkpoint as C
    import vae_ext.cli.sweep as S

    out, sweep = tmp_path / "run", tmp_path / "sweep"
    assert run_cli(capsys, "train", "--epochs", "1", "--out", out, *TINY)[0] == 0
    sweep_argv = ["sweep", "--latent", "1", "--k", "2", "--out", sweep, *TINY[:2], "--no-progress"]
    assert run_cli(capsys, *sweep_argv, "--epochs", "1")[0] == 0
    held = []

    def spy(real):
        def read(path):
            held.append(_held(path if Path(path).is_dir() else Path(path).parent))
            return real(path)
        return read

    monkeypatch.setattr(C, "load_checkpoint", spy(C.load_checkpoint))
    monkeypatch.setattr(S, "load_checkpoint", spy(S.load_checkpoint))
    for epochs, argv in enumerate((["--resume", out], ["--resume", "--out", out], ["--resume", out / "checkpoint.pt"]),
                                  start=2):
        assert run_cli(capsys, "train", *argv, "--epochs", epochs, "--no-progress")[0] == 0
    assert run_cli(capsys, *sweep_argv, "--epochs", "2")[0] == 0
    assert held == [True] * 4 and load_checkpoint(out)["epoch"] == 4
    assert load_checkpoint(sweep / "latent-1")["epoch"] == 2


def test_a_concurrent_resume_cannot_overwrite_a_newer_epoch(capsys, tmp_path, monkeypatch):
    """Issue 30, bug 3, as it happened: run B reads epoch 2 (slowly: a big checkpoint, a slow disk);
    meanwhile run A resumes the folder, writes epoch 3 and ends; B then rewrote epoch 3 from its
    stale state, and both ended with status 0. Now A is refused while B holds the folder."""
    import vae_ext.cli.checkpoint as C
    from vae_ext import cli

    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--epochs", "2", "--out", out, *TINY)[0] == 0
    real, other = C.load_checkpoint, {}

    def slow_read(path):
        ckpt = real(path)
        if not other:  # B has read epoch 2; A runs now, before B goes on
            other["status"] = None  # (A's own read goes straight through)
            other["status"] = cli.main(["train", "--resume", str(out), "--epochs", "3", "--no-progress"])
        return ckpt

    monkeypatch.setattr(C, "load_checkpoint", slow_read)
    status = cli.main(["train", "--resume", str(out), "--epochs", "3", "--no-progress"])
    err = capsys.readouterr().err
    assert [other["status"], status] == [1, 0], err
    assert "in use by another vae-ext run" in err and f"pid {os.getpid()}" in err
    assert len(read_csv(out / "metrics.csv")) == 3 and load_checkpoint(out)["epoch"] == 3


def test_train_refuses_a_checkpoint_replaced_after_it_was_read(capsys, tmp_path):
    """The library's train(cfg, checkpoint) locks only once it has the checkpoint: it refuses one
    that another run replaced in between, rather than overwrite the newer epochs."""
    from vae_ext.cli.checkpoint import resume_config
    from vae_ext.cli.train import train

    out = tmp_path / "run"
    assert run_cli(capsys, "train", "--epochs", "1", "--out", out, *TINY)[0] == 0
    stale = load_checkpoint(out)
    assert run_cli(capsys, "train", "--resume", out, "--epochs", "2", "--no-progress")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".vae-ext.lock"}
    with pytest.raises(vae_ext.cli.errors.CheckpointError, match=r"was replaced by another run after this one read it "
                       r"\(at epoch 1\); run the command again"):
        train(resume_config(stale, {"epochs": 3, "progress": False}), stale, log=lambda *a: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".vae-ext.lock"} == before
    fresh = load_checkpoint(out)  # read now, it resumes
    assert train(resume_config(fresh, {"epochs": 3, "progress": False}), fresh, log=lambda *a: None).history[-1][
        "epoch"] == 3


def test_every_rank_must_have_read_the_same_checkpoint(tmp_path):
    """Under torchrun rank 0 reads holding the lock, another rank perhaps just before a replacement."""
    from vae_ext.cli.distributed import DistributedContext
    from vae_ext.cli.train import _same_checkpoint_on_every_rank

    rows = [{"epoch": 1, "seconds": 0.5}, {"epoch": 2, "seconds": 0.6}]

    class OtherRank(DistributedContext):  # rank 1 of 2, whose rank 0 read epoch 2
        def broadcast_object(self, obj):
            return repr((2, rows[1]))

        def all_reduce_sum(self, t):
            return t

    ckpt = {"path": str(tmp_path / "checkpoint.pt"), "epoch": 1, "history": rows[:1]}
    with pytest.raises(vae_ext.cli.errors.CheckpointError, match="was replaced by another run"):
        _same_checkpoint_on_every_rank(OtherRank(rank=1, world_size=2), ckpt)
    _same_checkpoint_on_every_rank(OtherRank(rank=1, world_size=2), {**ckpt, "epoch": 2, "history": rows})


def test_the_lock_is_refused_within_one_process_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(vae_ext.cli.errors.ConfigError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit
        pass


# --------------------------------------------------------------------------- 6: reproducible to the bit


def test_a_run_repeated_at_a_fixed_thread_count_gives_the_same_bits(capsys, tmp_path):
    """Identical metrics.csv (but for `seconds`, wall-clock time) and weights, the same command twice
    on 2 threads: what the README promises. (Not across thread counts: the fused ops give the same
    bits on any, tests/test_loss_numerics.py, but PyTorch's matrix multiplies need not.)"""
    argv = ["train", "--epochs", "2", "--hidden", "64", "--latent", "4", "--batch-size", "512", "--warmup", "1",
            "--seed", "3", "--threads", "2", "--no-progress"]
    for run in ("t1", "t2"):
        assert run_cli(capsys, *argv, "--out", tmp_path / run)[0] == 0
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
