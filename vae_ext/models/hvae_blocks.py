"""The layers of the hierarchical VAE (``models/hvae.py``), in VDVAE's way (openai/vdvae ``vae.py``):
a bottleneck residual ``Block``, the bottom-up ``Encoder`` and the top-down ``LatentLayer`` whose
posterior and prior both go through one :func:`vae_ext.gaussian_latent` call.

Everything is written for (N, C, R, R) feature maps of one ``width`` at every resolution R.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import reference
from ..functional import reparameterize
from ..latent import gaussian_latent

__all__ = ["Block", "Encoder", "LatentLayer", "resolutions_for"]


def resolutions_for(height: int, width: int) -> tuple:
    """The resolutions, bottom-up: the image padded to a square power of two S (28 -> 32, 8 -> 8), then
    halved down to 4, then 1 (32, 16, 8, 4, 1; 8, 4, 1), VDVAE's ladder."""
    s = 1 << max(0, math.ceil(math.log2(max(height, width))))
    res = [s]
    while res[-1] > 4:
        res.append(res[-1] // 2)
    if res[-1] > 1:
        res.append(1)
    return tuple(res)


def _conv(cin: int, cout: int, k3: bool, zero: bool = False) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3 if k3 else 1, padding=1 if k3 else 0)
    if zero:  # VDVAE's zero_last: the block starts as the identity of its residual (or as zeros)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


class Block(nn.Module):
    """GELU then 1x1 -> 3x3 -> 3x3 -> 1x1 convolutions through a ``middle``-wide bottleneck (VDVAE's
    Block); 1x1 instead of the 3x3s at resolutions <= 2. ``residual`` adds the input."""

    def __init__(self, cin: int, middle: int, cout: int, *, residual: bool, k3: bool, zero_last: bool = False,
                 last_scale: float = 1.0):
        super().__init__()
        self.residual = residual
        self.c1 = _conv(cin, middle, False)
        self.c2 = _conv(middle, middle, k3)
        self.c3 = _conv(middle, middle, k3)
        self.c4 = _conv(middle, cout, False, zero=zero_last)
        if last_scale != 1.0:
            with torch.no_grad():
                self.c4.weight.mul_(last_scale)

    def forward(self, x):
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        return x + h if self.residual else h


class Encoder(nn.Module):
    """Bottom-up: a 3x3 convolution from the image channels to ``width``, then at each resolution
    ``layers[r]`` residual blocks, the activation kept for the top-down pass, and an average pool down
    to the next resolution. Returns {resolution: activation}."""

    def __init__(self, channels: int, width: int, middle: int, resolutions, layers: dict):
        super().__init__()
        self.resolutions = tuple(resolutions)
        self.in_conv = nn.Conv2d(channels, width, 3, padding=1)
        n = sum(layers.values())
        scale = math.sqrt(1.0 / max(1, n))
        self.stages = nn.ModuleList(
            nn.Sequential(*(Block(width, middle, width, residual=True, k3=r > 2, last_scale=scale)
                            for _ in range(layers[r])))
            for r in self.resolutions)

    def forward(self, x):
        h = self.in_conv(x)
        acts = {}
        for i, (r, stage) in enumerate(zip(self.resolutions, self.stages)):
            h = stage(h)
            acts[r] = h
            if i + 1 < len(self.resolutions):
                h = F.avg_pool2d(h, kernel_size=r // self.resolutions[i + 1])
        return acts


class LatentLayer(nn.Module):
    """One top-down latent layer (VDVAE's DecBlock): from the state x,
    ``prior(x)`` -> (prior mean, prior log sigma, a state update), ``q(cat(x, act))`` -> (mean, log sigma),
    z ~ q with KL(q || p) in one :func:`vae_ext.gaussian_latent` call (``scale="logsigma"``, the four
    inputs channel slices of the two convolutions' outputs, read in place), then
    ``x + proj(z)`` through a residual block.
    """

    def __init__(self, width: int, middle: int, zdim: int, res: int, num_layers: int):
        super().__init__()
        k3 = res > 2
        self.zdim, self.res = zdim, res
        self.q = Block(2 * width, middle, 2 * zdim, residual=False, k3=k3)
        self.prior = Block(width, middle, 2 * zdim + width, residual=False, k3=k3, zero_last=True)
        scale = math.sqrt(1.0 / num_layers)
        self.z_proj = _conv(zdim, width, False)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)
        self.resnet = Block(width, middle, width, residual=True, k3=k3, last_scale=scale)

    def _prior(self, x):
        feats = self.prior(x)
        z = self.zdim
        return feats[:, :z], feats[:, z:2 * z], x + feats[:, 2 * z:]

    def _finish(self, x, z):
        return self.resnet(x + self.z_proj(z))

    def forward(self, x, act, *, fused: bool, kl: str = "analytic", generator=None, mean: bool = False):
        """(new state, z, per-sample KL (N,)). ``mean``: z = q's mean (no draw; the KL is analytic)."""
        qm, qv = self.q(torch.cat([x, act], dim=1)).chunk(2, dim=1)
        pm, pv, x = self._prior(x)
        if fused:
            z, kl_n = gaussian_latent(qm, qv, pm, pv, scale="logsigma", kl=kl, reduction="none",
                                      generator=generator)
        else:
            # the fused op's own draws (Philox stream, same generator state), so the two paths agree
            _, eps = reparameterize(qm.detach(), qv.detach(), generator=generator, return_eps=True)
            z, kl_n = reference.gaussian_latent(qm, qv, pm, pv, scale="logsigma", kl=kl, reduction="none", eps=eps)
        if mean:
            z = qm
        return self._finish(x, z), z, kl_n

    def sample(self, x, *, temperature: float, fused: bool, generator=None):
        """The state after drawing z from the prior with its sigma scaled by ``temperature`` (VDVAE's
        ``pv + log t``); t = 0 takes the prior's mean."""
        pm, pv, x = self._prior(x)
        if temperature == 0:
            return self._finish(x, pm)
        pv = pv + math.log(temperature)
        if fused:
            z, _ = gaussian_latent(pm, pv, scale="logsigma", generator=generator)
        else:
            _, eps = reparameterize(pm, pv, generator=generator, return_eps=True)
            z, _ = reference.gaussian_latent(pm, pv, scale="logsigma", eps=eps)
        return self._finish(x, z)
