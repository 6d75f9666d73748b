"""Errors the ``vae-ext`` command reports as one line (no traceback).

Everything the user can get wrong (a data file, an option value, a checkpoint, a device) raises a
subclass of :class:`VaeExtError` whose message names the problem; ``vae_ext.cli.main`` prints it
to stderr and exits non-zero. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

__all__ = ["VaeExtError", "DataError", "ConfigError", "CheckpointError", "DeviceError"]


class VaeExtError(Exception):
    """A problem with the user's input, reported by the CLI as one line."""


class DataError(VaeExtError):
    """A missing, malformed or unsuitable data file."""


class ConfigError(VaeExtError):
    """An option value that cannot work (or conflicts with a checkpoint being resumed)."""


class CheckpointError(VaeExtError):
    """A checkpoint that is missing, unreadable or from another configuration."""


class DeviceError(VaeExtError):
    """A device that is not there (``cuda`` without CUDA) or has no vae_ext kernels."""
