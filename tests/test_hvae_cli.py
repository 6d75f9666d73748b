"""``vae-ext train --model hvae`` (issue 27): the files and columns of a run (the KL of each latent
layer, kl_per_layer.png, samples at temperatures), the summary in bits per dimension, --reference
following the fused run, --skip-threshold's counting, resuming, torchrun, eval, and the refusals."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from test_distributed import PKG_ROOT, _free_port

import vae_ext
from vae_ext.cli.config import TrainConfig
from vae_ext.cli.distributed import DistributedContext
from vae_ext.cli.train import DMOL_METRIC_COLUMNS, METRIC_COLUMNS, _total_norm, guarded_train_step

from helpers import assert_one_line_error, read_csv, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "hvae", "--width", "8", "--latent", "2", "--mixtures", "3", "--no-progress", "--eval-k", "4"]
LAYERS = ["kl_1_1x1", "kl_2_4x4", "kl_3_8x8"]


def _train(capsys, out, *argv):
    rc, stdout, err = run_cli(capsys, "train", "--out", out, *TINY, *argv)
    assert rc == 0, err
    return stdout


def test_run_files_columns_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    stdout = _train(capsys, out, "--epochs", "2")
    for name in ("checkpoint.pt", "metrics.csv", "samples.png", "reconstructions.png", "loss_curves.png",
                 "kl_per_layer.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "metrics.csv") as f:
        header = f.readline().strip().split(",")
    assert header == [*DMOL_METRIC_COLUMNS, "skipped_norm", *LAYERS]
    rows = read_csv(out / "metrics.csv")
    for r in rows:  # the layers' KLs add up to the epoch's training KL
        assert math.isclose(sum(float(r[c]) for c in LAYERS), float(r["train_kl"]), rel_tol=1e-4)
        assert r["skipped_norm"] == "0" and int(r["active_units"]) <= 3
    assert "3 latent layers of 2 channels at resolutions 1,4,8" in stdout
    assert "active layers" in stdout
    summary = [line for line in stdout.splitlines() if line.startswith("test -ELBO")]
    assert len(summary) == 1 and "bits/dim" in summary[0] and "importance-weighted, k=4" in summary[0]
    elbo_bpd = float(summary[0].split(" = ")[1].split()[0])
    assert math.isclose(elbo_bpd, float(rows[-1]["test_bpd"]), rel_tol=1e-4)

    rc, stdout, err = run_cli(capsys, "eval", out, "--k", "4", "--no-progress", "--json")
    assert rc == 0, err
    import json

    r = json.loads(stdout)
    assert math.isclose(r["nelbo_bpd"], elbo_bpd, rel_tol=1e-4) and r["nll_bpd"] < r["nelbo_bpd"] + 0.5


def test_reference_run_follows_the_fused_run(tmp_path, capsys):
    """--reference: the same model on vae_ext.reference, the same draws; an epoch's numbers agree to
    float32 tolerance (12 Adam steps)."""
    _train(capsys, tmp_path / "fused", "--epochs", "1", "--eval-k", "0")
    _train(capsys, tmp_path / "ref", "--epochs", "1", "--eval-k", "0", "--reference")
    f, r = read_csv(tmp_path / "fused" / "metrics.csv")[0], read_csv(tmp_path / "ref" / "metrics.csv")[0]
    for col in ("train_loss", "train_rec", "train_kl", "test_nelbo", "test_kl", *LAYERS):
        assert math.isclose(float(f[col]), float(r[col]), rel_tol=1e-3, abs_tol=1e-3), (col, f[col], r[col])


def test_skip_threshold_counts_and_skips(tmp_path, capsys):
    # a threshold every gradient exceeds: every update skipped, the weights never move
    out = tmp_path / "all"
    stdout = _train(capsys, out, "--epochs", "1", "--skip-threshold", "1e-6", "--eval-k", "0")
    row = read_csv(out / "metrics.csv")[0]
    assert row["skipped"] == row["skipped_norm"] == row["step"] == "12"
    assert "12 updates skipped (gradient norm > 1e-06)" in stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    torch.manual_seed(0)  # the run's seed: the model as it was built
    init = vae_ext.VAE.from_config(ckpt["model_config"]).state_dict()
    assert all(torch.equal(init[k], v) for k, v in ckpt["model_state"].items())
    # a flat VAE takes the option too, and gains the column
    out = tmp_path / "flat"
    rc, _, err = run_cli(capsys, "train", "--out", out, "--epochs", "1", "--hidden", "16", "--latent", "2",
                         "--skip-threshold", "1e30", "--no-progress")
    assert rc == 0, err
    with open(out / "metrics.csv") as f:
        assert f.readline().strip().split(",") == [*METRIC_COLUMNS, "skipped_norm"]
    assert read_csv(out / "metrics.csv")[0]["skipped_norm"] == "0"


def test_guarded_step_skips_just_above_the_norm():
    torch.manual_seed(0)
    m = vae_ext.models.HVAE(input_shape=(1, 8, 8), width=8, mixtures=2)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    ctx = DistributedContext()  # one process
    torch.manual_seed(1)
    m.loss(x)[0].backward()
    norm = _total_norm([p.grad for p in m.parameters()], "cpu").item()
    before = [p.detach().clone() for p in m.parameters()]
    torch.manual_seed(1)
    *_, skip = guarded_train_step(m, m, opt, x, 1.0, ctx, skip_threshold=norm * 0.999)
    assert skip == "norm" and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    torch.manual_seed(1)
    *_, skip = guarded_train_step(m, m, opt, x, 1.0, ctx, skip_threshold=norm * 1.001)
    assert skip is False and not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_resume_continues_as_one_run(tmp_path, capsys):
    _train(capsys, tmp_path / "straight", "--epochs", "2", "--eval-k", "0")
    _train(capsys, tmp_path / "split", "--epochs", "1", "--eval-k", "0")
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "split", "--epochs", "2", "--no-progress")
    assert rc == 0, err
    a, b = read_csv(tmp_path / "straight" / "metrics.csv"), read_csv(tmp_path / "split" / "metrics.csv")
    for col in ("train_nelbo", "test_nelbo", *LAYERS):
        assert [r[col] for r in a] == [r[col] for r in b], col
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "split", "--epochs", "3", "--width", "16")
    assert_one_line_error(rc, err, "--width 8, not 16")


@pytest.mark.parametrize("argv,match", [
    (["--model", "hvae", "--hidden", "16"], "--hidden: not with --model hvae"),
    (["--model", "hvae", "--arch", "conv"], "--arch: not with --model hvae"),
    (["--model", "hvae", "--channels", "4"], "--channels: not with --model hvae"),
    (["--model", "hvae", "--recon", "bce"], "--recon bce: --model hvae"),
    (["--model", "hvae", "--conditional"], "--conditional: --model hvae"),
    (["--model", "hvae", "--free-bits", "0.1"], "--free-bits: --model hvae"),
    (["--model", "hvae", "--binarize", "static"], "--binarize static"),
    (["--width", "8"], "--width: only --model hvae"),
    (["--layers", "2"], "--layers: only --model hvae"),
])
def test_refused_options(tmp_path, capsys, argv, match):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "x", *argv)
    assert_one_line_error(rc, err, match)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["--model", "hvae"], ["--width", "8"], ["--skip-threshold", "1"]])
def test_sweep_has_no_hvae_options(tmp_path, capsys, argv):
    rc, _, err = run_cli(capsys, "sweep", "--out", tmp_path / "x", *argv)
    assert_one_line_error(rc, err, "unrecognized arguments", status=2)


def test_config_defaults():
    c = TrainConfig(model="hvae")
    assert (c.arch, c.recon, c.latent, c.width, c.layers, c.mixtures, c.eval_k, c.hidden) == \
        ("hvae", "dmol", 4, 16, 1, 10, 16, None)
    v = TrainConfig()
    assert (v.arch, v.recon, v.latent, v.eval_k, v.width) == ("mlp", "bce_logits", 20, 0, None)


def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "vae_ext", "train", "--out", str(run),
           "--epochs", "1", "--batch-size", "64", "--device", "cpu", *TINY]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 processes (DDP)" in p.stdout and p.stdout.count("epoch   1/1") == 1
    rows = read_csv(run / "metrics.csv")
    assert rows[0]["step"] == "12" and all(math.isfinite(float(rows[0][c])) for c in LAYERS)
