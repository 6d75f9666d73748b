"""The fully connected VAE (``arch="mlp"``, the default): pytorch/examples' 784-400-20 and its kin."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import VAE, _mlp, _positive_ints

__all__ = ["MLPVAE"]


class MLPVAE(VAE):
    """Fully connected VAE (pytorch/examples: 784-400-20-400-784 with ReLU).

    Args:
        input_shape: image shape, e.g. (1, 28, 28), or the number of features.
        latent_size: dimension of z.
        hidden_sizes: encoder hidden layers; the decoder mirrors them.
        recon: the loss's reconstruction mode (``"bce_logits"``, ``"bce"``, ``"mse"``).
        fused: True for the vae_ext kernels, False for vae_ext.reference.
        num_classes: C > 0 for a class-conditional VAE (the one-hot label joins the encoder's input
            and z at the decoder's input); 0 (default) for the plain VAE.
        free_bits: the training loss's free-bits floor, nats per latent unit (``criterion``).
        mixtures, num_bits: for ``recon="dmol"`` only: the mixture's components (default 10) and
            the data's bits (default 8); the decoder then outputs 3 * mixtures values per pixel.
    """

    arch = "mlp"

    def __init__(self, input_shape=(1, 28, 28), latent_size: int = 20, hidden_sizes=(400,),
                 recon: str = "bce_logits", fused: bool = True, arch: str | None = None, num_classes: int = 0,
                 free_bits: float = 0.0, mixtures: int | None = None, num_bits: int | None = None):
        super().__init__(input_shape, latent_size, recon, fused, arch, num_classes, free_bits, mixtures, num_bits)
        self.hidden_sizes = _positive_ints("hidden_sizes", hidden_sizes)
        if not self.hidden_sizes:
            raise ValueError("hidden_sizes: expected at least one hidden layer")
        h = self.hidden_sizes
        c = self.num_classes
        self.encoder = nn.Sequential(nn.Flatten(), _mlp((self.in_features + c, *h), last_activation=True))
        self.fc_mu = nn.Linear(h[-1], self.latent_size)
        self.fc_logvar = nn.Linear(h[-1], self.latent_size)
        self.decoder = _mlp((self.latent_size + c, *reversed(h), math.prod(self.output_shape)),
                            last_activation=False)

    @property
    def config(self) -> dict:
        return {**super().config, "hidden_sizes": list(self.hidden_sizes)}

    def _features(self, x, c):
        if c is not None:  # the label joins the flattened image (Flatten leaves the 2-d result as it is)
            x = torch.cat([x.flatten(1), c], dim=1)
        return self.encoder(x)

    def _decode(self, z):
        return self.decoder(z)
