"""vae_ext: fused C++/CUDA kernels for Variational Autoencoders, as PyTorch custom ops.

    import vae_ext
    loss_fn = vae_ext.FusedELBOLoss()              # drop-in for the classic loss_function
    z = vae_ext.reparameterize(mu, logvar)         # fused sampling, eps drawn in the kernel
"""
from __future__ import annotations

import warnings

# vae_ext needs torch alone. Where numpy is absent (torch does not require it), the first import of
# torch warns "Failed to initialize NumPy"; nothing here uses numpy, so that warning is noise here
# (and would sit above the one line that the `vae-ext` command prints about its missing extra).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from . import reference
from ._build import build_info, cpu_capability
from .dmol import dmol_nll, dmol_sample
from .functional import elbo_loss, gaussian_kl, reparameterize
from .latent import gaussian_latent
from .losses import FusedELBOLoss

__version__ = "0.1.0"

__all__ = [
    "FusedELBOLoss",
    "elbo_loss",
    "gaussian_kl",
    "gaussian_latent",
    "reparameterize",
    "dmol_nll",
    "dmol_sample",
    "reference",
    "build_info",
    "cpu_capability",
    "__version__",
]


def __getattr__(name):  # lazy: the models pull in more than the ops do
    if name in ("VAE", "MLPVAE", "ConvVAE"):
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'vae_ext' has no attribute {name!r}")
