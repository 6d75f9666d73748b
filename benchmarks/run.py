#!/usr/bin/env python
"""Run the vae_ext benchmarks: the same as ``vae-ext bench`` (see ``--help`` and docs/benchmarks.md).

    python benchmarks/run.py --quick
    python benchmarks/run.py --only loss --out benchmarks/results/cpu.json
"""
import sys
from pathlib import Path

# Prefer this checkout (built in place with `python setup.py build_ext --inplace`) over an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_ext.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/run.py"))
