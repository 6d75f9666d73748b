"""Files of a run folder written so that an interruption never leaves half of one: each is written
to a temporary sibling, flushed to disk and renamed into place (``os.replace``)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ._interrupts import deferred

__all__ = ["atomic_write", "write_csv"]


def atomic_write(path, write, mode: str = "wb") -> None:
    """Write a file through ``write(f)`` into a temporary sibling, then rename it into place.

    A signal that arrives meanwhile (``vae_ext.cli._interrupts``) is raised once the file is in place.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with deferred():
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a failed write or fsync (a full disk) names no file: this one's
            e.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(path, columns, rows) -> None:
    """Rows of dicts as CSV (floats to 6 significant digits), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")
