"""The plain-PyTorch twin of :func:`vae_ext.gaussian_latent` (re-exported as
``vae_ext.reference.gaussian_latent``): the oracle of its tests and the eager baseline of its benchmark,
written the way VDVAE and NVAE write a latent layer, every step a stock op.
"""
from __future__ import annotations

import math

import torch

__all__ = ["gaussian_latent", "latent_kl_elements"]

_HALF = (torch.float16, torch.bfloat16)


def _log_sigma_factor(scale: str) -> float:
    if scale == "logvar":
        return 0.5
    if scale == "logsigma":
        return 1.0
    raise ValueError(f"scale: expected 'logvar' or 'logsigma', got {scale!r}")


def latent_kl_elements(z, eps, mu, h, prior_mu, prior_h, kl: str = "analytic") -> torch.Tensor:
    """The KL per element, from log sigma ``h`` (and the prior's ``prior_h``; None: N(0, I)).

    ``"analytic"``: ``ph - h + (sigma^2 + (mu - pmu)^2) / (2 psigma^2) - 1/2`` (mu's shape);
    ``"sample"``: ``log q(z) - log p(z)`` at z (z's shape), with q's density written in z, so that
    autograd differentiates it through z = mu + sigma eps and through mu and h together.
    """
    pmu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    ph = torch.zeros_like(h) if prior_h is None else prior_h
    if kl == "analytic":
        return ph - h + (torch.exp(2 * h) + (mu - pmu).pow(2)) * torch.exp(-2 * ph) / 2 - 0.5
    if kl == "sample":
        log_q = -((z - mu) / torch.exp(h)).pow(2) / 2 - h
        log_p = -((z - pmu) / torch.exp(ph)).pow(2) / 2 - ph
        return log_q - log_p  # the log(2 pi) / 2 of the two cancel
    raise ValueError(f"kl: expected 'analytic' or 'sample', got {kl!r}")


def gaussian_latent(mu, logscale, prior_mu=None, prior_logscale=None, *, scale="logvar", kl="analytic",
                    reduction="none", free_bits=0.0, num_samples=None, generator=None, eps=None):
    """z = mu + sigma * eps and KL(N(mu, sigma^2) || N(prior_mu, prior_sigma^2)), as
    :func:`vae_ext.gaussian_latent`.

    ``eps`` (the fused op's draws cannot be reproduced by stock ops cheaply): the standard normals
    to use, z's shape (the tests pass those of ``vae_ext.reparameterize(..., return_eps=True)`` at
    the fused op's generator state); by default ``torch.randn``, so the values differ from the fused
    op's while the distribution is the same. Half inputs are computed in float32, as the fused op.
    """
    if (prior_mu is None) != (prior_logscale is None):
        raise ValueError("prior_mu, prior_logscale: expected both or neither")
    c = _log_sigma_factor(scale)
    dt = torch.float32 if mu.dtype in _HALF else mu.dtype
    shape = tuple(mu.shape) if num_samples is None else (num_samples, *mu.shape)
    if eps is None:
        kw = {} if generator is None else {"generator": generator}
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device, **kw)
    elif tuple(eps.shape) != shape:
        raise ValueError(f"eps: expected shape {shape}, got {tuple(eps.shape)}")
    m, h, e = mu.to(dt), c * logscale.to(dt), eps.to(dt)
    pmu = None if prior_mu is None else prior_mu.to(dt)
    ph = None if prior_logscale is None else c * prior_logscale.to(dt)
    z = m + torch.exp(h) * e
    el = latent_kl_elements(z, e, m, h, pmu, ph, kl)
    el = el.expand(z.shape)  # analytic: the same KL for each draw
    rows = el.reshape(math.prod(z.shape[: z.dim() - mu.dim() + 1]), math.prod(mu.shape[1:]))
    per_row = rows.sum(dim=1).reshape(z.shape[: z.dim() - mu.dim() + 1])
    if reduction == "none":
        if free_bits:
            raise ValueError("free_bits: the floor is a batch statistic; reduction='none' cannot take it")
        out = per_row
    elif reduction not in ("sum", "mean"):
        raise ValueError(f"reduction: expected 'sum', 'mean' or 'none', got {reduction!r}")
    elif free_bits:
        out = rows.mean(dim=0).clamp(min=free_bits).sum()
        if reduction == "sum":
            out = out * rows.shape[0]
    else:
        out = per_row.sum() if reduction == "sum" else per_row.mean()
    return z.to(mu.dtype), out
