"""What the compiled extension was built with and which CPU kernels it runs."""
from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as e:  # a checkout without the build, or a build for another torch
    raise ImportError(
        f"vae_ext: the compiled kernels (vae_ext._C) could not be loaded: {e}. Build them against the "
        "installed torch with `pip install .` (in a checkout: `python setup.py build_ext --inplace`)."
    ) from e


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
