"""Plain-PyTorch versions of every fused op: the oracle for tests and the eager baseline of benchmarks.

Each function has the same signature and the same semantics as its fused twin in
:mod:`vae_ext.functional`, written the way a user would write it with stock PyTorch ops.
Nothing here is fast on purpose; everything here is obviously right.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["elbo_loss", "gaussian_kl", "kl_divergence", "reconstruction_loss", "reparameterize"]

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # The fused op computes half types in float32 and returns float32: mirror it.
    return torch.float32 if t.dtype in _HALF else t.dtype


def reconstruction_loss(recon_x: torch.Tensor, x: torch.Tensor, recon: str = "bce") -> torch.Tensor:
    """Per-sample reconstruction loss, shape (N,), summed over every non-batch dimension."""
    n = recon_x.shape[0]
    # The per-sample size from the shape, not -1: reshape(0, -1) is ambiguous for an empty batch.
    d = math.prod(recon_x.shape[1:])
    dt = _compute_dtype(recon_x)
    r = recon_x.reshape(n, d).to(dt)
    t = x.reshape(n, d).to(dt)
    if recon == "bce":
        per_elem = F.binary_cross_entropy(r, t, reduction="none")
    elif recon == "bce_logits":
        per_elem = F.binary_cross_entropy_with_logits(r, t, reduction="none")
    elif recon == "mse":
        per_elem = (r - t).pow(2)
    else:
        raise ValueError(f"recon: expected 'bce', 'bce_logits' or 'mse', got {recon!r}")
    return per_elem.sum(dim=1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, exp(logvar)) || N(0, I)), shape (N,)."""
    dt = _compute_dtype(mu)
    mu, logvar = mu.to(dt), logvar.to(dt)
    # halved per element, then summed (the same numbers: scaling by a power of 2 is exact), so a sum
    # near the largest float does not overflow on its way, as halving the sum afterwards would
    return torch.sum(-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()), dim=1)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")


def elbo_loss(
    recon_x: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    recon: str = "bce",
    beta: float = 1.0,
    reduction: str = "sum",
    return_terms: bool = False,
    validate: bool = False,
):
    """Negative ELBO: reconstruction loss + beta * KL, reduced by ``reduction``.

    Same contract as :func:`vae_ext.elbo_loss` (``validate`` is accepted and ignored: the
    stock ops check what they check).
    """
    del validate
    per_sample = reconstruction_loss(recon_x, x.reshape(recon_x.shape), recon)
    if reduction == "pixel_mean":  # the reconstruction averaged over every element, the KL over samples
        rec = per_sample.sum() / recon_x.numel()
        kl = kl_divergence(mu, logvar).mean()
    else:
        rec = _reduce(per_sample, reduction)
        kl = _reduce(kl_divergence(mu, logvar), reduction)
    loss = rec + beta * kl
    if return_terms:
        return loss, rec, kl
    return loss


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed per sample over every non-batch dimension, reduced."""
    shape = (mu.shape[0], math.prod(mu.shape[1:]))  # (not reshape(n, -1): n may be 0)
    return _reduce(kl_divergence(mu.reshape(shape), logvar.reshape(shape)), reduction)


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    return_eps: bool = False,
):
    """z = mu + exp(0.5 * logvar) * eps with eps ~ N(0, I) from ``torch.randn``.

    ``num_samples=K`` gives z of shape (K, *mu.shape). Same contract as
    :func:`vae_ext.reparameterize`, but the draws come from PyTorch's own generator stream,
    so the values differ from the fused op's (the distribution is the same).
    """
    if num_samples is None and generator is None:
        eps = torch.randn_like(mu)
    else:
        shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
        # generator only when given: randn's generator overload has no symbolic-shape support,
        # which torch.compile(dynamic) needs.
        kw = {} if generator is None else {"generator": generator}
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device, **kw)
    z = mu + torch.exp(0.5 * logvar) * eps
    if return_eps:
        return z, eps
    return z


def reparameterize_with_eps(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z from a given eps (broadcast over a leading samples dimension): the reference for gradients."""
    return mu + torch.exp(0.5 * logvar) * eps
