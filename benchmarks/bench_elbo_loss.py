#!/usr/bin/env python
"""The `loss` benchmark alone: `python benchmarks/run.py --only loss` (same options, see --help)."""
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if any((_ROOT / "vae_ext").glob("_C*")):  # built in place: prefer this checkout (see run.py)
    sys.path.insert(0, str(_ROOT))

from vae_ext.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--only", "loss", *sys.argv[1:]], prog="python benchmarks/run.py"))
