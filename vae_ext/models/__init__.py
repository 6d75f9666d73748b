"""The VAE modules on the fused functional API, one file per family: base.py (``VAE``), mlp.py
(``MLPVAE``), conv.py (``ConvVAE``), conditional.py (the class-conditional side of both), hvae.py and
hvae_blocks.py (``HVAE``, a VDVAE-style hierarchical VAE, ``arch="hvae"``).

``VAE`` is the shared base class and, called directly, the factory::

    model = vae_ext.VAE()                                   # MLPVAE, 784-400-20 (pytorch/examples)
    model = vae_ext.VAE(arch="conv", input_shape=(1, 28, 28))  # ConvVAE
    model = vae_ext.MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(128,), latent_size=8)

    recon, mu, logvar = model(x)                            # what model.criterion expects
    loss = model.criterion(recon, x, mu, logvar)            # summed negative ELBO (FusedELBOLoss)

``num_classes=C`` makes a class-conditional VAE (CVAE): the encoder sees x and the one-hot label y,
the decoder sees z and y, and the prior p(z|y) = N(mu_p(y), exp(logvar_p(y))) is learned (an
embedding of y to 2L values, initialized to N(0, I)). Every method then takes the labels ``y``
(int64, (N,)) and ``forward`` also returns the prior's mean and log-variance for the loss::

    model = vae_ext.VAE(input_shape=(1, 8, 8), num_classes=10)
    recon, mu, logvar, prior_mu, prior_logvar = model(x, y)
    loss = model.criterion(recon, x, mu, logvar, prior_mu=prior_mu, prior_logvar=prior_logvar)

The decoder outputs logits (``decode``); ``forward`` hands the loss what its ``recon`` mode wants:
the logits for ``"bce_logits"`` (the default), ``sigmoid(logits)`` for ``"bce"`` and the raw output
(the Gaussian mean) for ``"mse"``. Training draws z with :func:`vae_ext.reparameterize` and scores it
with :class:`vae_ext.FusedELBOLoss`; ``fused=False`` uses :mod:`vae_ext.reference` for both, for
comparison. All log densities are in nats.
"""
from .base import ARCHS, MODELS, RECON_MODES, VAE, ReferenceELBOLoss
from .conv import ConvVAE
from .hvae import HVAE
from .mlp import MLPVAE

# What VAE(arch=...) builds and the command's --arch offers, the default first. Filled here, where
# every family is imported, so that base.py need not import its subclasses.
ARCHS.update(mlp=MLPVAE, conv=ConvVAE)
MODELS.update(hvae=HVAE)

__all__ = ["VAE", "MLPVAE", "ConvVAE", "HVAE", "ReferenceELBOLoss", "RECON_MODES", "ARCHS", "MODELS"]
