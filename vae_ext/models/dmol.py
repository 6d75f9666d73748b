"""The VAE modules' discretized-mixture-of-logistics decoder (``recon="dmol"``): its loss, its mean
and its grid.

With ``recon="dmol"`` the decoder outputs, per pixel, the parameters of a mixture of ``mixtures``
discretized logistics (P = 3 M channels for one image channel: logits, means, log-scales; P = 10 M
for RGB), and p(x|z) is :func:`vae_ext.dmol_nll`'s likelihood of ``num_bits``-bit data scaled to
[-1, 1]: the likelihood of PixelCNN++, VDVAE and NVAE. Its log density is a log probability (of a
pixel's bin), so the ELBO and the likelihood estimate are bounds on log P(x) in nats, and
``-log P(x) / (D ln 2)`` is the bits per dimension in which such models are compared.
"""
from __future__ import annotations

import math

import torch

from .. import reference
from ..losses import FusedELBOLoss

__all__ = ["DMoLELBOLoss", "dmol_param_channels", "mixture_mean", "to_grid", "bits_per_dim", "check_dmol_options"]

DEFAULT_MIXTURES = 10
DEFAULT_NUM_BITS = 8


def check_dmol_options(recon: str, mixtures, num_bits, input_shape) -> tuple:
    """``(mixtures, num_bits)`` for ``recon``: the defaults (10, 8) for ``"dmol"``, ``(None, None)``
    for the other modes, which refuse them (ValueError naming the argument)."""
    if recon != "dmol":
        for name, v in (("mixtures", mixtures), ("num_bits", num_bits)):
            if v is not None:
                raise ValueError(f"{name}: only recon='dmol' (a mixture of logistics) takes it, got recon={recon!r}")
        return None, None
    mixtures = DEFAULT_MIXTURES if mixtures is None else mixtures
    num_bits = DEFAULT_NUM_BITS if num_bits is None else num_bits
    for name, v, hi in (("mixtures", mixtures, None), ("num_bits", num_bits, 16)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
            want = "an int >= 1" if hi is None else f"an int in 1..{hi}"
            raise ValueError(f"{name}: expected {want}, got {v!r}")
    if len(input_shape) < 1 or input_shape[0] not in (1, 3):
        raise ValueError(f"input_shape: recon='dmol' needs images (C, ...) with C = 1 or 3 channels, "
                         f"got {tuple(input_shape)}")
    return mixtures, num_bits


def dmol_param_channels(num_channels: int, mixtures: int) -> int:
    """P, the decoder's output channels: 3 M for one channel, 10 M (M logits, then per channel M
    means, M log-scales, M coefficients) for RGB."""
    return 3 * mixtures if num_channels == 1 else (3 * num_channels + 1) * mixtures


def bits_per_dim(nats: float, dims: int) -> float:
    """A negative log-likelihood in nats per image -> bits per dimension: ``nats / (D ln 2)``."""
    return nats / (dims * math.log(2.0))


def to_grid(x: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Values in [-1, 1] rounded to the nearest of the 2^num_bits levels ``2 k / (2^num_bits - 1) - 1``."""
    top = float(2 ** num_bits - 1)
    return torch.round((x.clamp(-1.0, 1.0) + 1.0) * (top / 2.0)) * (2.0 / top) - 1.0


@torch.no_grad()
def mixture_mean(params: torch.Tensor, num_channels: int) -> torch.Tensor:
    """The mean of the (continuous) mixture of logistics per pixel, (N, C, *S), clamped to [-1, 1].

    Per component the logistic's mean is its location; for RGB the coupling is linear, so
    E[G|m] = mu_G + alpha_0 E[R|m] and E[B|m] = mu_B + alpha_1 E[R|m] + alpha_2 E[G|m] (with
    alpha = tanh of the coefficients); the components are weighted by softmax(logits). The edge bins
    and the clamp are ignored: this is the deterministic picture of a reconstruction, not a density.
    """
    m = params.shape[1] // (3 if num_channels == 1 else 3 * num_channels + 1)
    weights = torch.softmax(params[:, :m], dim=1)
    rest = params[:, m:].unflatten(1, (num_channels, 2 if num_channels == 1 else 3, m))
    means = rest[:, :, 0]  # (N, C, M, *S)
    if num_channels == 3:
        alpha = torch.tanh(rest[:, :, 2])
        r = means[:, 0]
        g = means[:, 1] + alpha[:, 0] * r
        b = means[:, 2] + alpha[:, 1] * r + alpha[:, 2] * g
        means = torch.stack((r, g, b), dim=1)
    return (weights.unsqueeze(1) * means).sum(2).clamp(-1.0, 1.0)


class DMoLELBOLoss(FusedELBOLoss):
    """The negative ELBO with a DMoL decoder, the criterion of a ``recon="dmol"`` model:
    ``FusedELBOLoss("dmol", num_bits=...)`` (:func:`vae_ext.elbo_loss`, ``recon="dmol"``), or with
    ``fused=False`` :func:`vae_ext.reference.elbo_loss`. Called as :class:`~vae_ext.FusedELBOLoss` is, with
    the decoder's ``params`` in the place of ``recon_x``: ``loss(params, x, mu, logvar, return_terms=...,
    prior_mu=..., prior_logvar=...)``; x may be images or flat rows (reshaped to (N, C, *S)).

    ``beta`` and ``free_bits`` are plain attributes, as FusedELBOLoss's; ``reduction`` is ``"sum"``
    (the models' loss). With ``return_terms`` the KL returned is the true one (not floored).
    """

    def __init__(self, num_bits: int, *, fused: bool = True, beta: float = 1.0, free_bits: float = 0.0):
        super().__init__("dmol", beta=beta, reduction="sum", free_bits=free_bits, num_bits=num_bits)
        self.fused = bool(fused)

    def forward(self, params, x, mu, logvar, return_terms: bool = False, *, prior_mu=None, prior_logvar=None,
                return_unit_kl: bool = False):
        x = x.reshape(params.shape[0], -1, *params.shape[2:])  # (N, C, *S), from images or flat rows
        if self.fused:
            return super().forward(params, x, mu, logvar, return_terms, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                   return_unit_kl=return_unit_kl)
        return reference.elbo_loss(params, x, mu, logvar, recon="dmol", beta=self.beta, reduction=self.reduction,
                                   return_terms=return_terms, prior_mu=prior_mu, prior_logvar=prior_logvar,
                                   free_bits=self.free_bits, return_unit_kl=return_unit_kl, num_bits=self.num_bits,
                                   log_scale_min=self.log_scale_min)

    def extra_repr(self) -> str:
        fb = f", free_bits={self.free_bits}" if self.free_bits else ""
        return f"num_bits={self.num_bits}, beta={self.beta}, fused={self.fused}{fb}"
