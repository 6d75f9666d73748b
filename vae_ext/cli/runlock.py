"""One writer per run folder: an exclusive ``flock`` on ``.vae-ext.lock`` inside it.

The kernel drops the lock when the process dies, however it dies (SIGKILL included), so a crashed
run never leaves the folder stuck; a second ``vae-ext`` on the same folder is refused at once, with
the pid of the one that holds it. The lock file stays (removing it would race with a new holder).
Where ``fcntl`` does not exist (Windows) there is no lock.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".vae-ext.lock"


class RunLock:
    """``with RunLock(folder):`` or ``acquire()`` / ``release()``; acquiring twice is a no-op."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None or fcntl is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{self.folder} is in use by another vae-ext run (pid {holder}); wait for it "
                              f"to end or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        self._remove_stale_temporaries()
        return self

    def _remove_stale_temporaries(self) -> None:
        # Holding the lock, no other process writes here: a temporary file left is from a run that
        # was killed mid-write (its rename never came), and the complete file it replaced is intact.
        for p in self.folder.glob(".*.tmp"):
            try:
                p.unlink()
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
