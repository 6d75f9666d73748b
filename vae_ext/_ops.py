"""Fake (meta) kernels and autograd formulas for the custom ops that ``vae_ext._C`` registers.

The C++ side (csrc/ops.cpp) defines the schemas and the CPU/CUDA kernels; this module adds what
``torch.compile`` and autograd need, through ``torch.library``. Users call :mod:`vae_ext.functional`.
"""
from __future__ import annotations

import torch

from ._build import _C  # noqa: F401  (loads the library: registers torch.ops.vae_ext.*)

_HALF = (torch.float16, torch.bfloat16)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


# --------------------------------------------------------------------------- elbo_loss
# vae_ext::elbo_loss(recon, x, mu, logvar, recon_mode, reduction, grad_recon, grad_latent, validate)
#   -> (rec, kl, g_recon, g_mu, g_logvar)
# rec and kl are the reduced reconstruction and KL terms; g_* are d(term)/d(input), written in the
# same pass (empty when their flag is False); the backward only scales them by grad_output.


@torch.library.register_fake("vae_ext::elbo_loss")
def _elbo_loss_fake(recon, x, mu, logvar, recon_mode, reduction, grad_recon, grad_latent, validate):
    out_dtype = _out_dtype(recon.dtype)
    shape = (recon.shape[0],) if reduction == "none" else ()
    rec = recon.new_empty(shape, dtype=out_dtype)
    kl = recon.new_empty(shape, dtype=out_dtype)
    g_recon = torch.empty_like(recon, memory_format=torch.contiguous_format) if grad_recon else recon.new_empty(0)
    g_mu = torch.empty_like(mu, memory_format=torch.contiguous_format) if grad_latent else mu.new_empty(0)
    g_logvar = torch.empty_like(logvar, memory_format=torch.contiguous_format) if grad_latent else mu.new_empty(0)
    return rec, kl, g_recon, g_mu, g_logvar


def _elbo_loss_setup_context(ctx, inputs, output):
    recon, x, mu, logvar, recon_mode, reduction, grad_recon, grad_latent, validate = inputs
    _, _, g_recon, g_mu, g_logvar = output
    ctx.reduction = reduction
    ctx.has_grad_recon = grad_recon
    ctx.has_grad_latent = grad_latent
    ctx.save_for_backward(g_recon, g_mu, g_logvar)
    ctx.mark_non_differentiable(g_recon, g_mu, g_logvar)
    # The gradient buffers are outputs nobody differentiates: don't materialize zero gradients
    # for them (a zero tensor the size of recon_x on every backward).
    ctx.set_materialize_grads(False)


def _scale(g: torch.Tensor, d: torch.Tensor | None, reduction: str) -> torch.Tensor | None:
    """g * d, with d a 0-d tensor (sum, mean) or one value per sample (none).

    Out of place: the saved buffer must survive for a second backward through the same graph
    (retain_graph=True, gradcheck).
    """
    if d is None:
        return None
    d = d.to(g.dtype)
    if reduction == "none":
        d = d.reshape((-1,) + (1,) * (g.dim() - 1))
    return g * d


def _elbo_loss_backward(ctx, d_rec, d_kl, _g1, _g2, _g3):
    g_recon, g_mu, g_logvar = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if (needs[0] and not ctx.has_grad_recon) or ((needs[2] or needs[3]) and not ctx.has_grad_latent):
        raise RuntimeError(
            "vae_ext::elbo_loss: backward needs the gradient buffers, but the op was called with "
            "grad_recon/grad_latent=False; call it through vae_ext.elbo_loss"
        )
    if needs[1]:
        raise RuntimeError("vae_ext::elbo_loss does not differentiate with respect to the target x")
    r = _scale(g_recon, d_rec, ctx.reduction) if needs[0] else None
    m = _scale(g_mu, d_kl, ctx.reduction) if needs[2] else None
    lv = _scale(g_logvar, d_kl, ctx.reduction) if needs[3] else None
    return r, None, m, lv, None, None, None, None, None


torch.library.register_autograd(
    "vae_ext::elbo_loss", _elbo_loss_backward, setup_context=_elbo_loss_setup_context
)


# --------------------------------------------------------------------------- reparameterize
# vae_ext::reparameterize(mu, logvar, num_samples, return_eps, generator) -> (z, eps, rng_state)
# num_samples == 0 means "no samples dimension". rng_state holds the (seed, offset) the kernel
# used, as int64 on mu's device; the backward recomputes eps from it instead of storing eps.


@torch.library.register_fake("vae_ext::reparameterize")
def _reparameterize_fake(mu, logvar, num_samples, return_eps, generator=None):
    shape = tuple(mu.shape) if num_samples == 0 else (num_samples, *mu.shape)
    z = mu.new_empty(shape)
    eps = mu.new_empty(shape) if return_eps else mu.new_empty(0)
    state = mu.new_empty(2, dtype=torch.int64)
    return z, eps, state


@torch.library.register_fake("vae_ext::reparameterize_backward")
def _reparameterize_backward_fake(grad_z, logvar, rng_state, num_samples):
    return torch.empty_like(logvar, memory_format=torch.contiguous_format), torch.empty_like(
        logvar, memory_format=torch.contiguous_format
    )


@torch.library.register_fake("vae_ext::philox_normal")
def _philox_normal_fake(like, seed, offset):
    return torch.empty_like(like, dtype=torch.float32, memory_format=torch.contiguous_format)


def _reparameterize_setup_context(ctx, inputs, output):
    mu, logvar, num_samples, return_eps, generator = inputs
    _, _, state = output
    ctx.num_samples = num_samples
    ctx.save_for_backward(logvar, state)
    ctx.mark_non_differentiable(output[1], state)
    ctx.set_materialize_grads(False)


def _reparameterize_backward(ctx, grad_z, _grad_eps, _grad_state):
    logvar, state = ctx.saved_tensors
    if grad_z is None:
        return None, None, None, None, None
    grad_mu, grad_logvar = torch.ops.vae_ext.reparameterize_backward(
        grad_z.contiguous(), logvar, state, ctx.num_samples
    )
    return grad_mu, grad_logvar, None, None, None


torch.library.register_autograd(
    "vae_ext::reparameterize", _reparameterize_backward, setup_context=_reparameterize_setup_context
)
