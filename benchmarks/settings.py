"""What every benchmark needs to know about a run: the Settings built from run.py's options."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def csv(text: str) -> List[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


@dataclass
class Settings:
    """One run's settings (named apart from the library's own classes)."""

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
    cpu_allocator: str = "retain"  # the --cpu-allocator mode in effect ("glibc" where it could not be applied)
    sizes: Dict[str, list] = field(default_factory=dict)  # --sizes overrides, parsed per benchmark
    recon_modes: List[str] = field(default_factory=lambda: ["bce", "bce_logits"])
    models: List[str] = field(default_factory=lambda: ["mlp", "conv"])
    adam: str = "default"  # step benchmark: "default", "foreach" or "fused"
    cuda_graph: bool = False  # op benchmarks on CUDA: time replays of one captured call (device time)
    seed: int = 0
    glibc_process: bool = False  # op benchmarks on CPU: each case again in a fresh process, glibc defaults
    glibc_child: bool = False  # this process is that fresh process (glibc_process.py): time, nothing else

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device, sizes: Dict[str, list]) -> "Settings":
        """The options' values, with --quick's defaults for those not given. Exits on an unknown dtype."""
        dtypes = []
        for d in args.dtype or ["float32"]:
            for name in csv(d):
                if name not in DTYPES:
                    raise SystemExit(f"--dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
                dtypes.append(DTYPES[name])
        quick = args.quick
        return cls(
            device=device,
            dtypes=dtypes,
            quick=quick,
            rounds=args.rounds or (2 if quick else 5),
            min_run_time=args.min_run_time if args.min_run_time is not None else (0.03 if quick else 0.2),
            warmup_time=args.warmup if args.warmup is not None else (0.05 if quick else 0.3),
            threads=torch.get_num_threads(),
            compile_mode=args.compile_mode,
            compile_backend=args.compile_backend,
            measure_memory=not args.no_memory,
            cpu_allocator=args.cpu_allocator,
            sizes=sizes,
            recon_modes=csv(args.recon),
            models=csv(args.models) if args.models else (["mlp"] if quick else ["mlp", "conv"]),
            adam=args.adam,
            cuda_graph=args.cuda_graph,
            seed=args.seed,
            glibc_process=device.type == "cpu" and args.glibc_process and args.cpu_allocator != "glibc",
        )

    def as_json(self) -> dict:
        """The run's settings as the JSON records them."""
        return {
            "quick": self.quick,
            "device": str(self.device),
            "dtypes": [dtype_name(d) for d in self.dtypes],
            "threads": self.threads,
            "rounds": self.rounds,
            "min_run_time_s": self.min_run_time,
            "warmup_s": self.warmup_time,
            "compile_mode": self.compile_mode or "default",
            "compile_backend": self.compile_backend,
            "compile_dynamic": False,
            "seed": self.seed,
            "recon_modes": self.recon_modes,
            "models": self.models,
            "adam": self.adam,
            "cuda_graph": self.cuda_graph,
            "glibc_process": self.glibc_process,
            "timer": "torch.utils.benchmark.Timer.blocked_autorange, interleaved rounds; median over all blocks",
        }
