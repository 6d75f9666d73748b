#!/usr/bin/env python
"""One CPU case measured as a user's script gets it: a fresh process under glibc's malloc defaults.

The run itself keeps freed memory for reuse (``--cpu-allocator retain``, mallopt, which lasts for the
whole process), so its figures are the kernels'. A user's process has glibc's defaults, where a large
block may be new pages on every call, depending on the heap's history. This module starts
``python benchmarks/glibc_process.py`` per case, with no ``MALLOC_*`` variable and no
``GLIBC_TUNABLES`` in its environment: the child imports torch and vae_ext, builds the case's inputs
as the run does, warms up fused, eager and compiled implementations in that one process and times
them interleaved (fewer rounds than the run: ``child_rounds``), with the minor page faults per call
of each, and prints them as JSON.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900


def child_rounds(rounds: int) -> int:
    """The child's timing rounds: half the run's (it compiles the reference again)."""
    return max(1, rounds // 2)


def _encode_case(case: dict) -> dict:
    from settings import dtype_name

    return {k: (dtype_name(v) if k == "dtype" else list(v) if isinstance(v, tuple) else v) for k, v in case.items()}


def _decode_case(case: dict) -> dict:
    from settings import DTYPES

    return {k: (DTYPES[v] if k == "dtype" else tuple(v) if isinstance(v, list) else v) for k, v in case.items()}


def child_env() -> dict:
    """The environment without what would change glibc's malloc settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def measure(bench: str, case: dict, settings) -> dict:
    """Times ``case`` of benchmark ``bench`` in a fresh process; returns the record's ``glibc_process``:
    times (with ``minflt_per_call``) and speedups, or ``error``."""
    spec = {"bench": bench, "case": _encode_case(case), "threads": settings.threads,
            "rounds": child_rounds(settings.rounds), "min_run_time": settings.min_run_time,
            "warmup": settings.warmup_time, "compile_mode": settings.compile_mode,
            "compile_backend": settings.compile_backend, "seed": settings.seed}
    cmd = [sys.executable, str(HERE / "glibc_process.py"), json.dumps(spec)]
    try:
        out = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {TIMEOUT_S} s"}
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        tail = (out.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {out.returncode}: {tail[0]}"}
    rec = json.loads(lines[-1])
    rec["rounds"] = spec["rounds"]
    return rec


def main(spec_json: str) -> int:
    from checkout import prefer_built_checkout

    prefer_built_checkout()
    import torch

    import dmol
    import latent
    import loss
    import objectives
    import reparameterize
    import step
    from measure import configure_dynamo
    from settings import Settings

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    configure_dynamo()
    settings = Settings(device=torch.device("cpu"), dtypes=[], rounds=spec["rounds"],
                        min_run_time=spec["min_run_time"], warmup_time=spec["warmup"],
                        threads=torch.get_num_threads(), compile_mode=spec["compile_mode"],
                        compile_backend=spec["compile_backend"], measure_memory=False, cpu_allocator="glibc",
                        seed=spec["seed"], glibc_child=True)
    benches = {m.NAME: m for m in (loss, objectives, reparameterize, dmol, latent, step)}
    rec = benches[spec["bench"]].run_case(_decode_case(spec["case"]), settings)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main(sys.argv[1]))
