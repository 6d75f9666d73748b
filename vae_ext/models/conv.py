"""The convolutional VAE (``arch="conv"``): strided convolutions down, transposed ones up."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import VAE, _mlp, _positive_ints

__all__ = ["ConvVAE"]


class ConvVAE(VAE):
    """Convolutional VAE for (N, C, H, W) images of any size >= 2**len(channels).

    Encoder: one 4x4 stride-2 convolution (ReLU) per entry of ``channels``, halving H and W each time,
    then the fully connected ``hidden_sizes`` layers. The decoder mirrors it with transposed
    convolutions (their ``output_padding`` restores odd sizes), ending in C channels of logits
    (for ``recon="dmol"``, the mixture's P channels).
    Conditional (``num_classes > 0``): the one-hot label joins the flattened convolution features
    and z at the decoder's input.
    """

    arch = "conv"

    def __init__(self, input_shape=(1, 28, 28), latent_size: int = 20, hidden_sizes=(256,),
                 channels=(32, 64), recon: str = "bce_logits", fused: bool = True, arch: str | None = None,
                 num_classes: int = 0, free_bits: float = 0.0, mixtures: int | None = None,
                 num_bits: int | None = None):
        super().__init__(input_shape, latent_size, recon, fused, arch, num_classes, free_bits, mixtures, num_bits)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape: ConvVAE expects (C, H, W), got {self.input_shape}")
        self.hidden_sizes = _positive_ints("hidden_sizes", hidden_sizes)
        self.channels = _positive_ints("channels", channels)
        if not self.channels:
            raise ValueError("channels: expected at least one convolution")
        c, h, w = self.input_shape
        sizes = [(h, w)]
        for _ in self.channels:
            sh, sw = sizes[-1]
            if sh < 2 or sw < 2:
                raise ValueError(f"input_shape: {h}x{w} images are too small for {len(self.channels)} "
                                 f"stride-2 convolutions")
            sizes.append((sh // 2, sw // 2))
        chans = (c, *self.channels)
        enc = []
        for a, b in zip(chans[:-1], chans[1:]):
            enc += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.ReLU()]
        self._bottom = (self.channels[-1], *sizes[-1])
        flat = math.prod(self._bottom)
        n_cls = self.num_classes
        enc.append(nn.Flatten())
        if self.hidden_sizes:
            enc.append(_mlp((flat + n_cls, *self.hidden_sizes), last_activation=True))
        self.encoder = nn.Sequential(*enc)
        top = self.hidden_sizes[-1] if self.hidden_sizes else flat + n_cls
        self.fc_mu = nn.Linear(top, self.latent_size)
        self.fc_logvar = nn.Linear(top, self.latent_size)
        self.decoder_fc = _mlp((self.latent_size + n_cls, *reversed(self.hidden_sizes), flat), last_activation=True)
        dec = []
        for i in range(len(self.channels), 0, -1):  # sizes[i] -> sizes[i-1]
            (oh, ow), (ih, iw) = sizes[i - 1], sizes[i]
            out_c = chans[i - 1] if i > 1 else self.output_shape[0]  # P channels for "dmol"
            dec.append(nn.ConvTranspose2d(chans[i], out_c, 4, stride=2, padding=1,
                                          output_padding=(oh - 2 * ih, ow - 2 * iw)))
            if i > 1:
                dec.append(nn.ReLU())
        self.decoder_conv = nn.Sequential(*dec)

    @property
    def config(self) -> dict:
        return {**super().config, "hidden_sizes": list(self.hidden_sizes), "channels": list(self.channels)}

    def _features(self, x, c):
        if c is None:
            return self.encoder(x)
        h = x
        for layer in self.encoder:  # the label joins the features right after the Flatten
            h = layer(h)
            if isinstance(layer, nn.Flatten):
                h = torch.cat([h, c], dim=1)
        return h

    def _decode(self, z):
        return self.decoder_conv(self.decoder_fc(z).view(-1, *self._bottom))
