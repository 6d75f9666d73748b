"""Data-parallel training: two CPU processes with gloo, started by torch.distributed.run (torchrun)."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import vae_ext
from vae_ext.cli.evaluate import evaluate_checkpoint

# The workers import the vae_ext this process imported (in-place build or installed package).
PKG_ROOT = Path(vae_ext.__file__).resolve().parents[1]

# Each rank runs the trainer exactly as `torchrun -m vae_ext train` does (vae_ext.cli.train.train reads
# RANK/WORLD_SIZE from the environment and wraps the model in DDP), then saves its own final weights.
WORKER = textwrap.dedent("""
    import os, sys, torch
    torch.set_num_threads(1)
    from vae_ext.cli.config import TrainConfig
    from vae_ext.cli.train import train
    out = sys.argv[1]
    cfg = TrainConfig(data="digits", hidden=[32], latent=4, epochs=3, batch_size=64, lr=3e-3,
                      device="cpu", seed=5, out=os.path.join(out, "run"), progress=False)
    res = train(cfg)
    rank = int(os.environ["RANK"])
    torch.save({k: v.clone() for k, v in res.model.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    print(f"rank {rank} of {os.environ['WORLD_SIZE']} done, {len(res.history)} epochs")
""")


def read_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_two_gloo_processes_end_with_identical_weights_and_lower_loss(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(PKG_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    w0, w1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:  # DDP all-reduces the gradients, so every rank takes the same steps
        assert torch.equal(w0[k], w1[k]), k

    run = tmp_path / "run"
    rows = read_rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[-1]["train_nelbo"]) < float(rows[0]["train_nelbo"])
    assert float(rows[-1]["test_nelbo"]) < float(rows[0]["test_nelbo"])
    # 1,438 training images / 2 ranks / 64 per batch = 12 steps per epoch on each rank
    assert int(rows[0]["step"]) == 12
    assert "2 processes (DDP)" in p.stdout
    assert p.stdout.count("epoch   1/3") == 1  # only rank 0 logs
    assert "rank 0 of 2 done" in p.stdout and "rank 1 of 2 done" in p.stdout
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)  # written by rank 0
    assert ckpt["epoch"] == 3 and all(torch.equal(ckpt["model_state"][k], w0[k]) for k in w0)
    # Every rank scores the whole test set with the same eps: `vae-ext eval` in one process gives the
    # last row's test -ELBO (issue 30: each rank used to score its shard with eps seeded seed + rank).
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers ran
    try:
        r = evaluate_checkpoint(run, k=1, device="cpu", progress=False)
    finally:
        torch.set_num_threads(old)
    assert r["nelbo"] == ckpt["history"][-1]["test_nelbo"] and f"{r['nelbo']:.6g}" == rows[-1]["test_nelbo"]

    # `vae-ext train --resume` under torchrun: rank 0 locks the folder before it reads, every rank
    # checks that it read the checkpoint rank 0 read, and the run goes on from epoch 3
    cmd = [*cmd[:6], f"--master-port={_free_port()}", "-m", "vae_ext", "train", "--resume", str(run), "--epochs", "4",
           "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resuming after epoch 3" in p.stdout and len(read_rows(run)) == 4
    assert not [q for q in run.iterdir() if q.name.endswith(".tmp")]
