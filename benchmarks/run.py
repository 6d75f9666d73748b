#!/usr/bin/env python
"""Run the vae_ext benchmarks: the same as ``vae-ext bench`` (see ``--help`` and docs/benchmarks.md).

    python benchmarks/run.py --quick
    python benchmarks/run.py --only loss --out benchmarks/results/cpu.json
"""
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# Prefer this checkout when it is built in place (python setup.py build_ext --inplace); otherwise
# use the installed vae_ext (pip install .), since the checkout's sources alone cannot import.
if any((_ROOT / "vae_ext").glob("_C*")):
    sys.path.insert(0, str(_ROOT))

from vae_ext.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/run.py"))
