#!/usr/bin/env python
"""Minor page faults per call of the fused ops and of torch.compile of the reference, under glibc's
malloc defaults (never mallopt here), and the CPU allocations one call makes.

    python benchmarks/page_faults.py                       # every case, fresh + steady
    python benchmarks/page_faults.py --case kl_prior:256x4x32x32 --trace

(This checkout's vae_ext where it is built in place, as run.py; the installed one otherwise.)

Each implementation of a case runs in fresh processes of its own (as a user's script starts), --repeat
of them: it is built and called once, then --calls times, and the faults (``resource.getrusage``
ru_minflt) and the time over those calls are divided by their number (``fresh``); then the same
after a loop of --loop calls (``steady``). Which block glibc hands back depends on the heap's
history, which differs from one process to the next: the mean faults over the processes and the
largest are printed, with the median time per call (one thread: run it under ``taskset`` on a
quiet machine to compare times). ``--trace`` lists the allocations of one call through the CPU
allocator (torch.profiler ``profile_memory``): size, when, and when freed (``kept`` = alive after it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = ["kl_prior:256x4x32x32", "kl_prior:64x16x64x64", "l1:1024x784:32", "l1:256x12288:128",
         "gaussian:256x12288:128", "gaussian_pixel:256x12288:128", "bce:128x784:20", "bce:1024x784:32",
         "bce:256x12288:128", "bce_logits:256x12288:128", "bce:4096x4096:256", "reparam:4096x256",
         "reparam:16384x1024", "reparam:1024x64", "latent:8x4x8x8", "latent:64x16x16x16"]


sys.path.insert(0, str(HERE))
from checkout import prefer_built_checkout  # noqa: E402

prefer_built_checkout()


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _build(case: str, impls):
    """(fns by impl, leaves) of a case: each fn is one forward + backward with .grad dropped first."""
    import torch

    import measure
    import objectives
    from settings import Settings

    torch.set_num_threads(1)
    kind, _, size = case.partition(":")
    st = Settings(device=torch.device("cpu"), dtypes=[torch.float32])
    if kind == "reparam":
        import reparameterize as rp

        n, lat = rp.parse_size(size)
        g = torch.Generator().manual_seed(0)
        mu = torch.randn(n, lat, generator=g).requires_grad_()
        lv = (0.5 * torch.randn(n, lat, generator=g) - 1).requires_grad_()
        gz = torch.randn(n, lat, generator=g)
        inputs, leaves, grad, fused, ref = (mu, lv), (mu, lv), gz, rp._fused, rp._ref
    elif kind == "latent":
        import latent

        shape = latent.parse_size(size)
        inputs, grad_z = latent.make_inputs(shape, torch.float32, "cpu", torch.Generator().manual_seed(0))
        measure.configure_dynamo()
        fns = {"fused": latent._fused, "two_call": latent._two_call, "eager": latent._ref,
               "compile": measure.compile_fn(latent._ref, st) if "compile" in impls else None}
        return {name: latent._step(fns[name], inputs, grad_z) for name in impls}, inputs
    elif kind in ("bce", "bce_logits"):
        import loss

        n, d, lat = loss.parse_size(size)
        r, x, mu, lv, _ = loss.make_inputs({"recon": kind, "dtype": torch.float32, "N": n, "D": d, "L": lat}, st)
        inputs, leaves, grad, fused, ref = (r, x, mu, lv), (r, mu, lv), None, loss._fused(kind), loss._ref(kind)
    else:
        _, shape = objectives.parse_size(size)
        inputs, leaves, _ = objectives.make_inputs({"case": kind, "dtype": torch.float32, "shape": shape}, st)
        grad = None
        fused, ref = objectives._fns(kind)
    measure.configure_dynamo()
    make = {"fused": lambda: fused, "compile": lambda: measure.compile_fn(ref, st), "eager": lambda: ref}
    fns = {name: measure.backward_step(make[name](), inputs, leaves, grad) for name in impls}
    return fns, leaves


def _trace(fn, leaves) -> list:
    """The CPU allocations of one call: (order, bytes, freed at which event or 'kept')."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            ev.append((node.start_time_ns, int(node.extra_fields.alloc_size), node.extra_fields.ptr))
    ev.sort()
    live, out = {}, []
    for i, (_, size, ptr) in enumerate(ev):
        if size > 0:
            live[ptr] = len(out)
            out.append([i, size, "kept"])
        elif ptr in live:
            out[live.pop(ptr)][2] = i
        else:
            out.append([i, size, "freed (older)"])
    return [r for r in out if abs(r[1]) >= 65536]


def child(case: str, calls: int, loop: int, trace: bool, impls) -> dict:
    fns, leaves = _build(case, impls)
    for fn in fns.values():  # compile, and one call each
        fn()
    res = {"case": case}
    for phase, n_loop in (("fresh", 0), ("steady", loop)):
        for name, fn in fns.items():
            for _ in range(n_loop):
                fn()
            f0, t0 = _faults(), time.perf_counter()
            for _ in range(calls):
                fn()
            t1 = time.perf_counter()
            res.setdefault(phase, {})[name] = (_faults() - f0) / calls
            res.setdefault(phase + "_ms", {})[name] = (t1 - t0) / calls * 1e3
    if trace:
        res["trace"] = {name: _trace(fn, leaves) for name, fn in fns.items()}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", action="append", help=f"KIND:SIZE (default: all of {', '.join(CASES)})")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--loop", type=int, default=50)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--impls", default="fused,compile", help="comma list of fused, compile, eager (and, for "
                   "latent, two_call: reparameterize + gaussian_kl): each in a process of its own")
    p.add_argument("--repeat", type=int, default=3, help="processes per implementation and case (the counts "
                   "vary from one process to the next: the mean and the largest are shown)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.case[0], a.calls, a.loop, a.trace, a.impls.split(","))))
        return 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for case in a.case or CASES:
        runs = []
        for impl in a.impls.split(","):
            cmd = [sys.executable, __file__, "--child", "--case", case, "--calls", str(a.calls), "--loop",
                   str(a.loop), "--impls", impl]
            for _ in range(a.repeat):
                out = subprocess.run(cmd + (["--trace"] if a.trace else []), env=env, capture_output=True, text=True)
                if out.returncode:
                    print(f"{case} {impl}: failed\n{out.stderr[-2000:]}")
                    return 1
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        cells = []
        for phase in ("fresh", "steady"):
            for impl in a.impls.split(","):
                v = [r[phase][impl] for r in runs if impl in r[phase]]
                ms = sorted(r[phase + "_ms"][impl] for r in runs if impl in r[phase])
                cells.append(f"{phase} {impl} {sum(v) / len(v):6.0f} (max {max(v):5.0f}) {ms[len(ms) // 2]:6.2f} ms")
        print(f"{case:28s} " + "  ".join(cells), flush=True)
        for r in runs[:: a.repeat]:
            for name, rows in r.get("trace", {}).items():
                print(f"  {name}: " + "  ".join(f"#{i}:{s >> 10}K->{f}" for i, s, f in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
