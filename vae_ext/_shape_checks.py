"""The shape checks of the C++ ops (csrc/checks.cpp, csrc/latent.cpp, csrc/dmol.cpp), with their
messages, for the fake kernels of vae_ext/_ops.py.

A fake kernel is all that runs for tensors on the meta device: without these checks a shape the real
op refuses (mu of another batch size than recon_x, a prior that does not broadcast, params of the
wrong P) gave a result there, and a model checked on the meta device failed only on real data. They
run where every size is an int (meta tensors, a static trace). Symbolic sizes (a dynamic batch under
torch.compile) are left to the real kernel at run time: comparing them here would add guards.
"""
from __future__ import annotations

import torch


def _concrete(*tensors) -> bool:
    return all(type(s) is int for t in tensors if t is not None for s in t.shape)


def _dims(t: torch.Tensor) -> list:
    return list(t.shape)


def _broadcasts(p: torch.Tensor, mu: torch.Tensor) -> bool:  # at::is_expandable_to, and no more dims
    return p.dim() <= mu.dim() and all(a in (1, b) for a, b in zip(reversed(p.shape), reversed(mu.shape)))


def _check_prior(name: str, p, mu) -> None:
    if p is not None and not _broadcasts(p, mu):
        raise ValueError(f"{name}: expected a shape that broadcasts to mu's {_dims(mu)} (mu's own, or one like "
                         f"mu.shape[1:] shared by every sample), got {_dims(p)}")


def _check_latent_pair(mu, other_name: str, other) -> None:
    if mu.dim() < 1:
        raise ValueError("mu: expected a tensor of shape (N, ...), got a 0-d tensor")
    if other.shape != mu.shape:
        raise ValueError(f"{other_name}: expected the shape of mu {_dims(mu)}, got {_dims(other)}")


def check_elbo(recon, x, mu, logvar, prior_mu, prior_logvar, recon_logvar) -> None:
    if not _concrete(recon, x, mu, logvar, prior_mu, prior_logvar, recon_logvar):
        return
    if recon.dim() < 1:
        raise ValueError("recon_x: expected a tensor of shape (N, ...), got a 0-d tensor")
    if x.shape != recon.shape:
        raise ValueError(f"x: expected the shape of recon_x {_dims(recon)}, got {_dims(x)}")
    _check_latent_pair(mu, "logvar", logvar)
    if mu.shape[0] != recon.shape[0]:
        raise ValueError(f"mu: expected batch size {recon.shape[0]} (recon_x.shape[0]), got {mu.shape[0]}")
    _check_prior("prior_mu", prior_mu, mu)
    _check_prior("prior_logvar", prior_logvar, mu)
    if recon_logvar is not None and recon_logvar.dim() != 0 and recon_logvar.shape != recon.shape:
        raise ValueError(f"recon_logvar: expected a 0-d tensor (one learned log-variance) or the shape of recon_x "
                         f"{_dims(recon)}, got {_dims(recon_logvar)}")


def check_reparameterize(mu, logvar) -> None:
    if _concrete(mu, logvar) and logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected the shape of mu {_dims(mu)}, got {_dims(logvar)}")


def check_latent(mu, logscale, prior_mu, prior_logscale) -> None:
    if not _concrete(mu, logscale, prior_mu, prior_logscale):
        return
    _check_latent_pair(mu, "logscale", logscale)
    _check_prior("prior_mu", prior_mu, mu)
    _check_prior("prior_logscale", prior_logscale, mu)


def _check_params(params, channels: int, whose: str) -> None:
    if params.dim() < 2:
        raise ValueError(f"params: expected a tensor of shape (N, P, *S), got shape {_dims(params)}")
    p, per = params.shape[1], 10 if channels == 3 else 3
    if p <= 0 or p % per:
        layout = ("M logits, then per channel R, G, B: M means, M log-scales, M coefficients" if channels == 3
                  else "M logits, M means, M log-scales")
        raise ValueError(f"params: expected P = params.shape[1] = {per} M for {channels} "
                         f"channel{'s' if channels == 3 else ''} ({whose}) with M >= 1 mixture components ({layout}), "
                         f"got P = {p}")


def check_dmol(params, x) -> None:
    if not _concrete(params, x):
        return
    if x.dim() < 2:
        raise ValueError(f"x: expected a tensor of shape (N, C, *S), C = 1 or 3, got shape {_dims(x)}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"x: expected 1 or 3 channels (x.shape[1]), got {x.shape[1]}")
    _check_params(params, x.shape[1], "x.shape[1]")
    if x.shape[0] != params.shape[0]:
        raise ValueError(f"x: expected batch size {params.shape[0]} (params.shape[0]), got {x.shape[0]}")
    if x.shape[2:] != params.shape[2:]:
        raise ValueError(f"x: expected the spatial shape of params {list(params.shape[2:])} (params.shape[2:]), "
                         f"got {list(x.shape[2:])}")


def check_dmol_sample(params, num_channels: int) -> None:
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels: expected 1 or 3, got {num_channels}")
    if _concrete(params):
        _check_params(params, num_channels, "num_channels")
