"""Fake (meta) kernels for the custom ops that ``vae_ext._C`` registers: what ``torch.compile``
needs to trace them without running them.

The C++ side defines the schemas (csrc/ops.cpp), the CPU/CUDA ops (csrc/cpu, csrc/cuda) and their
autograd (csrc/autograd.cpp: the backward of elbo_loss scales the gradients its forward wrote, the
backward of reparameterize recomputes eps from the rng_state). Users call :mod:`vae_ext.functional`.
"""
from __future__ import annotations

import math

import torch

from . import _shape_checks as checks
from ._build import _C  # loads the library: registers torch.ops.vae_ext.*
from ._compile_cache import tag_compile_cache

tag_compile_cache(_C.__file__, __file__)  # a rebuild compiles afresh (vae_ext/_compile_cache.py)

_HALF = (torch.float16, torch.bfloat16)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _grad_dtype(t: torch.Tensor) -> torch.dtype:
    """elbo_loss's gradient buffers (csrc/checks.cpp grad_buffer_dtype): the input's own for the
    half types on the CPU, the loss dtype otherwise."""
    return t.dtype if t.dtype in _HALF and t.device.type == "cpu" else _out_dtype(t.dtype)


# --------------------------------------------------------------------------- elbo_loss
# vae_ext::elbo_loss(recon, x, mu, logvar, recon_mode, reduction, grad_recon, grad_latent, validate,
#                    total=False, prior_mu=None, prior_logvar=None, recon_logvar=None, free_bits=0.,
#                    unit_kl=False)
#   -> (rec, kl, unit_kl, g_recon, g_mu, g_logvar, g_prior_mu, g_prior_logvar, g_recon_logvar)
# rec and kl are the reduced reconstruction and KL terms (with free bits, the floored KL); unit_kl is
# each latent unit's KL averaged over the batch (mu.shape[1:]; empty unless unit_kl or free bits);
# g_* are d(term)/d(input), written in the same pass (empty when their flag is False; all in
# _grad_dtype, on the CPU the half types' own, except a broadcast prior's, float32; the latent and
# prior ones per element, mu's shape; a 0-d recon_logvar's per sample for "none", else 0-d, in
# float64: scaled, a sum past float32's range may be finite); the backward only scales them by
# grad_output (and sums a broadcast prior's), except float16's on the CPU, which are the gradients
# for a grad_output of 1 and for any other are computed again in float32 (csrc/autograd.cpp).
# Through autograd, when a graph is recorded, they come back empty: the backward scales the saved
# buffers in place.
# total=True: the first output is the loss rec + kl (beta = 1) and the second is empty, which
# saves an add, its autograd node and a tensor in eager mode.


def _flat_format(recon: torch.Tensor) -> torch.memory_format:
    """The layout of the recon gradient, and of z for this mu: as csrc/layout.cpp kernel_format
    (channels_last kept)."""
    if recon.is_contiguous():
        return torch.contiguous_format
    if recon.dim() == 4 and recon.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if recon.dim() == 5 and recon.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@torch.library.register_fake("vae_ext::elbo_loss")
def _elbo_loss_fake(recon, x, mu, logvar, recon_mode, reduction, grad_recon, grad_latent, validate, total=False,
                    prior_mu=None, prior_logvar=None, recon_logvar=None, free_bits=0.0, unit_kl=False):
    checks.check_elbo(recon, x, mu, logvar, prior_mu, prior_logvar, recon_logvar)
    out_dtype = _out_dtype(recon.dtype)
    shape = (recon.shape[0],) if reduction == "none" else ()
    rec = recon.new_empty(shape, dtype=out_dtype)
    kl = recon.new_empty(0 if total else shape, dtype=out_dtype)
    units = mu.new_empty(mu.shape[1:] if unit_kl or free_bits > 0 else 0, dtype=out_dtype)
    # every gradient buffer in _grad_dtype, as csrc/checks.cpp prepare_elbo (a 0-d recon_logvar's, a
    # sum, in float64: below)
    g_dtype = _grad_dtype(recon)
    g_recon = (torch.empty_like(recon, dtype=g_dtype, memory_format=_flat_format(recon)) if grad_recon
               else recon.new_empty(0, dtype=g_dtype))

    def latent(wanted, dtype=g_dtype):
        return mu.new_empty(mu.shape if wanted else 0, dtype=dtype)

    prior = prior_mu is not None and grad_latent
    # a broadcast prior's, summed in the backward, in the loss dtype
    whole = prior and prior_mu.shape == mu.shape and prior_logvar.shape == mu.shape
    p_dtype = out_dtype if prior and not whole else g_dtype
    if recon_logvar is None or not grad_recon:
        g_rlv = recon.new_empty(0, dtype=g_dtype)
    elif recon_logvar.dim() == 0:  # a sum, in float64 until the backward scales it
        g_rlv = recon.new_empty(shape, dtype=torch.float64)
    else:
        g_rlv = torch.empty_like(recon, dtype=g_dtype, memory_format=_flat_format(recon))
    return (rec, kl, units, g_recon, latent(grad_latent), latent(grad_latent), latent(prior, p_dtype),
            latent(prior, p_dtype), g_rlv)


# vae_ext::elbo_loss_basic(recon, x, mu, logvar, recon_mode, reduction, beta, grad_recon, grad_latent,
#                          validate) -> (loss, g_recon, g_mu, g_logvar)
# The common call (csrc/elbo_basic.h): no prior, free bits or recon_logvar; loss = rec + beta * kl
# (reduction may be "pixel_mean"); the buffers as elbo_loss's.


@torch.library.register_fake("vae_ext::elbo_loss_basic")
def _elbo_loss_basic_fake(recon, x, mu, logvar, recon_mode, reduction, beta, grad_recon, grad_latent, validate):
    loss, _kl, _units, g_recon, g_mu, g_logvar, *_ = _elbo_loss_fake(
        recon, x, mu, logvar, recon_mode, "mean" if reduction == "pixel_mean" else reduction, grad_recon,
        grad_latent, validate)
    return loss, g_recon, g_mu, g_logvar


# --------------------------------------------------------------------------- reparameterize
# vae_ext::reparameterize(mu, logvar, num_samples, return_eps, generator) -> (z, eps, rng_state)
# num_samples == 0 means "no samples dimension". rng_state holds the (seed, offset) the kernel
# used, as int64 on mu's device; the backward recomputes eps from it instead of storing eps.


# z, eps and the gradients take mu's channels_last(_3d) layout when mu has it (each z[k] with
# num_samples), as csrc/layout.cpp kernel_format and reparam_empty.


def _samples_empty(mu, num_samples):
    fmt = _flat_format(mu)
    if num_samples == 0:
        return torch.empty_like(mu, memory_format=fmt)
    if fmt == torch.contiguous_format:
        return mu.new_empty((num_samples, *mu.shape))
    flat = mu.new_empty((num_samples * mu.shape[0], *mu.shape[1:])).contiguous(memory_format=fmt)
    return flat.view(num_samples, *mu.shape)


@torch.library.register_fake("vae_ext::reparameterize")
def _reparameterize_fake(mu, logvar, num_samples, return_eps, generator=None):
    checks.check_reparameterize(mu, logvar)
    z = _samples_empty(mu, num_samples)
    eps = _samples_empty(mu, num_samples) if return_eps else mu.new_empty(0)
    state = mu.new_empty(2, dtype=torch.int64)
    return z, eps, state


@torch.library.register_fake("vae_ext::reparameterize_backward")
def _reparameterize_backward_fake(grad_z, logvar, rng_state, num_samples, grad_mu=True):
    fmt = _flat_format(logvar)
    g_mu = torch.empty_like(logvar, memory_format=fmt) if grad_mu else logvar.new_empty(0)
    return g_mu, torch.empty_like(logvar, memory_format=fmt)


@torch.library.register_fake("vae_ext::philox_normal")
def _philox_normal_fake(like, seed, offset):
    return torch.empty_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- dmol_nll, dmol_sample
# vae_ext::dmol_nll(params, x, num_bits, reduction, log_scale_min, grad, validate) -> (loss, g_params)
# loss: () or (N,) in the loss dtype; g_params: d loss / d params (times 1/N for mean) in the loss
# dtype (float32 for half params) and params' layout when grad (csrc/dmol.cpp pixel_layout:
# channels-first, or channels_last (N, *S, P) memory, else a channels-first copy's), else empty.
# Through autograd with a graph recorded it comes back empty: the backward scales the saved buffer.


def _pixel_layout_empty(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of t's shape and ``dtype`` in the layout csrc/dmol.cpp's kernels read t in."""
    if t.is_contiguous():
        return t.new_empty(t.shape, dtype=dtype)
    perm = (0, *range(2, t.dim()), 1)
    if t.permute(perm).is_contiguous():
        inverse = (0, t.dim() - 1, *range(1, t.dim() - 1))
        return t.new_empty([t.shape[i] for i in perm], dtype=dtype).permute(inverse)
    return t.new_empty(t.shape, dtype=dtype)


@torch.library.register_fake("vae_ext::dmol_nll")
def _dmol_nll_fake(params, x, num_bits, reduction, log_scale_min, grad, validate):
    checks.check_dmol(params, x)
    loss = params.new_empty((params.shape[0],) if reduction == "none" else (), dtype=_out_dtype(params.dtype))
    return loss, (_pixel_layout_empty(params, _out_dtype(params.dtype)) if grad else params.new_empty(0))


@torch.library.register_fake("vae_ext::dmol_sample")
def _dmol_sample_fake(params, num_channels, log_scale_min, generator=None):
    checks.check_dmol_sample(params, num_channels)
    return params.new_empty((params.shape[0], num_channels, *params.shape[2:]))


# --------------------------------------------------------------------------- gaussian_latent
# vae_ext::gaussian_latent(mu, logscale, prior_mu, prior_logscale, scale, kl, reduction, free_bits,
#                          num_samples, generator) -> (z, kl, rng_state, unit_w)
# z takes mu's layout (contiguous; channels_last(_3d) where mu's strides suggest it, a channel slice of
# a channels_last tensor too), as csrc/latent.cpp latent_format; kl is (K, N) / (N,) or 0-d in the
# loss dtype; unit_w the free-bits weights per unit (empty without free bits).


def _latent_format(mu):
    if mu.is_contiguous():
        return torch.contiguous_format
    from torch._prims_common import suggest_memory_format

    return suggest_memory_format(mu)


def _latent_empty(mu, num_samples, fmt):
    if num_samples == 0:
        return mu.new_empty(mu.shape).contiguous(memory_format=fmt)
    if fmt == torch.contiguous_format:
        return mu.new_empty((num_samples, *mu.shape))
    flat = mu.new_empty((num_samples * mu.shape[0], *mu.shape[1:])).contiguous(memory_format=fmt)
    return flat.view(num_samples, *mu.shape)


@torch.library.register_fake("vae_ext::gaussian_latent")
def _gaussian_latent_fake(mu, logscale, prior_mu, prior_logscale, scale, kl, reduction, free_bits, num_samples,
                          generator=None):
    checks.check_latent(mu, logscale, prior_mu, prior_logscale)
    out = _out_dtype(mu.dtype)
    z = _latent_empty(mu, num_samples, _latent_format(mu))
    rows = (num_samples, mu.shape[0]) if num_samples else (mu.shape[0],)
    kl_out = mu.new_empty(rows if reduction == "none" else (), dtype=out)
    units = math.prod(mu.shape[1:]) if free_bits > 0 else 0
    return z, kl_out, mu.new_empty(2, dtype=torch.int64), mu.new_empty(units, dtype=out)


@torch.library.register_fake("vae_ext::gaussian_latent_backward")
def _gaussian_latent_backward_fake(grad_z, row_w, mu, logscale, prior_mu, prior_logscale, rng_state, unit_w, scale,
                                   kl, num_samples, grad_prior):
    fmt = _latent_format(mu)
    g_mu = mu.new_empty(mu.shape).contiguous(memory_format=fmt)
    g_ls = mu.new_empty(mu.shape).contiguous(memory_format=fmt)
    prior = grad_prior and prior_mu is not None and row_w is not None
    # a prior of mu's shape: its gradients in mu's dtype on the CPU (csrc/latent.cpp)
    whole = prior_mu is not None and prior_mu.shape == mu.shape and prior_logscale.shape == mu.shape
    out = mu.dtype if whole and mu.device.type == "cpu" else _out_dtype(mu.dtype)
    shape = mu.shape if prior else (0,)
    return g_mu, g_ls, mu.new_empty(shape, dtype=out), mu.new_empty(shape, dtype=out)
