"""What the compiled extension was built with and which CPU kernels it runs."""
from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

import torch


def _not_built_message(err: ImportError) -> str:
    """Why vae_ext._C is missing, and what to do: the usual cause right after ``pip install .`` is a
    checkout's source folder shadowing the installed package (``python -c``, ``python -m`` and
    ``python -m pytest`` put the current folder first on sys.path)."""
    pkg = Path(__file__).resolve().parent
    root = pkg.parent
    if (root / "setup.py").is_file() and not any(pkg.glob("_C*")):
        others = [p for p in sys.path if Path(p or ".").resolve() != root]
        spec = importlib.machinery.PathFinder.find_spec("vae_ext", others)
        installed = f" (the installed vae_ext is at {Path(spec.origin).parent})" if spec and spec.origin else ""
        return (f"vae_ext: you are importing the source tree at {pkg}, which has no compiled kernels (_C){installed}. "
                f"Run from another folder, or build in place with `pip install -e .` "
                f"(or `python setup.py build_ext --inplace`) in {root}.")
    return (f"vae_ext: the compiled kernels (vae_ext._C) could not be loaded: {err}. Build them against the "
            "installed torch with `pip install .` (in a checkout: `pip install -e .`).")


try:
    from . import _C
except ImportError as e:  # a checkout without the build, or a build for another torch
    raise ImportError(_not_built_message(e)) from e


def cpu_capability() -> str:
    """The CPU kernel variant in use: 'AVX512', 'AVX2' or 'DEFAULT' (scalar-width vectors).

    Chosen at run time from the CPU's features, as ATen chooses its own; the environment variable
    ``ATEN_CPU_CAPABILITY`` (default, avx2, avx512) lowers the choice, as it does for ATen.
    """
    return _C.cpu_capability()


def build_info() -> dict:
    """The build: which backends have kernels and the CPU variant chosen at run time."""
    return {
        "cuda_kernels": bool(_C.has_cuda()),
        "cpu_capability": cpu_capability(),
        "torch": torch.__version__,
    }
