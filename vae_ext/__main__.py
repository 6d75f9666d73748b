"""``python -m vae_ext``: the ``vae-ext`` command (also under ``torchrun -m vae_ext``)."""
import sys

from .cli import main

sys.exit(main())
