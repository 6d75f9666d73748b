"""The functional API: one call into the fused custom ops, with the argument handling that must
happen before dispatch.

The tensors' dtypes and shapes are checked once, in C++ (csrc/checks.cpp), before any kernel runs:
a ``TypeError`` (dtype) or ``ValueError`` (shape, device) that names the argument. Python keeps
what must come first: autocast's dtype promotion, the Python type of every argument, devices (a
tensor on the meta device would send the call to the fake kernel, which checks nothing), the
reshape of an ``x`` of another shape, refusing an ``x`` that requires grad, the option strings,
``beta`` (which never reaches the kernel) and ``num_samples`` / ``generator``.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _ops  # noqa: F401  (loads the kernels, registers their fake kernels)

__all__ = ["elbo_loss", "gaussian_kl", "reparameterize", "RECON_MODES", "REDUCTIONS", "KL_REDUCTIONS"]

RECON_MODES = ("bce", "bce_logits", "mse")
KL_REDUCTIONS = ("sum", "mean", "none")
# "pixel_mean": the reconstruction term averaged over every element, as F.mse_loss(recon, x) and
# the codebases built on it do (docs/porting.md); the KL term as "mean".
REDUCTIONS = ("sum", "mean", "pixel_mean", "none")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_is_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, float64, float16 or bfloat16 tensor, got dtype {t.dtype}"
        )


def _check_same(names_tensors, what: str) -> None:
    (n0, t0), *rest = names_tensors
    for n, t in rest:
        a, b = (t0.dtype, t.dtype) if what == "dtype" else (t0.device, t.device)
        if a != b:
            err = TypeError if what == "dtype" else ValueError
            raise err(f"{n}: expected the same {what} as {n0} ({a}), got {b}")


def _autocast_common_dtype(tensors):
    """Under ``torch.autocast`` for their device, float tensors of mixed dtypes (a bfloat16 decoder
    output beside a float32 batch x) are brought to their promoted dtype, as autocast's "promote"
    ops do; otherwise they are returned as they are (and a mismatch is an error below).

    The kernels compute in float32 for half inputs whatever happens, and widening a half tensor is
    exact, so this gives what autocast's float32 policy for losses gives, without widening inputs
    that all share a half dtype.
    """
    dev = tensors[0].device if isinstance(tensors[0], torch.Tensor) else None
    if (dev is None or not all(isinstance(t, torch.Tensor) and t.device == dev and t.dtype in _FLOAT_DTYPES
                               for t in tensors)
            or not torch.amp.is_autocast_available(dev.type) or not torch.is_autocast_enabled(dev.type)):
        return tensors
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta: expected a Python float >= 0, got {type(beta).__name__}")
    # Comparisons only (no math.isfinite): under torch.compile beta may be a symbolic float.
    if not (beta >= 0.0 and beta < math.inf):
        raise ValueError(f"beta: expected a finite float >= 0, got {beta}")
    return beta


def _elbo_args_ok(recon_x, x, mu, logvar, recon, reduction, beta) -> bool:
    """True when every argument passes the checks below: the usual call then skips them (they cost
    as much as a tenth of a small loss call). Anything unusual (beta an int, a tensor subclass, a
    bad value) takes the full checks, which raise the precise error."""
    t = torch.Tensor
    if not (type(recon_x) is t and type(x) is t and type(mu) is t and type(logvar) is t and type(beta) is float):
        return False
    dt, dev = recon_x.dtype, recon_x.device
    return (
        dt in _FLOAT_DTYPES and x.dtype == dt and mu.dtype == dt and logvar.dtype == dt
        and x.device == dev and mu.device == dev and logvar.device == dev
        and type(recon) is str and recon in RECON_MODES and type(reduction) is str and reduction in REDUCTIONS
        and 0.0 <= beta < math.inf
    )


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
    """Negative ELBO ``recon_loss(recon_x, x) + beta * KL(N(mu, exp(logvar)) || N(0, I))``, fused.

    Args:
        recon_x: decoder output, shape (N, ...): probabilities for ``recon="bce"``, logits for
            ``"bce_logits"``, values for ``"mse"``.
        x: target, the shape of ``recon_x`` (or any shape with the same batch size and the same
            number of elements per sample, as the classic example's ``x.view(-1, 784)``).
            It is treated as a constant: it must not require grad.
        mu, logvar: encoder outputs, shape (N, L).
        recon: ``"bce"`` (PyTorch's ``binary_cross_entropy``, with its log clamp at -100),
            ``"bce_logits"`` (stable BCE on logits) or ``"mse"`` (sum of squared errors).
        beta: weight of the KL term, a float >= 0; changing it needs no rebuild.
        reduction: ``"sum"`` over everything, ``"mean"`` (per-sample sums averaged over the
            batch), ``"none"`` (one value per sample, shape (N,)) or ``"pixel_mean"`` (the
            reconstruction term averaged over every element, as ``F.mse_loss(recon_x, x)``, and
            the KL term as ``"mean"``: the formulation of PyTorch-VAE and many tutorials; see
            docs/porting.md).
        return_terms: also return the reconstruction and KL terms (same reduction).
        validate: on CUDA, check that ``"bce"`` probabilities and targets lie in [0, 1] (one
            device sync). On CPU this check always runs and costs nothing. Without it, CUDA gives
            a NaN loss for a probability outside [0, 1], and the formula's finite value for a
            target outside it.

    Returns:
        ``loss`` or ``(loss, recon_term, kl_term)``. The dtype is the inputs' dtype for
        float32/float64 and float32 for float16/bfloat16 (computed and summed in float32);
        the gradients have the dtype of the tensors they belong to.
    """
    if not _elbo_args_ok(recon_x, x, mu, logvar, recon, reduction, beta):
        recon_x, x, mu, logvar = _autocast_common_dtype((recon_x, x, mu, logvar))
        for name, t in (("recon_x", recon_x), ("x", x), ("mu", mu), ("logvar", logvar)):
            _check_is_tensor(name, t)
        _check_same((("recon_x", recon_x), ("x", x), ("mu", mu), ("logvar", logvar)), "device")
        _check_choice("recon", recon, RECON_MODES)
        _check_choice("reduction", reduction, REDUCTIONS)
        _check_beta(beta)
    # dtypes and the shapes of recon_x, mu and logvar: checked by the op (csrc/checks.cpp)
    if x.shape != recon_x.shape:
        if recon_x.dim() < 1:
            raise ValueError("recon_x: expected a tensor of shape (N, ...), got a 0-d tensor")
        n = recon_x.shape[0]
        if x.dim() < 1 or x.shape[0] != n or x.numel() != recon_x.numel():
            raise ValueError(
                f"x: expected the shape of recon_x {tuple(recon_x.shape)} (or the same batch size "
                f"and number of elements per sample), got {tuple(x.shape)}"
            )
        x = x.reshape(recon_x.shape)
    grad_on = torch.is_grad_enabled()
    if grad_on and x.requires_grad:
        raise ValueError(
            "x: the target must not require grad (the fused loss treats it as a constant); "
            "pass x.detach()"
        )
    grad_recon = grad_on and recon_x.requires_grad
    grad_latent = grad_on and (mu.requires_grad or logvar.requires_grad)
    # beta stays out of the kernel: a new value needs no rebuild and no torch.compile
    # recompilation; autograd carries it to the KL gradient. In eager mode with beta = 1 (most
    # calls) the kernel adds the two terms itself: no add op, no autograd node, no extra tensor.
    # (When compiling, beta is never compared, so the graph does not specialize on 1.0.)
    # "pixel_mean" is "mean" with the reconstruction term divided by the values per sample (a 0-d
    # op; its backward scales the recon gradient once more, where a per-term scale in the kernel
    # would not: a cost only this porting aid pays).
    pixel_mean = reduction == "pixel_mean"
    total = not return_terms and not pixel_mean and not torch.compiler.is_compiling() and beta == 1.0
    rec, kl, _, _, _ = torch.ops.vae_ext.elbo_loss(
        recon_x, x, mu, logvar, recon, "mean" if pixel_mean else reduction, grad_recon, grad_latent,
        bool(validate), total
    )
    if total:
        return rec  # rec + kl
    if pixel_mean:
        rec = rec / math.prod(recon_x.shape[1:])
    loss = rec + beta * kl
    if return_terms:
        return loss, rec, kl
    return loss


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "sum"):
    """``KL(N(mu, exp(logvar)) || N(0, I))`` alone, fused: for a hierarchical VAE's KL per layer, or
    a loss whose reconstruction term is computed elsewhere (diffusers' ``AutoencoderKL``).

    Args:
        mu, logvar: the posterior's mean and log-variance, shape (N, ...): latents of any shape,
            conv latents (N, C, H, W) as they are. Summed per sample over every non-batch dimension.
        reduction: ``"sum"`` over everything, ``"mean"`` (per-sample sums averaged over the batch)
            or ``"none"`` (one value per sample, shape (N,)).

    Per element ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``, the KL term of :func:`elbo_loss`,
    computed by the same kernel (with an empty reconstruction). Returns a tensor of mu's dtype
    (float32 for float16/bfloat16); gradients flow to mu and logvar.
    """
    if isinstance(mu, torch.Tensor) and isinstance(logvar, torch.Tensor) and mu.dtype != logvar.dtype:
        mu, logvar = _autocast_common_dtype((mu, logvar))
    _check_tensor("mu", mu)
    _check_tensor("logvar", logvar)
    _check_same((("mu", mu), ("logvar", logvar)), "device")
    _check_same((("mu", mu), ("logvar", logvar)), "dtype")
    _check_choice("reduction", reduction, KL_REDUCTIONS)
    if mu.dim() < 1:
        raise ValueError("mu: expected a tensor of shape (N, ...), got a 0-d tensor")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    n, per_sample = mu.shape[0], math.prod(mu.shape[1:])  # (not reshape(n, -1): n may be 0)
    empty = mu.new_empty(n, 0)  # no reconstruction term: the kernel's KL part alone
    grad_latent = torch.is_grad_enabled() and (mu.requires_grad or logvar.requires_grad)
    kl, _, _, _, _ = torch.ops.vae_ext.elbo_loss(empty, empty, mu.reshape(n, per_sample), logvar.reshape(n, per_sample),
                                                 "mse", reduction, False, grad_latent, False, True)
    return kl


def reparameterize(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    return_eps: bool = False,
):
    """``z = mu + exp(0.5 * logvar) * eps``, ``eps ~ N(0, I)`` drawn inside the fused kernel.

    Args:
        mu, logvar: tensors of one shape, dtype (float32, float64, float16, bfloat16) and device.
        num_samples: ``K`` draws per element in one launch: z has shape (K, *mu.shape).
        generator: a ``torch.Generator`` on mu's device; default: PyTorch's default generator
            for that device, so ``torch.manual_seed`` makes runs reproducible.
        return_eps: also return the standard-normal draws ``eps`` (same shape as z).

    ``eps`` is drawn from a Philox4x32-10 stream keyed by (seed, offset, element index),
    computed in float32 (Box-Muller), the same on CPU and CUDA, and rounded to mu's dtype; z is
    computed from that eps in float32 (float64 for float64 inputs). The backward recomputes eps
    from the stream; no eps is kept between forward and backward. A channels_last(_3d) mu gives z
    (each z[k]), eps and the gradients in its layout, with the same eps per logical element.

    Where ``exp(0.5 * logvar)`` overflows (logvar > 177 in float32, > 1419 in float64, > 22 in
    float16), z is +-inf (NaN where mu is infinite with the opposite sign), as in the reference.
    """
    if isinstance(mu, torch.Tensor) and isinstance(logvar, torch.Tensor) and mu.dtype != logvar.dtype:
        mu, logvar = _autocast_common_dtype((mu, logvar))
    _check_is_tensor("mu", mu)
    _check_is_tensor("logvar", logvar)
    _check_same((("mu", mu), ("logvar", logvar)), "device")
    # dtypes and shapes: checked by the op (csrc/checks.cpp)
    if num_samples is None:
        k = 0
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
            raise TypeError(f"num_samples: expected None or an int >= 1, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"num_samples: expected None or an int >= 1, got {num_samples}")
        k = int(num_samples)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != mu.device.type:
            raise ValueError(
                f"generator: expected a generator on {mu.device.type} (mu's device), "
                f"got one on {generator.device.type}"
            )
    z, eps, _ = torch.ops.vae_ext.reparameterize(mu, logvar, k, bool(return_eps), generator)
    if return_eps:
        return z, eps
    return z
