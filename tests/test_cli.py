"""The vae-ext command: train / resume / eval / sweep on tiny digits models, and every error path.

Most tests call ``vae_ext.cli.main(argv)`` in-process (fast, output via capsys); one runs
``python -m vae_ext`` in a subprocess to check the real entry point.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import vae_ext
from vae_ext.cli._interrupts import raise_interrupt
from vae_ext.cli.checkpoint import load_checkpoint
from vae_ext.cli.runfiles import atomic_write

from helpers import assert_one_line_error, read_csv, run_cli, train_one_epoch

# Subprocesses import the vae_ext this process imported (the repo with an in-place build, or the
# installed package when the tests run against `pip install .`), and run outside the repo so that
# its unbuilt source tree cannot shadow the installed one.
PKG_ROOT = Path(vae_ext.__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--latent", "2", "--batch-size", "256", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 1-epoch digits run shared by the eval and error tests."""
    return train_one_epoch(tmp_path_factory.mktemp("cli") / "run", *TINY)



# --------------------------------------------------------------------------- train, resume


def test_train_one_epoch_writes_everything(capsys, tmp_path):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(capsys, "train", "--epochs", "1", "--out", out, *TINY)
    assert rc == 0
    assert "epoch   1/1" in stdout and "test -ELBO" in stdout and "nats/image" in stdout
    for name in ("checkpoint.pt", "metrics.csv", "reconstructions.png", "samples.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    rows = read_csv(out / "metrics.csv")
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    assert float(rows[0]["test_nelbo"]) > 0 and math.isfinite(float(rows[0]["train_nelbo"]))
    ck = load_checkpoint(out)
    assert ck["epoch"] == 1 and ck["config"]["latent"] == 2 and ck["model_config"]["hidden_sizes"] == [16]
    assert set(ck) >= {"model_state", "optimizer_state", "config", "epoch", "history"}


class _Terminal:
    """A stderr that says it is a terminal (tqdm draws its bar only on one)."""

    def __init__(self, stream):
        self.stream = stream

    def isatty(self):
        return True

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.mark.parametrize("tty", [False, True], ids=["redirected", "terminal"])
def test_progress_bar_only_on_a_terminal(capsys, monkeypatch, tmp_path, tty):
    """A redirected stderr (a log file, CI) gets no \\r frames of the bar; a terminal gets the bar.
    The last line names every file it wrote by its path in the run folder."""
    if tty:
        monkeypatch.setattr(sys, "stderr", _Terminal(sys.stderr))
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "train", "--epochs", "1", "--out", out,
                              *[a for a in TINY if a != "--no-progress"])
    assert rc == 0
    assert ("\r" in err) == tty, err[:500]
    names = ("checkpoint.pt", "metrics.csv", "reconstructions.png", "samples.png", "loss_curves.png")
    assert stdout.splitlines()[-1] == "wrote " + ", ".join(str(out / n) for n in names)


def test_resume_continues_exactly(capsys, tmp_path):
    """1 epoch + resume to 2 gives the same weights as 2 epochs straight: each epoch's randomness
    depends on (seed, epoch) only, and the checkpoint holds the optimizer state."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli(capsys, "train", "--epochs", "2", "--out", a, "--warmup", "1.5", *TINY)[0] == 0
    assert run_cli(capsys, "train", "--epochs", "1", "--out", b, "--warmup", "1.5", *TINY)[0] == 0
    rc, stdout, _ = run_cli(capsys, "train", "--resume", b, "--epochs", "2", "--no-progress")
    assert rc == 0 and "resuming after epoch 1" in stdout and "epoch   2/2" in stdout
    sa, sb = load_checkpoint(a)["model_state"], load_checkpoint(b)["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ra, rb = read_csv(a / "metrics.csv"), read_csv(b / "metrics.csv")
    assert len(rb) == 2 and [r["test_nelbo"] for r in ra] == [r["test_nelbo"] for r in rb]
    assert float(ra[0]["beta"]) < 1.0 and float(ra[1]["beta"]) == 1.0  # the KL warm-up
    # --resume with --out: the folder is found from --out
    rc, stdout, _ = run_cli(capsys, "train", "--resume", "--out", b, "--epochs", "2", "--no-progress")
    assert rc == 0 and "nothing to do" in stdout


def test_interrupted_training_keeps_the_last_complete_checkpoint(capsys, tmp_path, monkeypatch):
    import vae_ext.cli.train as T

    calls = {"n": 0}
    real = T.train_step

    def step(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # in epoch 2 (6 steps per epoch at batch 256)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "train_step", step)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--epochs", "3", "--out", out, *TINY)
    assert_one_line_error(rc, err, "interrupted", status=None)
    assert rc == 130
    assert load_checkpoint(out)["epoch"] == 1 and len(read_csv(out / "metrics.csv")) == 1
    monkeypatch.setattr(T, "train_step", real)
    assert run_cli(capsys, "train", "--resume", out, "--no-progress")[0] == 0
    assert load_checkpoint(out)["epoch"] == 3


def test_interrupt_during_atomic_write_waits_for_the_file(tmp_path):
    """A signal mid-write (the CLI's handlers call raise_interrupt) is raised once the file is in place."""
    p = tmp_path / "f.txt"

    def write(f):
        f.write("first ")
        raise_interrupt(KeyboardInterrupt())  # what the SIGINT / SIGTERM handler does
        f.write("second\n")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, write, mode="w")
    assert p.read_text() == "first second\n"
    assert not [q for q in tmp_path.iterdir() if q.name.endswith(".tmp")]
    with pytest.raises(KeyboardInterrupt):  # outside a write it is raised at once
        raise_interrupt(KeyboardInterrupt())
    atomic_write(p, lambda f: f.write("x"), mode="w")  # nothing left pending
    assert p.read_text() == "x"


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("old, complete\n")

    def half(f):
        f.write("new, but only ha")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(p, half, mode="w")
    assert p.read_text() == "old, complete\n"
    assert list(tmp_path.iterdir()) == [p]  # no temporary left behind
    atomic_write(p, lambda f: f.write("new\n"), mode="w")
    assert p.read_text() == "new\n"


def test_a_failed_write_names_the_file(tmp_path):
    """A full disk fails write or fsync with no file name: the error names the file being written."""
    import errno

    def full(f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as info:
        atomic_write(tmp_path / "checkpoint.pt", full)
    assert info.value.errno == errno.ENOSPC and "checkpoint.pt" in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- eval, sweep


def test_eval(capsys, trained):
    rc, stdout, _ = run_cli(capsys, "eval", trained, "--k", "20", "--no-progress")
    assert rc == 0 and "test negative ELBO" in stdout and "NLL, k=20" in stdout
    rc, stdout, _ = run_cli(capsys, "eval", trained / "checkpoint.pt", "--k", "50", "--json", "--no-progress")
    r = json.loads(stdout)
    assert r["k"] == 50 and r["n"] == 359 and r["split"] == "test" and r["kernels"] == "fused"
    assert 0 < r["nll"] < r["nelbo"] + 1.0  # the IW bound is at least as tight as the ELBO, up to noise
    rows = read_csv(trained / "metrics.csv")
    assert r["nelbo"] == pytest.approx(float(rows[-1]["test_nelbo"]), rel=1e-5)  # same fixed eval eps
    rc, stdout, _ = run_cli(capsys, "eval", trained, "--k", "5", "--json", "--reference", "--split", "train",
                        "--no-progress")
    r = json.loads(stdout)
    assert rc == 0 and r["kernels"] == "reference" and r["n"] == 1438


def _strict_json(text):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_eval_json_of_one_image_is_strict_and_says_why(capsys, trained):
    """Issue 30, bug 6: one test image gave "nll_sem": NaN and a raw std() UserWarning on stderr."""
    argv = ["eval", trained, "--k", "4", "--data", "digits", "--train-split", "1796", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would end the command with a traceback
        rc, stdout, err = run_cli(capsys, *argv, "--json")
        assert rc == 0 and err == "", err
        r = _strict_json(stdout)
        assert r["n"] == 1 and r["nll_sem"] is None and math.isfinite(r["nll"]) and math.isfinite(r["nelbo"])
        assert r["notes"] == {"nll_sem": "undefined: a standard error needs 2 images or more; the test set has 1"}
        rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0 and err == "" and "note: nll_sem: undefined: a standard error needs 2 images" in stdout


def test_eval_json_of_a_diverged_checkpoint_is_strict_and_says_why(capsys, tmp_path, trained):
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=True)
    next(iter(ckpt["model_state"].values())).view(-1)[0] = math.nan
    (tmp_path / "bad").mkdir()
    torch.save(ckpt, tmp_path / "bad" / "checkpoint.pt")
    rc, stdout, err = run_cli(capsys, "eval", tmp_path / "bad", "--k", "4", "--json", "--no-progress")
    r = _strict_json(stdout)
    assert rc == 0 and err == "" and r["nelbo"] is None and r["nll"] is None and r["nll_sem"] is None
    assert r["notes"]["nelbo"] == "NaN: the checkpoint's weights are not all finite"
    assert set(r["notes"]) == {"nelbo", "nll", "nll_sem"}
    rc, stdout, _ = run_cli(capsys, "eval", trained, "--k", "4", "--json", "--no-progress")
    assert _strict_json(stdout)["notes"] == {}  # and none for a good one


def test_sweep_two_latents(capsys, tmp_path):
    out = tmp_path / "sweep"
    rc, stdout, _ = run_cli(capsys, "sweep", "--latent", "1,2", "--epochs", "1", "--k", "4", "--out", out,
                        "--hidden", "8", "--batch-size", "256", "--no-progress")
    assert rc == 0 and "latent 2:" in stdout
    rows = read_csv(out / "sweep.csv")
    assert [r["latent"] for r in rows] == ["1", "2"] and (out / "sweep.png").stat().st_size > 0
    for r in rows:
        n, p = int(r["n_train"]), int(r["params_decoder"])
        total_ll = -float(r["train_nll"]) * n
        assert float(r["bic"]) == pytest.approx(-2 * total_ll + p * math.log(n), rel=1e-5)
        assert int(r["params_total"]) > p
        assert (out / f"latent-{r['latent']}" / "checkpoint.pt").is_file()
    assert int(rows[1]["params_decoder"]) - int(rows[0]["params_decoder"]) == 8  # one more latent unit: 8 weights
    # a second sweep into the same folder resumes (nothing to train) and rewrites the same table
    rc, stdout, _ = run_cli(capsys, "sweep", "--latent", "1,2", "--epochs", "1", "--k", "4", "--out", out,
                            "--no-progress")
    assert rc == 0 and stdout.count("nothing to do") == 2
    assert [r["test_nelbo"] for r in read_csv(out / "sweep.csv")] == [r["test_nelbo"] for r in rows]


# --------------------------------------------------------------------------- bad input


def _bad_mnist(tmp_path, kind):
    d = tmp_path / f"mnist-{kind}"
    d.mkdir()
    head = bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    raw = {"magic": b"\x00\x00\x10\x03" + bytes(100), "truncated": head + bytes(100),
           "28x28": head + bytes(5 * 28 * 28)}[kind]
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    return d


@pytest.mark.parametrize("argv,match", [
    (["train", "--data", "mnist:{tmp}/missing"], "missing: no such directory"),
    (["train", "--data", "mnist:{magic}"], "not an IDX file (magic number 0x00001003)"),
    (["train", "--data", "mnist:{truncated}"], "truncated IDX file"),
    (["train", "--data", "{tmp}/missing.npz"], "missing.npz: no such file"),
    (["train", "--data", "imagenet"], "--data: expected"),
    (["train", "--binarize", "sometimes"], "argument --binarize: invalid choice: 'sometimes'"),
    (["train", "--recon", "l1"], "argument --recon: invalid choice"),
    (["train", "--latent", "0"], "argument --latent: expected a positive integer"),
    (["train", "--hidden", "400,x"], "argument --hidden"),
    (["train", "--lr", "-1"], "argument --lr"),
    (["train", "--device", "tpu"], "argument --device"),
    (["train", "--train-split", "abc", "--out", "{tmp}/r"], "--train-split"),
    (["train", "--arch", "mlp", "--channels", "8", "--out", "{tmp}/r"], "--channels"),
    (["train", "--resume"], "--resume without a RUN needs --out"),
    (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["fly"], "invalid choice: 'fly'"),
    (["eval", "{tmp}/nope.pt"], "nope.pt: no such checkpoint"),
    (["eval", "{tmp}/garbage.pt"], "garbage.pt: not a readable vae-ext checkpoint"),
    (["eval", "{tmp}/foreign.pt"], "foreign.pt: not a vae-ext checkpoint"),
    (["eval", "{run}", "--data", "mnist:{28x28}"], "images are 1x28x28 but the model in"),
    (["eval", "{run}", "--k", "0"], "argument --k"),
    (["train", "--out", "{run}"], "already holds a run"),
    (["train", "--out", "{tmp}/garbage.pt"], "garbage.pt: is a file; expected the run's folder"),
    (["train", "--resume", "{run}", "--latent", "7"],
     "from another configuration: it was trained with --latent 2, not 7"),
    (["train", "--resume", "{run}", "--data", "mnist:{28x28}"],
     "from another configuration: it was trained with --data digits"),
    # the other model's checks would refuse the stored options first, naming one never given
    (["train", "--resume", "{run}", "--model", "hvae"],
     "from another configuration: it was trained with --model vae, not hvae"),
    (["sweep", "--latent", "2,zero"], "argument --latent"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, tmp_path, trained, argv, match):
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04 this is not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    paths = {"tmp": tmp_path, "run": trained}
    for kind in ("magic", "truncated", "28x28"):
        if "{" + kind + "}" in " ".join(argv):
            paths[kind] = _bad_mnist(tmp_path, kind)
    # nothing already written is touched (the lock file takes the pid of each run that holds the folder:
    # a --resume locks it before it reads the checkpoint)
    written = lambda: {p: p.stat().st_mtime_ns for p in trained.iterdir() if p.name != ".vae-ext.lock"}  # noqa: E731
    before = written()
    rc, _, err = run_cli(capsys, *[a.format(**paths) for a in argv])
    assert_one_line_error(rc, err, match, status=None)
    assert written() == before


@pytest.mark.parametrize("where", ["weight", "adam_step"])
def test_resume_from_a_non_finite_state_is_refused(capsys, tmp_path, trained, where):
    """A run never saves a non-finite weight: a checkpoint holding one (or a NaN in Adam's state) is
    refused as malformed before any data is read, not blamed on the learning rate a step later."""
    ckpt = torch.load(trained / "checkpoint.pt", weights_only=False)
    if where == "weight":
        next(iter(ckpt["model_state"].values())).view(-1)[0] = float("nan")
    else:
        next(iter(ckpt["optimizer_state"]["state"].values()))["step"].fill_(float("nan"))
    run = tmp_path / "run"
    run.mkdir()
    torch.save(ckpt, run / "checkpoint.pt")
    rc, _, err = run_cli(capsys, "train", "--resume", run, "--epochs", "2")
    assert_one_line_error(rc, err, "malformed checkpoint: '{}_state' holds a non-finite value".format(
        "model" if where == "weight" else "optimizer"), status=None)


def test_resume_into_a_folder_holding_another_run_is_refused(capsys, tmp_path, trained):
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((trained / "checkpoint.pt").read_bytes())
    before = (other / "checkpoint.pt").stat().st_mtime_ns
    rc, _, err = run_cli(capsys, "train", "--resume", trained, "--out", other, "--epochs", "2")
    assert_one_line_error(rc, err, "already holds a run", status=None)
    assert (other / "checkpoint.pt").stat().st_mtime_ns == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "train", "--device", "cuda", "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "--device cuda: CUDA is not available", status=None)
    assert not (tmp_path / "r").exists()


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "vae_ext", "train", "--data", f"mnist:{tmp_path}/none"],
                       capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert_one_line_error(p.returncode, p.stderr, "no such directory")
    assert p.returncode == 1 and p.stdout == ""


def test_sigterm_ends_training_cleanly(tmp_path):
    """kill (SIGTERM) mid-run: one line, status 143, and the last complete checkpoint and metrics."""
    env = {**os.environ, "PYTHONPATH": str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "vae_ext", "train", "--epochs", "1000", "--out", str(out), *TINY],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.csv").exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert_one_line_error(p.returncode, err, "terminated", status=143)
    assert p.returncode == 143
    ck = load_checkpoint(out)
    assert 1 <= ck["epoch"] < 1000 and len(read_csv(out / "metrics.csv")) >= ck["epoch"] - 1
    assert not [q for q in out.iterdir() if q.name.endswith(".tmp")]
