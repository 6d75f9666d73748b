"""How freed CPU memory is reused (glibc ``mallopt``), set once per run, the same for every implementation."""
from __future__ import annotations

import os

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4

MODES = {
    "retain": "freed memory stays in the process for reuse (glibc mallopt: M_MMAP_MAX=0, "
    "M_TRIM_THRESHOLD=2 GiB), as a caching allocator would do: no page faults after warm-up",
    "fresh": "every block of 256 KiB or more is new pages from mmap (M_MMAP_THRESHOLD=M_TRIM_THRESHOLD="
    "256 KiB): each such allocation pays its page faults",
    "glibc": "glibc's defaults, untouched: blocks above a dynamic threshold (at most 32 MiB) are new pages "
    "on every allocation, smaller ones are reused; which one a block gets depends on the heap's history",
}


def configure(mode: str) -> dict:
    """Make CPU allocation behave the same way for every implementation and every case.

    With glibc's defaults a tensor larger than the (dynamic, at most 32 MiB) mmap threshold is fresh
    pages on every allocation, and its page faults can cost several times the kernel itself, unless
    the heap happens to hold a free block large enough: the same op then runs 4x faster or slower
    depending on what ran before. ``retain`` (the default) keeps freed memory for reuse, so the
    timings are the kernels'; ``fresh`` makes every large allocation pay its page faults. Applies to
    the whole process, once; with another malloc (LD_PRELOAD) it does nothing.
    """
    info = {"mode": mode, "applied": False, "description": MODES.get(mode, "")}
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
        raise ValueError(f"cpu allocator mode: expected one of {', '.join(MODES)}, got {mode!r}")
    info["applied"] = bool(ok)
    if os.environ.get("LD_PRELOAD"):
        info["note"] = f"LD_PRELOAD={os.environ['LD_PRELOAD']}: mallopt reaches glibc's malloc only"
    return info
