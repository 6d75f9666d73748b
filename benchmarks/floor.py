"""The copy floor: a copy of as many bytes as an op must move, and the machine's copy bandwidth."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils import benchmark as tbench

from timing import warm_up


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


def measure_copy_bandwidth(settings, nbytes: Optional[int] = None) -> dict:
    """Peak copy bandwidth (bytes read + written per second) of ``dst.copy_(src)`` on a large buffer.

    On CUDA this is the device-to-device copy bandwidth; on CPU, memory bandwidth with the run's
    thread count (buffers far larger than the last-level cache).
    """
    device = settings.device
    if nbytes is None:
        nbytes = (512 << 20) if device.type == "cuda" else (256 << 20)
        if settings.quick:
            nbytes //= 4
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(nbytes, free // 4)
    floor = CopyFloor(nbytes, device, torch.Generator().manual_seed(1234))
    warm_up(floor.copy, settings)
    t = tbench.Timer(stmt="fn()", globals={"fn": floor.copy}, num_threads=settings.threads)
    m = t.blocked_autorange(min_run_time=max(0.2, settings.min_run_time))
    return {
        "bytes": floor.nbytes,
        "median_ms": m.median * 1e3,
        "GBps_median": floor.nbytes / m.median / 1e9,
        "GBps_peak": floor.nbytes / min(m.times) / 1e9,
        "method": "dst.copy_(src), bytes = read + written",
    }
