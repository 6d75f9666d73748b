"""A small VDVAE-style hierarchical VAE (``arch="hvae"``, ``vae-ext train --model hvae``) on images
with a discretized-mixture-of-logistics likelihood.

Bottom-up, the image (padded to a square power of two: 28 -> 32, 8 -> 8) runs through residual
blocks over the resolutions S, S/2, ..., 4, 1 (``Encoder``). Top-down, from a learned state at 1x1,
``layers`` latent layers per resolution (``LatentLayer``, VDVAE's DecBlock) each compute the prior
p(z_l | z_<l) from the state and the posterior q(z_l | x, z_<l) from the state and the encoder's
activation, draw z_l and the KL in one :func:`vae_ext.gaussian_latent` call (VDVAE's
``scale="logsigma"``), and fold z_l into the state; at each new resolution the state is upsampled
(nearest) and added to a learned bias map. A 1x1 convolution turns the last state into the mixture's
parameters, cropped to the image, scored by :func:`vae_ext.dmol_nll`.

``fused=False`` runs both objectives through :mod:`vae_ext.reference` with the fused op's own noise
(the same Philox draws), so the two models train alike from the same seed::

    model = vae_ext.models.HVAE(input_shape=(1, 28, 28), width=32, layers=2)
    loss, stats = model.loss(x)        # x in [-1, 1] on the 8-bit grid; loss summed over the batch
    loss.backward()                    # stats: rec, kl (sums), layer_kl (each layer's batch mean)
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import reference
from ..dmol import dmol_nll, dmol_sample
from .base import VAE, _positive_ints
from .dmol import to_grid
from .hvae_blocks import Encoder, LatentLayer, resolutions_for

__all__ = ["HVAE", "DEFAULT_WIDTH", "DEFAULT_LAYERS", "DEFAULT_ZDIM", "SAMPLE_TEMPERATURES"]

DEFAULT_WIDTH, DEFAULT_LAYERS, DEFAULT_ZDIM = 16, 1, 4
# samples.png's rows (VDVAE draws its samples at temperatures 1.0 down to 0.1)
SAMPLE_TEMPERATURES = (1.0, 0.85, 0.7, 0.5)


class HVAE(VAE):
    """Hierarchical VAE for (C, H, W) images, C = 1 or 3, data in [-1, 1] on the ``num_bits`` grid.

    Args:
        input_shape: (C, H, W).
        width: channels of every feature map (the bottleneck of a block is a quarter of it, at least 4).
        layers: latent layers per resolution (and residual blocks per resolution in the encoder).
        latent_size: channels of each latent layer's z (VDVAE's zdim).
        mixtures, num_bits: the likelihood's logistics per pixel and the data's grid.
        fused: the fused kernels (default) or, ``False``, :mod:`vae_ext.reference`.

    Training: ``loss, stats = model.loss(x)`` (or ``model(x)``, which DistributedDataParallel wraps):
    the negative ELBO summed over the batch, ``criterion.beta`` weighing the KL.
    """

    arch = "hvae"
    hierarchical = True

    def __init__(self, input_shape=(1, 28, 28), width: int = DEFAULT_WIDTH, layers: int = DEFAULT_LAYERS,
                 latent_size: int = DEFAULT_ZDIM, recon: str = "dmol", fused: bool = True, arch: str | None = None,
                 num_classes: int = 0, free_bits: float = 0.0, mixtures: int | None = None,
                 num_bits: int | None = None):
        if recon != "dmol":
            raise ValueError(f"recon: the hierarchical VAE's likelihood is 'dmol', got {recon!r}")
        if num_classes:
            raise ValueError(f"num_classes: the hierarchical VAE is not class-conditional, got {num_classes!r}")
        if free_bits:
            raise ValueError(f"free_bits: the hierarchical VAE has no free bits, got {free_bits!r}")
        super().__init__(input_shape, latent_size, recon, fused, arch, 0, 0.0, mixtures, num_bits)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape: HVAE expects (C, H, W), got {self.input_shape}")
        (self.width,) = _positive_ints("width", (width,))
        (self.layers,) = _positive_ints("layers", (layers,))
        c, h, w = self.input_shape
        self.resolutions = resolutions_for(h, w)
        self.size = self.resolutions[0]
        middle = max(4, self.width // 4)
        per_res = {r: self.layers for r in self.resolutions}
        self.encoder = Encoder(c, self.width, middle, self.resolutions, per_res)
        top_down = tuple(reversed(self.resolutions))
        n = len(top_down) * self.layers
        self.latent_layers = nn.ModuleList(LatentLayer(self.width, middle, self.latent_size, r, n)
                                           for r in top_down for _ in range(self.layers))
        self.bias_xs = nn.ParameterList(nn.Parameter(torch.zeros(1, self.width, r, r)) for r in top_down)
        self.gain = nn.Parameter(torch.ones(1, self.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, self.width, 1, 1))
        self.out_conv = nn.Conv2d(self.width, self.output_shape[0], 1)

    # ------------------------------------------------------------------ description

    @property
    def config(self) -> dict:
        return {**super().config, "width": self.width, "layers": self.layers}

    @property
    def layer_resolutions(self) -> tuple:
        """The resolution of each latent layer, in the top-down order of ``layer_kl``."""
        return tuple(layer.res for layer in self.latent_layers)

    def encoder_parameters(self):
        yield from self.encoder.parameters()
        for layer in self.latent_layers:
            yield from layer.q.parameters()

    @property
    def beta(self) -> float:
        return self.criterion.beta

    # ------------------------------------------------------------------ the passes

    def _pad(self, x):
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.size - w, 0, self.size - h))

    def _output(self, state):
        h, w = self.input_shape[1:]
        return self.out_conv(state * self.gain + self.bias)[..., :h, :w]

    def _states(self, n: int):
        """Yields (layer, state-or-None) top-down: the state is handed over at each new resolution."""
        i = 0
        state = None
        for k, r in enumerate(reversed(self.resolutions)):
            bias = self.bias_xs[k].expand(n, -1, -1, -1)
            if state is None:
                state = bias
            else:
                state = bias + F.interpolate(state, scale_factor=r // state.shape[-1], mode="nearest")
            for _ in range(self.layers):
                state = yield self.latent_layers[i], state
                i += 1
        yield None, state

    def _run(self, x, *, kl: str = "analytic", generator=None, mean: bool = False):
        """Decoder output (N, P, H, W) and the KL of each layer, (N, L)."""
        x = self._as_images(x)
        acts = self.encoder(self._pad(x))
        gen = self._states(x.shape[0])
        layer, state = next(gen)
        kls = []
        while layer is not None:
            state, _, kl_n = layer(state, acts[layer.res], fused=self.fused, kl=kl, generator=generator, mean=mean)
            kls.append(kl_n)
            layer, state = gen.send(state)
        return self._output(state), torch.stack(kls, dim=1)

    def _nll(self, params, x):
        fn = dmol_nll if self.fused else reference.dmol_nll
        return fn(params, x.reshape(params.shape[0], *self.input_shape), num_bits=self.num_bits, reduction="none")

    def forward(self, x: torch.Tensor, y=None):
        """``(loss, stats)``: the negative ELBO summed over the batch (KL weighted by ``beta``), and the
        detached ``rec`` and ``kl`` sums and ``layer_kl``, each layer's KL averaged over the batch (L,)."""
        if y is not None:
            raise ValueError("y: the hierarchical VAE is not class-conditional")
        x = self._as_images(x)
        params, kls = self._run(x, generator=self.generator)
        rec = self._nll(params, x).sum()
        kl = kls.sum()
        loss = rec + self.beta * kl
        return loss, {"rec": rec.detach(), "kl": kl.detach(), "layer_kl": kls.detach().mean(0)}

    def loss(self, x: torch.Tensor, beta: float | None = None, *, y=None):
        """``(loss, stats)`` of a batch (see ``forward``); ``beta`` sets ``criterion.beta`` first."""
        if beta is not None:
            self.criterion.beta = float(beta)
        return self(x, y)

    # ------------------------------------------------------------------ using it

    def elbo(self, x: torch.Tensor, generator: torch.Generator | None = None, return_terms: bool = False, *, y=None,
             return_layer_kl: bool = False):
        """The ELBO per image (N,) in nats, one draw of every layer; with ``return_terms``
        ``(elbo, log_px_z, kl)``; with ``return_layer_kl`` also each layer's KL, (N, L)."""
        if y is not None:
            raise ValueError("y: the hierarchical VAE is not class-conditional")
        x = self._as_images(x)
        params, kls = self._run(x, generator=generator)
        log_px_z = -self._nll(params, x)
        kl = kls.sum(1)
        out = (log_px_z - kl, log_px_z, kl) if return_terms else (log_px_z - kl,)
        out = out + (kls,) if return_layer_kl else out
        return out if len(out) > 1 else out[0]

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int = 100, *, y=None, generator: torch.Generator | None = None,
                       max_elements: int = 1 << 23) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) per image (N,), nats: ``log (1/k) sum_i p(x|z_i) / w_i``
        with ``log w_i = sum_l log q(z_l|x, z_<l) - log p(z_l|z_<l)``, each layer's
        :func:`vae_ext.gaussian_latent` with ``kl="sample"`` at the drawn z. Chunks of the k draws run
        as one batch of at most ``max_elements`` decoder outputs."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected an int >= 1, got {k!r}")
        if y is not None:
            raise ValueError("y: the hierarchical VAE is not class-conditional")
        x = self._as_images(x)
        n = x.shape[0]
        per = self.width * self.size * self.size
        chunk = max(1, min(k, max_elements // max(1, n * per)))
        acc = torch.full((n,), -math.inf, dtype=x.dtype, device=x.device)
        done = 0
        while done < k:
            kc = min(chunk, k - done)
            xr = x.repeat(kc, 1, 1, 1)
            params, kls = self._run(xr, kl="sample", generator=generator)
            log_w = (-self._nll(params, xr) - kls.sum(1)).view(kc, n)
            acc = torch.logaddexp(acc, torch.logsumexp(log_w, dim=0))
            done += kc
        return acc - math.log(k)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y=None, *, temperature: float = 1.0):
        """n images, (n, C, H, W): z_l ~ p(z_l | z_<l) top-down with each prior's sigma times
        ``temperature``, then x ~ p(x|z) (:func:`vae_ext.dmol_sample`) rounded to the data's grid."""
        if y is not None:
            raise ValueError("y: the hierarchical VAE is not class-conditional")
        t = float(temperature)
        if not (t >= 0 and math.isfinite(t)):
            raise ValueError(f"temperature: expected a finite number >= 0, got {temperature!r}")
        gen = self._states(n)
        layer, state = next(gen)
        while layer is not None:
            state = layer.sample(state, temperature=t, fused=self.fused, generator=generator)
            layer, state = gen.send(state)
        draw = dmol_sample if self.fused else reference.dmol_sample
        x = draw(self._output(state), num_channels=self.input_shape[0], generator=generator)
        return to_grid(x, self.num_bits)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """The mixture's mean at z_l = each posterior's mean: deterministic, (N, C, H, W)."""
        params, _ = self._run(x, mean=True)
        return self.mean(params)

    def encode(self, x, y=None):
        raise NotImplementedError("HVAE has a latent per layer: use elbo, log_likelihood or reconstruct")

    def decode(self, z, y=None):
        raise NotImplementedError("HVAE has a latent per layer: use sample")

    def trace_forward(self, batch: int) -> None:
        """One training forward of ``batch`` images of zeros: for the memory check on the meta device."""
        p = next(self.parameters())
        self(torch.zeros(batch, *self.input_shape, device=p.device, dtype=p.dtype))
