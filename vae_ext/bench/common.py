"""Shared benchmark machinery: timing, the copy floor, peak memory, machine description, inputs.

Everything here measures; nothing estimates. Timing uses ``torch.utils.benchmark.Timer``
(``blocked_autorange``; it synchronizes CUDA around each block), run in interleaved rounds so that
a change of load on a shared machine hits every implementation of a case alike. Peak memory is
``torch.cuda.max_memory_allocated`` on CUDA and, on CPU, the allocation events that PyTorch's CPU
allocator reports to ``torch.profiler`` (``profile_memory=True``), replayed in time order.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
import sys
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch.utils import benchmark as tbench

SCHEMA = "vae_ext.bench/1"

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --------------------------------------------------------------------------- run settings


@dataclass
class Context:
    """What every benchmark needs to know about this run."""

    device: torch.device
    dtypes: List[torch.dtype]
    quick: bool = False
    rounds: int = 5
    min_run_time: float = 0.2  # seconds per implementation per round
    warmup_time: float = 0.3  # seconds of warm-up calls after the first call
    threads: int = 1
    compile_mode: Optional[str] = None  # torch.compile(mode=...); None = the default mode
    compile_backend: str = "inductor"  # torch.compile(backend=...)
    measure_memory: bool = True
    sizes: Dict[str, list] = field(default_factory=dict)  # --sizes overrides, parsed per benchmark
    recon_modes: List[str] = field(default_factory=lambda: ["bce", "bce_logits"])
    models: List[str] = field(default_factory=lambda: ["mlp", "conv"])
    adam: str = "default"  # step benchmark: "default", "foreach" or "fused"
    cuda_graph: bool = False  # op benchmarks on CUDA: time replays of one captured call (device time)
    seed: int = 0
    status: Callable[[str], None] = lambda s: None  # progress-bar postfix

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


# --------------------------------------------------------------------------- compile


def configure_dynamo() -> None:
    """One compiled graph per (case, implementation): allow many static-shape recompiles."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 256))


def compile_fn(fn: Callable, ctx: Context) -> Callable:
    """``torch.compile`` with static shapes (each case is one shape) and the run's mode."""
    kwargs = {"dynamic": False, "backend": ctx.compile_backend}
    if ctx.compile_mode:
        kwargs["mode"] = ctx.compile_mode
    return torch.compile(fn, **kwargs)


def reset_compiled() -> None:
    """Drop compiled graphs of earlier cases (their guards would be checked on every call)."""
    torch._dynamo.reset()


# --------------------------------------------------------------------------- the CPU allocator

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4

CPU_ALLOCATOR_MODES = {
    "retain": "freed memory stays in the process for reuse (glibc mallopt: M_MMAP_MAX=0, "
    "M_TRIM_THRESHOLD=2 GiB), as a caching allocator would do: no page faults after warm-up",
    "fresh": "every block of 256 KiB or more is new pages from mmap (M_MMAP_THRESHOLD=M_TRIM_THRESHOLD="
    "256 KiB): each such allocation pays its page faults",
    "glibc": "glibc's defaults, untouched: blocks above a dynamic threshold (at most 32 MiB) are new pages "
    "on every allocation, smaller ones are reused; which one a block gets depends on the heap's history",
}


def configure_cpu_allocator(mode: str) -> dict:
    """Make CPU allocation behave the same way for every implementation and every case.

    With glibc's defaults a tensor larger than the (dynamic, at most 32 MiB) mmap threshold is fresh
    pages on every allocation, and its page faults can cost several times the kernel itself, unless
    the heap happens to hold a free block large enough: the same op then runs 4x faster or slower
    depending on what ran before. ``retain`` (the default) keeps freed memory for reuse, so the
    timings are the kernels'; ``fresh`` makes every large allocation pay its page faults. Applies to
    the whole process, once; with another malloc (LD_PRELOAD) it does nothing.
    """
    info = {"mode": mode, "applied": False, "description": CPU_ALLOCATOR_MODES.get(mode, "")}
    if mode == "glibc":
        return info
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as e:
        info["why_not"] = f"no glibc mallopt: {e}"
        return info
    if mode == "retain":
        ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    elif mode == "fresh":
        ok = mallopt(_M_MMAP_THRESHOLD, 256 << 10) == 1 and mallopt(_M_TRIM_THRESHOLD, 256 << 10) == 1
        try:
            libc.malloc_trim(0)
        except AttributeError:
            pass
    else:
        raise ValueError(f"cpu allocator mode: expected one of {', '.join(CPU_ALLOCATOR_MODES)}, got {mode!r}")
    info["applied"] = bool(ok)
    if os.environ.get("LD_PRELOAD"):
        info["note"] = f"LD_PRELOAD={os.environ['LD_PRELOAD']}: mallopt reaches glibc's malloc only"
    return info


# --------------------------------------------------------------------------- inputs


def mnist_like(shape, *, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """Targets in [0, 1] shaped like MNIST pixels: about 80% exact zeros, the rest in (0, 1], skewed to 1."""
    u = torch.rand(shape, generator=generator)
    v = torch.rand(shape, generator=generator).sqrt()  # ink: mostly near 1
    x = torch.where(u < 0.8, torch.zeros_like(v), v)
    return x.to(device=device, dtype=dtype)


def randn(shape, *, device, dtype, generator: torch.Generator, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * scale + shift).to(device=device, dtype=dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(sorted_vals: List[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def summarize(times_s: Iterable[float]) -> dict:
    """Median and spread of per-call times (seconds in, milliseconds out)."""
    ts = sorted(float(t) for t in times_s)
    q25, med, q75 = (_percentile(ts, q) for q in (0.25, 0.5, 0.75))
    return {
        "median_ms": med * 1e3,
        "iqr_ms": (q75 - q25) * 1e3,
        "min_ms": ts[0] * 1e3 if ts else float("nan"),
        "blocks": len(ts),
    }


def _cpu_snapshot() -> Optional[tuple]:
    """(CPU-seconds busy on the whole machine, CPU-seconds of this process, wall seconds); Linux only."""
    try:
        import resource

        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")
        r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process, no children
        return busy, r.ru_utime + r.ru_stime, time.monotonic()
    except (OSError, ValueError, ImportError, IndexError):
        return None


def other_load(before: Optional[tuple], after: Optional[tuple]) -> Optional[float]:
    """Cores kept busy by other processes between two snapshots (the load average would count our own)."""
    if not before or not after or after[2] <= before[2]:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (after[2] - before[2]))


def warm_up(fn: Callable, ctx: Context) -> float:
    """Call ``fn`` until warm; return the seconds the first call took (compilation, for compiled fns)."""
    t0 = time.perf_counter()
    fn()
    sync(ctx.device)
    first = time.perf_counter() - t0
    t0, n = time.perf_counter(), 0
    while n < 3 or (time.perf_counter() - t0 < ctx.warmup_time and n < 1000):
        fn()
        n += 1
    sync(ctx.device)
    return first


def time_interleaved(fns: Dict[str, Callable], ctx: Context, label: str = "") -> Dict[str, dict]:
    """Median per-call time of each fn, measured in ``ctx.rounds`` interleaved rounds.

    Each round runs ``Timer.blocked_autorange(min_run_time)`` once per fn, alternating the order
    every round; the medians are over all the blocks of all rounds. Call ``warm_up`` first.
    """
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(ctx.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ctx.status(f"{label} {name} {r + 1}/{ctx.rounds}")
            timer = tbench.Timer(
                stmt="fn()",
                globals={"fn": fns[name]},
                num_threads=ctx.threads,
                label=label,
                description=name,
            )
            m = timer.blocked_autorange(min_run_time=ctx.min_run_time)
            times[name].extend(m.times)
    return {n: summarize(times[n]) for n in names}


def capture_cuda_graph(fn: Callable, warmups: int = 3):
    """Call ``fn`` ``warmups`` times on a side stream, then capture one call in a CUDA graph.

    Returns ``(graph, out)``: ``out`` is what the captured call returned, and ``graph.replay()``
    rewrites it in place. ``fn`` must be capturable: no host sync.
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


def cuda_graph_replay(fn: Callable) -> Callable:
    """The ``replay`` of a CUDA graph of one call of ``fn`` (already warm).

    Replays run the same kernels on the same buffers with no Python, dispatcher or launch cost, so
    their time is the device time of one call.
    """
    return capture_cuda_graph(fn)[0].replay


# --------------------------------------------------------------------------- the copy floor


class CopyFloor:
    """Two buffers whose copy moves ``nbytes`` (half read, half written): ``dst.copy_(src)``.

    ``alloc()`` is the same copy into a freshly allocated buffer (``src.clone()``): the floor for an
    op that must also allocate its outputs (on CPU, large blocks come from mmap and page-fault in).
    """

    def __init__(self, nbytes: int, device: torch.device, generator: torch.Generator):
        n = max(1, int(nbytes) // 8)  # float32 elements per buffer: 2 buffers * 4 bytes
        self.nbytes = 8 * n
        self.src = torch.rand(n, generator=generator).to(device)
        self.dst = torch.empty_like(self.src)

    def copy(self) -> None:
        self.dst.copy_(self.src)

    def alloc(self) -> None:
        self.src.clone()


def measure_copy_bandwidth(device: torch.device, ctx: Context, nbytes: Optional[int] = None) -> dict:
    """Peak copy bandwidth (bytes read + written per second) of ``dst.copy_(src)`` on a large buffer.

    On CUDA this is the device-to-device copy bandwidth; on CPU, memory bandwidth with the run's
    thread count (buffers far larger than the last-level cache).
    """
    if nbytes is None:
        nbytes = (512 << 20) if device.type == "cuda" else (256 << 20)
        if ctx.quick:
            nbytes //= 4
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(nbytes, free // 4)
    g = torch.Generator().manual_seed(1234)
    floor = CopyFloor(nbytes, device, g)
    warm_up(floor.copy, ctx)
    t = tbench.Timer(stmt="fn()", globals={"fn": floor.copy}, num_threads=ctx.threads)
    m = t.blocked_autorange(min_run_time=max(0.2, ctx.min_run_time))
    best = min(m.times)
    out = {
        "bytes": floor.nbytes,
        "median_ms": m.median * 1e3,
        "GBps_median": floor.nbytes / m.median / 1e9,
        "GBps_peak": floor.nbytes / best / 1e9,
        "method": "dst.copy_(src), bytes = read + written",
    }
    del floor
    return out


# --------------------------------------------------------------------------- peak memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (C++ logging) for the duration; Python errors still propagate."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable) -> int:
    """Peak of (bytes allocated - bytes freed) during ``fn``, from the CPU allocator's profiler events.

    PyTorch's CPU allocator reports every allocation and free to the profiler when
    ``profile_memory=True`` (this includes temporaries inside ATen kernels, inductor buffers and the
    extension's outputs: everything allocated through c10's CPU allocator). We replay the events in
    time order. Frees of blocks allocated before the profiler started are not reported, so callers
    drop such blocks (e.g. old ``.grad``) before calling.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():  # kineto logs a line per profiler start/stop on the C++ side
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation:
            ef = node.extra_fields
            if ef.device.type == "cpu":
                events.append((node.start_time_ns, int(ef.alloc_size)))
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def peak_memory_bytes(fn: Callable, device: torch.device) -> int:
    """Peak memory that one call of ``fn`` allocates above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _cpu_peak_bytes(fn)


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() - memory_allocated() before the call (after reset_peak_memory_stats)",
    "cpu": "torch.profiler(profile_memory=True): the CPU allocator's alloc/free events replayed in time order; "
    "peak of the running sum during one call",
}


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[dict]:
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5
        )
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


_ENV_KEYS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD",
    "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_FREEZING", "TORCHINDUCTOR_MAX_AUTOTUNE",
)


def machine_info(device: torch.device, threads: int) -> dict:
    info = {
        "device": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu_name": None,
        # what changes CPU timings without changing the code: threads, allocator, kernel choice
        "env": {k: os.environ[k] for k in _ENV_KEYS if k in os.environ},
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=p.name,
            gpu_capability=f"{p.major}.{p.minor}",
            gpu_memory_GiB=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def machine_name(m: dict) -> str:
    """One line naming the machine, for tables and the README."""
    if m.get("device") == "cuda" and m.get("gpu_name"):
        return f"{m['gpu_name']} (CUDA {m.get('cuda')}), torch {m.get('torch')}"
    return (
        f"{m.get('cpu_model')} ({m.get('cpu_count')} cores, {m.get('threads')} threads, "
        f"{m.get('torch_cpu_capability')}), torch {m.get('torch')}"
    )


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def ratio(base: Optional[dict], new: Optional[dict]) -> Optional[float]:
    """base time / new time (> 1: new is faster)."""
    if not base or not new:
        return None
    b, n = base.get("median_ms"), new.get("median_ms")
    if not b or not n:
        return None
    return b / n


def mib(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


# --------------------------------------------------------------------------- one case, every implementation


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
    ctx: Context,
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
    ``peak_mem_bytes``) and for each extra set in ``mem_fns`` (``{result key: {impl: fn}}``).
    With ``ctx.cuda_graph`` (and ``graphable``) the timed calls are CUDA-graph replays; peak memory
    is still measured on plain calls.
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    first_call = {}
    for name, fn in fns.items():
        ctx.status(f"{label} {name} warm-up")
        first_call[name] = warm_up(fn, ctx)
    timed = dict(fns)
    floor = None
    if floor_bytes:
        floor = CopyFloor(floor_bytes, ctx.device, generator or torch.Generator().manual_seed(0))
        timed["floor"] = floor.copy
        timed["floor_alloc"] = floor.alloc
        for name in ("floor", "floor_alloc"):
            warm_up(timed[name], ctx)
    if ctx.cuda_graph and graphable and ctx.is_cuda:
        for name in list(timed):
            ctx.status(f"{label} {name} graph capture")
            timed[name] = cuda_graph_replay(timed[name])
            warm_up(timed[name], ctx)
    snap = _cpu_snapshot()
    times = time_interleaved(timed, ctx, label)
    others = other_load(snap, _cpu_snapshot())
    del floor
    out = {"times": times, "first_call_s": first_call, "load_avg_1m": load, "other_cpu_load": others}
    for key, group in {"peak_mem_bytes": fns, **(mem_fns or {})}.items():
        peak = {}
        if ctx.measure_memory:
            for name, fn in group.items():
                ctx.status(f"{label} {name} memory")
                reset()
                peak[name] = peak_memory_bytes(fn, ctx.device)
        out[key] = peak
    reset()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


def op_record(fields: dict, *, times: dict, measured: dict, floor, nbytes: int, peak, check,
              impls, baselines) -> dict:
    """One op benchmark case as stored in the JSON: ``fields`` (the case's sizes) plus the timings,
    speedups, percent of the floor, achieved bandwidth, peak memory and correctness check."""
    rec = dict(fields)
    rec.update({
        "bytes_fused": nbytes,
        "times": times,
        "first_call_s": measured["first_call_s"],
        "load_avg_1m": measured["load_avg_1m"],
        "other_cpu_load": measured["other_cpu_load"],
        "speedup": {b: ratio(times.get(b), times["fused"]) for b in baselines},
        "pct_floor": {k: 100.0 * ratio(floor, times[k]) for k in impls} if floor else {},
        "GBps": {k: nbytes / (times[k]["median_ms"] * 1e-3) / 1e9 for k in (*impls, "floor")},
        "peak_mem_bytes": peak,
        "check": check,
    })
    if peak:
        rec["mem_fused_le"] = {b: peak["fused"] <= peak[b] for b in baselines}
    return rec


def run_benchmark(ctx: Context, progress, bench, **fields) -> dict:
    """Runs every case of a benchmark module (``bench``: NAME, TITLE, IMPLS, BASELINES, cases,
    run_case, case_label), through the progress wrapper when there is one, and returns its JSON
    section: the module's names, then ``fields`` (what the call and the bytes are), then the results."""
    cases = bench.cases(ctx)
    todo = cases if progress is None else progress(cases, bench.NAME, bench.case_label)
    results = [bench.run_case(c, ctx) for c in todo]
    return {"name": bench.NAME, "title": bench.TITLE, "impls": list(bench.IMPLS),
            "baselines": list(bench.BASELINES), **fields, "results": results}
