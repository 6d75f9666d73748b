"""The ``vae-ext`` command (also ``python -m vae_ext``): train | eval | sweep, with its data, checkpoints
and plots, one job per module. The library (``vae_ext`` above this folder) never imports from here.

The command needs the ``cli`` extra (:data:`CLI_REQUIREMENTS`); importing this package does not.
"""
from .command import CLI_REQUIREMENTS, build_parser, main

__all__ = ["main", "build_parser", "CLI_REQUIREMENTS"]
