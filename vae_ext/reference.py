"""Plain-PyTorch versions of every fused op: the oracle for tests and the eager baseline of benchmarks.

Each function has the same signature and the same semantics as its fused twin in
:mod:`vae_ext.functional`, written the way a user would write it with stock PyTorch ops.
Nothing here is fast on purpose; everything here is obviously right.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference_dmol import dmol_nll, dmol_sample
from .reference_latent import gaussian_latent, latent_kl_elements

__all__ = [
    "dmol_nll", "dmol_sample", "elbo_loss", "gaussian_kl", "gaussian_latent", "kl_divergence", "kl_elements",
    "latent_kl_elements", "reconstruction_loss", "reparameterize", "unit_kl",
]

_HALF = (torch.float16, torch.bfloat16)
_LOG_2PI = math.log(2.0 * math.pi)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # The fused op computes half types in float32 and returns float32: mirror it.
    return torch.float32 if t.dtype in _HALF else t.dtype


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (N, per-sample elements). The size from the shape, not -1: reshape(0, -1) is ambiguous
    for an empty batch."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def reconstruction_loss(recon_x: torch.Tensor, x: torch.Tensor, recon: str = "bce",
                        recon_logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample reconstruction loss, shape (N,), summed over every non-batch dimension.

    ``recon="gaussian"``: the Gaussian negative log-likelihood with log-variance ``recon_logvar``
    (a 0-d tensor, or one per element of ``recon_x``).
    """
    dt = _compute_dtype(recon_x)
    r = recon_x.to(dt)
    t = x.reshape(recon_x.shape).to(dt)
    if recon == "bce":
        per_elem = F.binary_cross_entropy(r, t, reduction="none")
    elif recon == "bce_logits":
        per_elem = F.binary_cross_entropy_with_logits(r, t, reduction="none")
    elif recon == "mse":
        per_elem = (r - t).pow(2)
    elif recon == "l1":
        per_elem = (r - t).abs()
    elif recon == "gaussian":
        rlv = recon_logvar.to(dt)
        per_elem = 0.5 * ((t - r).pow(2) * torch.exp(-rlv) + rlv + _LOG_2PI)
    else:
        raise ValueError(f"recon: expected 'bce', 'bce_logits', 'mse', 'l1' or 'gaussian', got {recon!r}")
    return _rows(per_elem).sum(dim=1)


def kl_elements(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
                prior_logvar: torch.Tensor | None = None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) per element, mu's shape.

    No prior: N(0, I), ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``. With one:
    ``0.5 * (plv - lv + (exp(lv) + (mu - pmu)^2) * exp(-plv) - 1)``; the prior broadcasts to mu.
    """
    dt = _compute_dtype(mu)
    mu, logvar = mu.to(dt), logvar.to(dt)
    if prior_mu is None:
        # halved per element, then summed by the caller (the same numbers: scaling by a power of 2 is
        # exact), so a sum near the largest float does not overflow on its way
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())
    pmu, plv = prior_mu.to(dt), prior_logvar.to(dt)
    # the product halved through exp(-plv), as the kernels do: (exp(lv) + d^2) exp(-plv) may
    # overflow where its half (the KL) does not; elsewhere the same numbers (halving is exact)
    return (0.5 * (plv - logvar) + (logvar.exp() + (mu - pmu).pow(2)) * (0.5 * torch.exp(-plv))) - 0.5


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
                  prior_logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample KL to the prior (N(0, I) by default), shape (N,), summed over mu.shape[1:]."""
    return _rows(kl_elements(mu, logvar, prior_mu, prior_logvar)).sum(dim=1)


def unit_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
            prior_logvar: torch.Tensor | None = None) -> torch.Tensor:
    """Each latent unit's KL averaged over the batch, shape mu.shape[1:] (posterior-collapse
    diagnostics: a unit whose KL stays near 0 carries no information)."""
    return kl_elements(mu, logvar, prior_mu, prior_logvar).mean(dim=0)


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")


def _kl_term(mu, logvar, prior_mu, prior_logvar, reduction, free_bits):
    """(the KL term the loss uses, the true KL) under ``reduction``. With free bits each unit's
    batch-mean KL is floored at ``free_bits`` nats: ``sum_u max(free_bits, KL_u)``, times N for
    "sum"; units under the floor get no gradient (clamp's)."""
    kl = _reduce(kl_divergence(mu, logvar, prior_mu, prior_logvar), "mean" if reduction == "pixel_mean" else reduction)
    if not free_bits:
        return kl, kl
    if reduction == "none":
        raise ValueError("free_bits: the floor is a batch statistic; reduction='none' cannot take it")
    floored = unit_kl(mu, logvar, prior_mu, prior_logvar).clamp(min=free_bits).sum()
    if reduction == "sum":
        floored = floored * mu.shape[0]
    return floored, kl.detach()


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
    prior_mu: torch.Tensor | None = None,
    prior_logvar: torch.Tensor | None = None,
    recon_logvar: torch.Tensor | None = None,
    free_bits: float = 0.0,
    return_unit_kl: bool = False,
    num_bits: int | None = None,
    log_scale_min: float | None = None,
):
    """Negative ELBO: reconstruction loss + beta * KL, reduced by ``reduction``.

    Same contract as :func:`vae_ext.elbo_loss` (``validate`` is accepted and ignored: the
    stock ops check what they check). ``recon="dmol"``: :func:`dmol_nll` of ``recon_x`` as params.
    """
    del validate
    if recon == "dmol":
        if reduction == "pixel_mean":
            raise ValueError("reduction: 'pixel_mean' does not apply to recon='dmol'")
        per_sample = dmol_nll(recon_x, x, num_bits=8 if num_bits is None else num_bits, reduction="none",
                              log_scale_min=-7.0 if log_scale_min is None else log_scale_min)
    else:
        per_sample = reconstruction_loss(recon_x, x, recon, recon_logvar)
    if reduction == "pixel_mean":  # the reconstruction averaged over every element, the KL over samples
        rec = per_sample.sum() / recon_x.numel()
    else:
        rec = _reduce(per_sample, reduction)
    kl, kl_true = _kl_term(mu, logvar, prior_mu, prior_logvar, reduction, free_bits)
    loss = rec + beta * kl
    out = (loss, rec, kl_true) if return_terms else (loss,)
    if return_unit_kl:
        out += (unit_kl(mu, logvar, prior_mu, prior_logvar).detach(),)
    return out if len(out) > 1 else loss


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
                prior_logvar: torch.Tensor | None = None, *, reduction: str = "sum", free_bits: float = 0.0,
                return_unit_kl: bool = False):
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))) summed per sample over every
    non-batch dimension, reduced (with free bits: the floored KL)."""
    kl, _ = _kl_term(mu, logvar, prior_mu, prior_logvar, reduction, free_bits)
    if return_unit_kl:
        return kl, unit_kl(mu, logvar, prior_mu, prior_logvar).detach()
    return kl


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
