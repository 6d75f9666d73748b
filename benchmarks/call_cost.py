"""Instructions per call of the classic 128x784 ``bce`` elbo_loss (forward + ``loss.backward()``,
one thread) under callgrind: docs/design.md, "The fixed cost of a call".

    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/cg.out \\
        python benchmarks/call_cost.py [--calls 100] [--dtype float32] [--x mnist|binary]
    callgrind_annotate --inclusive=yes /tmp/cg.out.1   # the instructions of the timed calls; / calls

``python`` must be the interpreter itself: valgrind does not follow a shim's ``exec`` (pyenv's
``python`` is a shell script), and the output file then stays empty.

Instrumentation is off through the imports and a warm-up of 50 calls, then on for ``--calls`` calls
(valgrind's client requests, from a tiny C helper built with the system compiler and valgrind's
headers). ``--x mnist`` is the benchmarks' target (80% zeros), ``binary`` 0/1 pixels (the kernel's
one-log path).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile

import torch

import vae_ext

HELPER = """#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("calls"); }
"""


def helper() -> ctypes.CDLL:
    d = tempfile.mkdtemp()
    src, lib = os.path.join(d, "cg.c"), os.path.join(d, "cg.so")
    with open(src, "w") as f:
        f.write(HELPER)
    subprocess.run(["cc", "-O1", "-shared", "-fPIC", src, "-o", lib], check=True)
    return ctypes.CDLL(lib)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--x", choices=("mnist", "binary"), default="mnist")
    a = p.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    recon = torch.sigmoid(torch.randn(128, 784)).to(dtype).requires_grad_()
    u, v = torch.rand(128, 784), torch.rand(128, 784).sqrt()  # benchmarks/inputs.py mnist_like
    x = (torch.where(u < 0.8, torch.zeros_like(v), v) if a.x == "mnist" else (v > 0.5).float()).to(dtype)
    mu = torch.randn(128, 20).to(dtype).requires_grad_()
    logvar = torch.randn(128, 20).to(dtype).requires_grad_()

    def step():
        vae_ext.elbo_loss(recon, x, mu, logvar).backward()
        recon.grad = mu.grad = logvar.grad = None

    cg = helper()
    for _ in range(50):
        step()
    cg.cg_start()
    for _ in range(a.calls):
        step()
    cg.cg_stop()


if __name__ == "__main__":
    main()
