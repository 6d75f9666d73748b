"""A hierarchical VAE's latent layer in one fused call: ``vae_ext.gaussian_latent``.

Dtypes, shapes and the option strings are checked in C++ (csrc/latent.cpp), with a ``TypeError`` or
``ValueError`` naming the argument; Python checks what must come first (autocast's promotion, the
Python types, devices, ``num_samples`` and ``generator``).
"""
from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (loads the kernels, registers their fake kernels)
from ._checks import _check_generator, _check_num_samples
from .functional import (
    KL_REDUCTIONS,
    _autocast_common_dtype,
    _check_choice,
    _check_free_bits,
    _check_is_tensor,
    _check_same,
    _optional_tensors,
)

__all__ = ["gaussian_latent", "LATENT_SCALES", "LATENT_KLS"]

LATENT_SCALES = ("logvar", "logsigma")
LATENT_KLS = ("analytic", "sample")


def gaussian_latent(
    mu: torch.Tensor,
    logscale: torch.Tensor,
    prior_mu: torch.Tensor | None = None,
    prior_logscale: torch.Tensor | None = None,
    *,
    scale: str = "logvar",
    kl: str = "analytic",
    reduction: str = "none",
    free_bits: float = 0.0,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
):
    """``z ~ q = N(mu, sigma^2)`` and ``KL(q || p)``, ``p = N(prior_mu, prior_sigma^2)``, in one pass.

    What a hierarchical VAE (Ladder VAE, NVAE, VDVAE) computes in each latent layer:
    ``z = mu + sigma * eps`` with ``eps`` drawn inside the kernel from the Philox stream of
    :func:`vae_ext.reparameterize` (with ``scale="logvar"`` z is bitwise the z that
    ``reparameterize(mu, logscale)`` draws at the same generator state), and the KL summed per sample.

    Args:
        mu, logscale: q's mean and log-scale, shape (N, ...): latents of any shape, read where they
            are (a channel slice ``out.chunk(2, dim=1)`` of an NCHW or channels_last conv output
            is not copied).
        prior_mu, prior_logscale: the prior (both or neither; default N(0, I)), mu's shape or
            broadcastable to it (e.g. (C, 1, 1) shared by every sample); they get gradients.
        scale: ``"logvar"`` (the log-scales are log sigma^2, this package's convention) or
            ``"logsigma"`` (log sigma, as VDVAE and NVAE write them), for q and p alike.
        kl: ``"analytic"`` (the closed form per element,
            ``log psigma - log sigma + (sigma^2 + (mu - pmu)^2) / (2 psigma^2) - 1/2``) or
            ``"sample"`` (``log q(z) - log p(z)`` at the drawn z: the single-sample estimate that
            flows and importance-weighted bounds need; differentiated through z).
        reduction: ``"none"`` (per-sample sums over every non-batch dimension, shape (N,), or
            (K, N) with ``num_samples``), ``"sum"`` or ``"mean"`` (over every row).
        free_bits: nats per latent unit (each position of mu.shape[1:]), as in
            :func:`vae_ext.gaussian_kl`: the KL becomes ``sum_u max(free_bits, KL_u)``, KL_u the
            unit's KL averaged over the rows (times their number for ``"sum"``); units under the
            floor get no KL gradient. Not with ``reduction="none"``.
        num_samples: K draws per element in one launch: z (K, *mu.shape), the KL per draw.
        generator: a ``torch.Generator`` on mu's device (default: PyTorch's for that device).

    Returns:
        ``(z, kl)``: z in mu's dtype and layout, kl in mu's dtype (float32 for float16/bfloat16,
        which are computed in float32). Gradients reach mu, logscale and the prior through both;
        the backward draws eps again from the stream (nothing the size of z is kept).
    """
    given = _optional_tensors((("prior_mu", prior_mu), ("prior_logscale", prior_logscale)))
    if isinstance(mu, torch.Tensor) and isinstance(logscale, torch.Tensor):
        tensors = _autocast_common_dtype((mu, logscale, *(t for _, t in given)))
        mu, logscale = tensors[:2]
        named = dict((n, t) for (n, _), t in zip(given, tensors[2:]))
        prior_mu, prior_logscale = named.get("prior_mu"), named.get("prior_logscale")
    _check_is_tensor("mu", mu)
    _check_is_tensor("logscale", logscale)
    _check_same((("mu", mu), ("logscale", logscale), *given), "device")
    _check_choice("scale", scale, LATENT_SCALES)
    _check_choice("kl", kl, LATENT_KLS)
    _check_choice("reduction", reduction, KL_REDUCTIONS)
    free_bits = _check_free_bits(free_bits)
    k = _check_num_samples(num_samples)
    _check_generator(generator, mu)
    z, kl_out, _, _ = torch.ops.vae_ext.gaussian_latent(mu, logscale, prior_mu, prior_logscale, scale, kl, reduction,
                                                        free_bits, k, generator)
    return z, kl_out
