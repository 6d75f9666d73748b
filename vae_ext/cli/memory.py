"""How much memory the command lets a data file or a checkpoint's model take, and the check that
refuses more before anything is allocated or inflated.

The limit is :data:`LIMIT_FRACTION` of the memory available now (``MemAvailable`` in /proc/meminfo,
or less where a cgroup limit is tighter), or the value of the environment variable
``VAE_EXT_MEMORY_LIMIT`` (bytes, or with a binary suffix: ``512M``, ``4G``, ``1.5T``). Where neither
is known there is no limit.
"""
from __future__ import annotations

import os
import re

from .errors import ConfigError, DataError

__all__ = ["ENV_VAR", "LIMIT_FRACTION", "memory_limit", "check_fits", "format_bytes"]

ENV_VAR = "VAE_EXT_MEMORY_LIMIT"
LIMIT_FRACTION = 0.8  # the rest: the interpreter, torch, the model, the optimizer, the OS
_SUFFIXES = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_bytes() -> int | None:
    """Memory this process can still take: the smaller of MemAvailable and the cgroup's headroom."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    cg_max, cg_cur = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if cg_max is not None and cg_cur is not None:
        found.append(max(cg_max - cg_cur, 0))
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def memory_limit() -> tuple:
    """(limit in bytes or None, where it comes from)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if text:
        m = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)i?B?", text, flags=re.IGNORECASE)
        if not m or float(m.group(1)) <= 0:
            raise ConfigError(f"{ENV_VAR}={text!r}: expected a size in bytes, e.g. 4G or 512M")
        return int(float(m.group(1)) * _SUFFIXES[m.group(2).upper()]), f"{ENV_VAR}={text}"
    avail = available_bytes()
    if avail is None:
        return None, "unknown"
    return int(avail * LIMIT_FRACTION), f"{LIMIT_FRACTION:.0%} of the memory available now; {ENV_VAR} overrides it"


def format_bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def check_fits(nbytes: int, what: str, error=DataError) -> None:
    """Raise ``error`` (one line, naming ``what``) if ``nbytes`` exceed the memory limit."""
    limit, source = memory_limit()
    if limit is not None and nbytes > limit:
        raise error(f"{what} would need about {format_bytes(nbytes)} of memory, more than the "
                    f"{format_bytes(limit)} allowed ({source})")
