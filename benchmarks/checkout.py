"""Which vae_ext the scripts in benchmarks/ import: this checkout's when it is built in place."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prefer_built_checkout() -> None:
    """Put the checkout on ``sys.path`` (after benchmarks/) when it holds a built ``vae_ext/_C*``
    (``python setup.py build_ext --inplace``). Otherwise the installed vae_ext (``pip install .``) is
    imported: the checkout's sources alone cannot import."""
    if any((ROOT / "vae_ext").glob("_C*")):
        # ahead of site-packages even where a .pth file already lists the checkout after them
        while str(ROOT) in sys.path:
            sys.path.remove(str(ROOT))
        sys.path.insert(1, str(ROOT))
