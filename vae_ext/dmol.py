"""The discretized mixture of logistics (DMoL), fused: the decoder likelihood of PixelCNN++, VDVAE,
NVAE and WaveNet vocoders, and its sampler.

Python keeps what must come before dispatch: the Python types of the arguments, autocast's dtype
promotion, devices, refusing an ``x`` that requires grad. Shapes, dtypes and values are checked once,
in C++ (csrc/dmol.cpp), before any kernel runs. The math: ``vae_ext.reference.dmol_nll``'s
docstring and docs/design.md.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _ops  # noqa: F401  (loads the kernels, registers their fake kernels)
from ._checks import _autocast_common_dtype, _check_choice, _check_is_tensor, _check_same

__all__ = ["dmol_nll", "dmol_sample"]

_REDUCTIONS = ("sum", "mean", "none")


def _check_int(name: str, value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a Python int {what}, got {type(value).__name__}")
    return int(value)


def _check_log_scale_min(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"log_scale_min: expected a finite Python float, got {type(value).__name__}")
    # comparisons only (no math.isfinite): under torch.compile it may be a symbolic float
    if not (-math.inf < value < math.inf):
        raise ValueError(f"log_scale_min: expected a finite float, got {value}")
    return value


def dmol_nll(params: torch.Tensor, x: torch.Tensor, *, num_bits: int = 8, reduction: str = "sum",
             log_scale_min: float = -7.0, validate: bool = False) -> torch.Tensor:
    """Negative log-likelihood of ``x`` under the discretized mixture of logistics ``params``, fused:
    one pass computes the loss and (when ``params`` requires grad) its gradient, keeping nothing but
    ``params``, ``x`` and that gradient.

    Args:
        params: (N, P, *S): P = 10 M for RGB (M logits, then per channel R, G, B a block of M means,
            M log-scales, M coupling coefficients), P = 3 M for one channel (logits, means,
            log-scales): the layout of PixelCNN++, VDVAE, NVAE and WaveNet vocoders. Channels-first
            (NVAE) and channels_last (VDVAE's (N, H, W, P) output permuted to (N, P, H, W)) are read
            as they are; other strides are copied once.
        x: (N, C, *S), C = 1 or 3, on the grid of ``num_bits``-bit values scaled to [-1, 1]; the
            data: it must not require grad.
        num_bits: 1..16 (8 for images, 5 for VDVAE's ``low_bit``, 16 for audio).
        reduction: ``"sum"`` over the batch, ``"mean"`` (per-sample sums averaged over the batch) or
            ``"none"`` (shape (N,)). VDVAE's per-dimension loss is ``"none"`` divided by
            ``x[0].numel()``.
        log_scale_min: the floor of the log-scales (-7 in every original); below it they get no
            gradient (torch.clamp's, which passes at the tie).
        validate: on CUDA, check that x lies in [-1, 1] (one device sync). On CPU the check is part
            of the pass and always runs.

    Returns the loss in ``params``' dtype (float32 for float16/bfloat16 inputs, computed in float32).
    The math, branch by branch: :func:`vae_ext.reference.dmol_nll`.
    """
    if isinstance(params, torch.Tensor) and isinstance(x, torch.Tensor) and params.dtype != x.dtype:
        params, x = _autocast_common_dtype((params, x))
    _check_is_tensor("params", params)
    _check_is_tensor("x", x)
    _check_same((("params", params), ("x", x)), "device")
    _check_choice("reduction", reduction, _REDUCTIONS)
    num_bits = _check_int("num_bits", num_bits, "in 1..16")
    if not 1 <= num_bits <= 16:
        raise ValueError(f"num_bits: expected an int in 1..16, got {num_bits}")
    log_scale_min = _check_log_scale_min(log_scale_min)
    grad_on = torch.is_grad_enabled()
    if grad_on and x.requires_grad:
        raise ValueError("x: the data must not require grad (dmol_nll treats it as a constant); pass x.detach()")
    grad = grad_on and params.requires_grad
    loss, _ = torch.ops.vae_ext.dmol_nll(params, x, num_bits, reduction, log_scale_min, grad, bool(validate))
    return loss


def dmol_sample(params: torch.Tensor, *, num_channels: int, generator: torch.Generator | None = None,
                log_scale_min: float = -7.0) -> torch.Tensor:
    """One sample per pixel from the mixture ``params`` (N, P, *S) (layout: :func:`dmol_nll`), shape
    (N, num_channels, *S), in ``params``' dtype (computed in float32 for half types, float64 for
    float64), as VDVAE and PixelCNN++ draw it: the component by Gumbel-max, a logistic draw from it,
    G and B coupled to the sampled lower channels, each clamped to [-1, 1] (not rounded to the grid).

    The uniforms come from the package's Philox stream, keyed by a seed (and offset) drawn from
    ``generator`` (default: the device's default generator, so ``torch.manual_seed`` makes runs
    reproducible), as :func:`vae_ext.reparameterize`'s: the same samples for any thread count.
    No gradient.
    """
    _check_is_tensor("params", params)
    num_channels = _check_int("num_channels", num_channels, "(1 or 3)")
    log_scale_min = _check_log_scale_min(log_scale_min)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != params.device.type:
            raise ValueError(f"generator: expected a generator on {params.device.type} (params' device), "
                             f"got one on {generator.device.type}")
    return torch.ops.vae_ext.dmol_sample(params, num_channels, log_scale_min, generator)


def _pixel_mean_refused() -> ValueError:
    return ValueError(
        "reduction: 'pixel_mean' does not apply to recon='dmol' (it divides the reconstruction term alone, "
        "the F.mse_loss convention); VDVAE's per-dimension loss divides both terms: "
        "elbo_loss(..., reduction='mean') / x[0].numel() (nats per dimension; / math.log(2) for bits per dimension)")


def check_dmol_options(recon: str, reduction: str, num_bits, log_scale_min) -> tuple:
    """(num_bits, log_scale_min) with their defaults for ``recon="dmol"``; a named error for an option that
    does not apply: num_bits or log_scale_min with another mode, pixel_mean with dmol."""
    if recon != "dmol":
        for name, value in (("num_bits", num_bits), ("log_scale_min", log_scale_min)):
            if value is not None:
                raise ValueError(f"{name}: only recon='dmol' takes it, got recon={recon!r}")
        return num_bits, log_scale_min
    if reduction == "pixel_mean":
        raise _pixel_mean_refused()
    num_bits = 8 if num_bits is None else _check_int("num_bits", num_bits, "in 1..16")
    if not 1 <= num_bits <= 16:
        raise ValueError(f"num_bits: expected an int in 1..16, got {num_bits}")
    log_scale_min = -7.0 if log_scale_min is None else _check_log_scale_min(log_scale_min)
    return num_bits, log_scale_min
