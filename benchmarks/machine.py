"""Facts about the machine and the checkout a run is on, and how busy other processes keep its CPUs."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> Optional[dict]:
    """The checkout's commit and whether tracked files differ from it (None outside a git checkout)."""
    root = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


_ENV_KEYS = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATEN_CPU_CAPABILITY", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD",
    "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "CUDA_VISIBLE_DEVICES",
    "PYTORCH_CUDA_ALLOC_CONF", "TORCHINDUCTOR_FREEZING", "TORCHINDUCTOR_MAX_AUTOTUNE", "VAE_EXT_HUGE_PAGES",
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


def cpu_snapshot() -> Optional[tuple]:
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


def other_load_now(seconds: float = 0.5) -> Optional[float]:
    """Cores kept busy by other processes over the next ``seconds`` (this process sleeps meanwhile)."""
    before = cpu_snapshot()
    time.sleep(seconds)
    return other_load(before, cpu_snapshot())


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")
