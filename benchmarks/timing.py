"""Timing: warm-up, interleaved rounds of torch.utils.benchmark.Timer, and CUDA-graph replays.

``Timer.blocked_autorange`` synchronizes CUDA around each block; the rounds alternate the order of
the implementations so that a change of load on a shared machine hits every one of a case alike.
Imports torch alone: the CUDA tests use ``capture_cuda_graph`` too (tests/conftest.py).
"""
from __future__ import annotations

import gc
import resource
import time
from typing import Callable, Dict, Iterable, List

import torch
from torch.utils import benchmark as tbench


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(times_s: Iterable[float]) -> dict:
    """Median and spread of per-call times (seconds in, milliseconds out)."""
    ts = torch.tensor(sorted(float(t) for t in times_s), dtype=torch.float64)
    if not len(ts):
        return {"median_ms": float("nan"), "iqr_ms": float("nan"), "min_ms": float("nan"), "blocks": 0}
    q25, med, q75 = ts.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {"median_ms": med * 1e3, "iqr_ms": (q75 - q25) * 1e3, "min_ms": ts[0].item() * 1e3, "blocks": len(ts)}


def warm_up(fn: Callable, settings) -> float:
    """Call ``fn`` until warm; return the seconds the first call took (compilation, for compiled fns)."""
    t0 = time.perf_counter()
    fn()
    sync(settings.device)
    first = time.perf_counter() - t0
    t0, n = time.perf_counter(), 0
    while n < 3 or (time.perf_counter() - t0 < settings.warmup_time and n < 1000):
        fn()
        n += 1
    sync(settings.device)
    return first


def time_interleaved(fns: Dict[str, Callable], settings, label: str = "") -> Dict[str, dict]:
    """Median per-call time of each fn, measured in ``settings.rounds`` interleaved rounds.

    Each round runs ``Timer.blocked_autorange(min_run_time)`` once per fn, alternating the order
    every round; the medians are over all the blocks of all rounds. Call ``warm_up`` first. Each
    fn's ``minflt_per_call`` is the minor page faults (``resource.getrusage``) over its timed calls
    (the timer's calibration calls included) divided by their number.
    """
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    faults = {n: 0 for n in names}
    calls = {n: 0 for n in names}
    for r in range(settings.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            def counted(fn=fns[name], name=name):
                calls[name] += 1
                fn()

            timer = tbench.Timer(stmt="fn()", globals={"fn": counted}, num_threads=settings.threads,
                                 label=label, description=name)
            f0 = minor_faults()
            times[name].extend(timer.blocked_autorange(min_run_time=settings.min_run_time).times)
            faults[name] += minor_faults() - f0
    return {n: {**summarize(times[n]), "minflt_per_call": faults[n] / calls[n] if calls[n] else None}
            for n in names}


def minor_faults() -> int:
    """The process's minor page faults so far (getrusage ru_minflt): a fresh page touched the first time."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def capture_cuda_graph(fn: Callable, warmups: int = 3):
    """Call ``fn`` ``warmups`` times on a side stream, then capture one call in a CUDA graph.

    Returns ``(graph, out)``: ``out`` is what the captured call returned, and ``graph.replay()``
    rewrites it in place. ``fn`` must be capturable: no host sync. Replays run the same kernels on
    the same buffers with no Python, dispatcher or launch cost: their time is the device time.
    """
    # A leaf's AccumulateGrad node is cached while any autograd graph holds it, and it keeps the
    # stream that was current when it was made. One made on the default stream (a plain call
    # earlier) and kept alive by a graph nobody frees (a reference cycle) would make the capture
    # wait on the legacy stream: cudaErrorStreamCaptureImplicit. Collect such cycles first.
    gc.collect()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs a few calls on a side stream first
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph, out
