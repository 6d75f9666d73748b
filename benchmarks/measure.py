"""One case of a benchmark: every implementation warmed up, timed beside the copy floor, its peak
memory measured, and the record the JSON keeps of it; the compiled baselines; a whole benchmark's run.

Everything here measures; nothing estimates.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

import glibc_process

from floor import CopyFloor
from machine import cpu_snapshot, other_load
from memory import peak_memory_bytes
from settings import Settings
from timing import capture_cuda_graph, time_interleaved, warm_up


def configure_dynamo() -> None:
    """One compiled graph per (case, implementation): allow many static-shape recompiles."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def compile_fn(fn: Callable, settings: Settings) -> Callable:
    """``torch.compile`` with static shapes (each case is one shape) and the run's mode."""
    kwargs = {"dynamic": False, "backend": settings.compile_backend}
    if settings.compile_mode:
        kwargs["mode"] = settings.compile_mode
    return torch.compile(fn, **kwargs)


def reset_compiled() -> None:
    """Drop compiled graphs of earlier cases (their guards would be checked on every call)."""
    torch._dynamo.reset()


def backward_step(loss_fn: Callable, inputs: tuple, leaves: tuple, grad: Optional[torch.Tensor] = None) -> Callable:
    """``loss_fn(*inputs)`` then ``.backward()``; the leaves' ``.grad`` is dropped first (no accumulation)."""

    def step():
        for t in leaves:
            t.grad = None
        out = loss_fn(*inputs)
        if grad is None:
            out.backward()
        else:
            out.backward(grad)

    return step


def measure_impls(
    settings: Settings,
    label: str,
    fns: Dict[str, Callable],
    *,
    reset: Callable[[], None],
    floor_bytes: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    mem_fns: Optional[Dict[str, Dict[str, Callable]]] = None,
    graphable: bool = True,
) -> dict:
    """Warm up, time (interleaved with the copy floor when ``floor_bytes``) and measure peak memory.

    ``reset`` drops whatever one call leaves behind (the ``.grad`` of the leaves) so that the memory
    measurement starts from the inputs alone. Peak memory is measured for ``fns`` (key
    ``peak_mem_bytes``) unless ``mem_fns`` says which functions to measure under which keys
    (``{result key: {impl: fn}}``). With ``settings.cuda_graph`` (and ``graphable``) the timed calls
    are CUDA-graph replays; peak memory is still measured on plain calls.
    """
    first_call = {name: warm_up(fn, settings) for name, fn in fns.items()}
    timed = dict(fns)
    floor = None
    if floor_bytes:
        floor = CopyFloor(floor_bytes, settings.device, generator or torch.Generator().manual_seed(0))
        timed["floor"] = floor.copy
        warm_up(floor.copy, settings)
        # The copy into a fresh buffer costs what the copy costs wherever freed memory is reused
        # (CUDA's caching allocator, --cpu-allocator retain): timed only where it can differ.
        if not settings.is_cuda and settings.cpu_allocator != "retain":
            timed["floor_alloc"] = floor.alloc
            warm_up(floor.alloc, settings)
    if settings.cuda_graph and graphable and settings.is_cuda:
        for name in list(timed):
            timed[name] = capture_cuda_graph(timed[name])[0].replay
            warm_up(timed[name], settings)
    snap = cpu_snapshot()
    times = time_interleaved(timed, settings, label)
    others = other_load(snap, cpu_snapshot())
    del timed, floor  # the floor's buffers (and graphs) are not part of any implementation's memory
    out = {"times": times, "first_call_s": first_call, "other_cpu_load": others}
    for key, group in (mem_fns or {"peak_mem_bytes": fns}).items():
        peak = {}
        if settings.measure_memory:
            for name, fn in group.items():
                reset()
                peak[name] = peak_memory_bytes(fn, settings.device)
        out[key] = peak
    reset()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


def agreement(fused_fn, ref_fn, inputs, leaves) -> dict:
    """Sanity before timing: the fused op computes what the reference computes, the loss and the
    gradient of every leaf (relative errors)."""
    lf = fused_fn(*inputs)
    gf = torch.autograd.grad(lf, leaves)
    lr = ref_fn(*inputs)
    gr = torch.autograd.grad(lr, leaves)
    return {"loss_rel_err": rel_err(lf, lr), "grad_rel_err": max(rel_err(a, b) for a, b in zip(gf, gr))}


def ratio(base: Optional[dict], new: Optional[dict]) -> Optional[float]:
    """base time / new time (> 1: new is faster)."""
    if not base or not new:
        return None
    b, n = base.get("median_ms"), new.get("median_ms")
    if not b or not n:
        return None
    return b / n


OP_IMPLS = ("fused", "eager", "compile")
_current: list = []  # [benchmark name, case] while run_benchmark runs a case
OP_BASELINES = ("eager", "compile")


def op_case(settings: Settings, label: str, fused: Optional[Callable], ref: Callable, inputs: tuple, leaves: tuple, *,
            grad: Optional[torch.Tensor] = None, nbytes: int, generator: torch.Generator, fields: dict,
            check: dict) -> dict:
    """One case of an op benchmark: the fused op, the eager reference and ``torch.compile`` of it, each
    called on ``inputs`` then backward, timed beside the copy floor of ``nbytes``. Returns the case as
    the JSON keeps it: ``fields`` (its sizes), the timings, speedups, percent of the floor, achieved
    bandwidth, peak memory and the correctness ``check``. ``fused=None`` (an op this build lacks) times
    the baselines alone; the fused figures are then absent."""
    fns = {"fused": backward_step(fused, inputs, leaves, grad)} if fused is not None else {}
    fns.update({"eager": backward_step(ref, inputs, leaves, grad),
                "compile": backward_step(compile_fn(ref, settings), inputs, leaves, grad)})
    impls = [k for k in OP_IMPLS if k in fns]
    if settings.glibc_child:  # glibc_process.py: the timings alone
        return child_times(fns, settings, label, {b: ("fused", b) for b in OP_BASELINES})

    def reset():
        for t in leaves:
            t.grad = None

    m = measure_impls(settings, label, fns, reset=reset, floor_bytes=nbytes, generator=generator)
    times, peak, floor = m["times"], m["peak_mem_bytes"], m["times"].get("floor")
    rec = dict(fields)
    rec.update({
        "bytes_fused": nbytes,
        "times": times,
        "first_call_s": m["first_call_s"],
        "other_cpu_load": m["other_cpu_load"],
        "speedup": {b: ratio(times.get(b), times.get("fused")) for b in OP_BASELINES},
        "pct_floor": {k: 100.0 * ratio(floor, times[k]) for k in impls} if floor else {},
        "GBps": {k: nbytes / (times[k]["median_ms"] * 1e-3) / 1e9 for k in (*impls, "floor")},
        "peak_mem_bytes": peak,
        "check": check,
    })
    if peak and "fused" in peak:
        rec["mem_fused_le"] = {b: peak["fused"] <= peak[b] for b in OP_BASELINES}
    add_fresh_process(rec, settings)
    return rec


def child_times(fns: dict, settings: Settings, label: str, speedups: dict) -> dict:
    """What a case returns in glibc_process.py's child: each fn warmed up and timed interleaved (with
    its page faults per call), and ``speedups`` (name: (fused impl, baseline impl)) as ratios."""
    for fn in fns.values():
        warm_up(fn, settings)
    times = time_interleaved(fns, settings, label)
    return {"times": times, "speedup": {k: ratio(times.get(b), times.get(f)) for k, (f, b) in speedups.items()}}


def add_fresh_process(rec: dict, settings: Settings) -> None:
    """The case run_benchmark is running, measured again in a fresh process under glibc's malloc
    defaults (benchmarks/glibc_process.py), as rec["glibc_process"], when the run asks for it."""
    if settings.glibc_process and _current:
        rec["glibc_process"] = glibc_process.measure(*_current, settings)


def run_benchmark(settings: Settings, progress, bench, **fields) -> dict:
    """Runs every case of a benchmark module (``bench``: NAME, TITLE, IMPLS, BASELINES, cases,
    run_case, case_label), through the progress wrapper when there is one, and returns its JSON
    section: the module's names, then ``fields`` (what the call and the bytes are), then the results."""
    cases = bench.cases(settings)
    results = []
    for c in cases if progress is None else progress(cases, bench.NAME, bench.case_label):
        reset_compiled()
        _current[:] = [bench.NAME, c]  # op_case measures the same case in a fresh process too
        try:
            results.append(bench.run_case(c, settings))
        finally:
            _current.clear()
    return {"name": bench.NAME, "title": bench.TITLE, "impls": list(bench.IMPLS),
            "baselines": list(bench.BASELINES), **fields, "results": results}
