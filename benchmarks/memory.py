"""Peak memory of one call, above what was allocated before it.

CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation events that PyTorch's CPU allocator
reports to ``torch.profiler`` (``profile_memory=True``), replayed in time order.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Callable

import torch


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _cpu_peak_bytes(fn)


MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() - memory_allocated() before the call (after reset_peak_memory_stats)",
    "cpu": "torch.profiler(profile_memory=True): the CPU allocator's alloc/free events replayed in time order; "
    "peak of the running sum during one call",
}
