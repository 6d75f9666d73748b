"""pytest's hooks for the vae_ext tests (the shared helpers are in helpers.py).

The tests check the installed package (`pip install .`). `python -m pytest` puts the current folder
first on sys.path, so run from the repository root it would import the source tree, whose `vae_ext`
has no compiled `_C` unless it was built in place (`pip install -e .`). Where the checkout has no
in-place build, its root is taken off sys.path before anything imports vae_ext.
"""
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if not any((_ROOT / "vae_ext").glob("_C*")):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]


@pytest.fixture
def one_thread():
    """torch on one thread for the test (tiny models on a shared machine), restored after it."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _ieee_subnormals():
    """IEEE subnormal numbers in every test. torch 2.4's torch.compile builds its C++ kernels with
    -ffast-math, and loading the first one turns on flush-to-zero for the whole process: from then on
    the property tests' subnormal edge values read as 0 (hypothesis refuses to draw them, a subnormal
    "bce" target below 0 passes the range check as -0.0)."""
    import torch

    torch.set_flush_denormal(False)
    yield
