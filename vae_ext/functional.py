"""The functional API: one call into the fused custom ops, with the argument handling that must
happen before dispatch.

The tensors' dtypes and shapes are checked once, in C++ (csrc/checks.cpp), before any kernel runs:
a ``TypeError`` (dtype) or ``ValueError`` (shape, device) that names the argument; on the meta
device the fake kernels repeat the shape checks (vae_ext/_shape_checks.py). Python keeps
what must come first: autocast's dtype promotion, the Python type of every argument, devices (a
tensor on the meta device would send the call to the fake kernel, which checks no device), the
reshape of an ``x`` of another shape, refusing an ``x`` that requires grad, the option strings,
``beta`` (which never reaches the kernel) and ``num_samples`` / ``generator``.
"""
from __future__ import annotations

import math

import torch

from . import _ops  # noqa: F401  (loads the kernels, registers their fake kernels)
from ._checks import (  # noqa: F401  (re-exported: the models and losses take them from here)
    _FLOAT_DTYPES,
    _autocast_common_dtype,
    _autocast_enabled,
    _check_beta,
    _check_choice,
    _check_free_bits,
    _check_generator,
    _check_is_tensor,
    _check_num_samples,
    _check_same,
    _check_target_dtype,
    _check_tensor,
)
from .dmol import _REDUCTIONS as _DMOL_REDUCTIONS
from .dmol import check_dmol_options, dmol_nll

__all__ = ["elbo_loss", "gaussian_kl", "reparameterize", "RECON_MODES", "REDUCTIONS", "KL_REDUCTIONS"]

# "dmol": the discretized mixture of logistics, vae_ext.dmol_nll beside gaussian_kl (vae_ext/dmol.py)
RECON_MODES = ("bce", "bce_logits", "mse", "l1", "gaussian", "dmol")
KL_REDUCTIONS = ("sum", "mean", "none")
# "pixel_mean": the reconstruction term averaged over every element, as F.mse_loss(recon, x) and
# the codebases built on it do (docs/porting.md); the KL term as "mean".
REDUCTIONS = ("sum", "mean", "pixel_mean", "none")


# The common call's lean op (csrc/elbo_basic.h): the loss alone, no option but beta and pixel_mean.
_ELBO_BASIC = torch.ops.vae_ext.elbo_loss_basic.default
_BASIC_MODES = ("bce", "bce_logits", "mse", "l1")


def _basic_tensors_ok(recon_x, x, mu, logvar) -> bool:
    """Plain CPU tensors of one float dtype, x of recon_x's shape: the common call's lean op takes
    them, and it checks the rest (shapes, what the kernel finds) itself."""
    t = torch.Tensor
    if not (type(recon_x) is t and type(x) is t and type(mu) is t and type(logvar) is t):
        return False
    dt = recon_x.dtype
    return (dt in _FLOAT_DTYPES and x.dtype is dt and mu.dtype is dt and logvar.dtype is dt and recon_x.is_cpu
            and x.is_cpu and mu.is_cpu and logvar.is_cpu and x.shape == recon_x.shape)


def _elbo_args_ok(recon_x, x, mu, logvar, recon, reduction, beta, extra) -> bool:
    """True when every argument passes the checks below: the usual call then skips them (they cost
    as much as a tenth of a small loss call). Anything unusual (beta an int, a tensor subclass, a
    bad value, a prior) takes the full checks, which raise the precise error."""
    t = torch.Tensor
    if not (type(recon_x) is t and type(x) is t and type(mu) is t and type(logvar) is t and type(beta) is float
            and extra is None):
        return False
    dt, dev = recon_x.dtype, recon_x.device
    return (
        dt in _FLOAT_DTYPES and x.dtype == dt and mu.dtype == dt and logvar.dtype == dt
        and x.device == dev and mu.device == dev and logvar.device == dev
        and type(recon) is str and recon in RECON_MODES and type(reduction) is str and reduction in REDUCTIONS
        and 0.0 <= beta < math.inf
    )


_X_REQUIRES_GRAD = "x: the target must not require grad (the fused loss treats it as a constant); pass x.detach()"


def _optional_tensors(names_tensors):
    """The given (name, tensor) pairs of the optional tensor arguments, each checked to be a tensor."""
    given = [(n, t) for n, t in names_tensors if t is not None]
    for n, t in given:
        _check_is_tensor(n, t)
    return given


def _kl_true(kl, units, n, reduction):
    """With free bits, the true KL under ``reduction`` (the op's kl is the floored one), from the
    per-unit KL; detached: it is for logging. Summed in float64 in index order (a cumulative sum is
    one sequential scan), as the kernels' sums: ``Tensor.sum`` would split a long sum over threads,
    and its bits would depend on their number. An empty batch: 0 for "sum", NaN for a mean (the
    reference's empty sum and mean; its units are 0 / 0)."""
    if n == 0:
        return torch.full((), 0.0 if reduction == "sum" else math.nan, dtype=kl.dtype, device=kl.device)
    flat = units.detach().reshape(-1).to(torch.float64)
    total = flat.cumsum(0)[-1] if flat.numel() else flat.new_zeros(())
    return (total * n if reduction == "sum" else total).to(kl.dtype)


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
    """Negative ELBO ``recon_loss(recon_x, x) + beta * KL(q(z|x) || p(z))``, fused.

    Args:
        recon_x: decoder output, shape (N, ...): probabilities for ``recon="bce"``, logits for
            ``"bce_logits"``, values for ``"mse"``, ``"l1"`` and ``"gaussian"``; for ``"dmol"`` the
            mixture's ``params`` (N, P, *S), as :func:`vae_ext.dmol_nll` takes them.
        x: target, the shape of ``recon_x`` (or any shape with the same batch size and the same
            number of elements per sample, as the classic example's ``x.view(-1, 784)``).
            It is treated as a constant: it must not require grad.
        mu, logvar: encoder outputs, shape (N, ...): latents of any shape, conv latents
            (N, C, H, W) as they are; summed per sample over every non-batch dimension.
        recon: ``"bce"`` (PyTorch's ``binary_cross_entropy``, with its log clamp at -100),
            ``"bce_logits"`` (stable BCE on logits), ``"mse"`` (sum of squared errors), ``"l1"``
            (sum of absolute errors, gradient ``sign(r - x)``, 0 at a tie or a NaN difference as
            ``F.l1_loss``'s) or ``"gaussian"`` (the Gaussian
            negative log-likelihood ``0.5 * ((x - r)^2 * exp(-recon_logvar) + recon_logvar +
            log(2 pi))`` per element) or ``"dmol"`` (the discretized mixture of logistics,
            :func:`vae_ext.dmol_nll` of ``recon_x`` as params and x (N, C, *S) in [-1, 1], computed
            by its own fused op beside :func:`vae_ext.gaussian_kl`'s; ``"pixel_mean"`` and
            ``recon_logvar`` do not apply and are refused: VDVAE's per-dimension loss is the
            ``"mean"`` loss divided by ``x[0].numel()``).
        beta: weight of the KL term, a float >= 0; changing it needs no rebuild.
        reduction: ``"sum"`` over everything, ``"mean"`` (per-sample sums averaged over the
            batch), ``"none"`` (one value per sample, shape (N,)) or ``"pixel_mean"`` (the
            reconstruction term averaged over every element, as ``F.mse_loss(recon_x, x)``, and
            the KL term as ``"mean"``: the formulation of PyTorch-VAE and many tutorials; see
            docs/porting.md).
        return_terms: also return the reconstruction and KL terms (same reduction). With
            ``free_bits`` the KL returned is the true KL (detached, for logging); the loss uses the
            floored one.
        validate: on CUDA, check that ``"bce"`` probabilities and targets lie in [0, 1] (one
            device sync). On CPU this check always runs and costs nothing. Without it, CUDA gives
            a NaN loss for a probability outside [0, 1], and the formula's finite value for a
            target outside it.
        prior_mu, prior_logvar: a learned Gaussian prior N(prior_mu, exp(prior_logvar)) (both or
            neither; default N(0, I)): mu's shape (a conditional prior network's output, a
            hierarchical VAE's top-down prior) or broadcastable to it (a prior shared by every
            sample, e.g. shape (L,) or (C, 1, 1)), mu's dtype and device. The KL per element is
            ``0.5 * (plv - lv + (exp(lv) + (mu - pmu)^2) * exp(-plv) - 1)``; gradients flow to the
            prior too, summed over the dimensions it was broadcast along.
        recon_logvar: ``recon="gaussian"`` only: the decoder's log-variance, a 0-d tensor (one
            learned value) or recon_x's shape (one per element); it gets its gradient.
        free_bits: nats per latent unit (each position of mu.shape[1:]), Kingma et al. 2016: the
            KL term becomes ``sum_u max(free_bits, KL_u)``, KL_u the unit's KL averaged over the
            batch (times N for ``"sum"``); units under the floor get no KL gradient. Not with
            ``reduction="none"`` (the floor is a batch statistic).
        return_unit_kl: also return each unit's KL averaged over the batch, shape mu.shape[1:]
            (detached; the true KL): posterior-collapse diagnostics (a unit near 0 nats is inactive).
        num_bits, log_scale_min: ``recon="dmol"`` only (default 8 and -7.0): the bit depth of x's grid
            and the floor of the log-scales, as :func:`vae_ext.dmol_nll` takes them.

    Returns:
        ``loss``, ``(loss, recon_term, kl_term)`` with ``return_terms``, and ``unit_kl`` appended
        with ``return_unit_kl``. The dtype is the inputs' dtype for float32/float64 and float32
        for float16/bfloat16 (computed and summed in float32); the gradients have the dtype of the
        tensors they belong to.
    """
    # The common call (CPU, eager, no option but beta and pixel_mean, the usual types): one lean op,
    # about a tenth fewer instructions than the full one at MNIST sizes (docs/design.md). Anything
    # else takes the checks and the op below.
    if (not return_terms and not return_unit_kl and prior_mu is None and prior_logvar is None
            and recon_logvar is None and num_bits is None and log_scale_min is None and type(free_bits) is float
            and free_bits == 0.0 and type(beta) is float and 0.0 <= beta < math.inf and type(recon) is str
            and recon in _BASIC_MODES and type(reduction) is str and reduction in REDUCTIONS
            and _basic_tensors_ok(recon_x, x, mu, logvar) and not torch.compiler.is_compiling()):
        grad_on = torch.is_grad_enabled()
        if grad_on and x.requires_grad:
            raise ValueError(_X_REQUIRES_GRAD)
        return _ELBO_BASIC(recon_x, x, mu, logvar, recon, reduction, beta, grad_on and recon_x.requires_grad,
                           grad_on and (mu.requires_grad or logvar.requires_grad), bool(validate))[0]
    if type(recon) is str and recon == "dmol":  # two fused ops: vae_ext/dmol.py

        return _elbo_loss_dmol(recon_x, x, mu, logvar, beta=beta, reduction=reduction, return_terms=return_terms,
                              validate=validate, prior_mu=prior_mu, prior_logvar=prior_logvar,
                              recon_logvar=recon_logvar, free_bits=free_bits, return_unit_kl=return_unit_kl,
                              num_bits=num_bits, log_scale_min=log_scale_min)
    if num_bits is not None or log_scale_min is not None:
        name = "num_bits" if num_bits is not None else "log_scale_min"
        raise ValueError(f"{name}: only recon='dmol' takes it, got recon={recon!r}")
    options = (prior_mu, prior_logvar, recon_logvar)
    extra = None if (prior_mu is None and prior_logvar is None and recon_logvar is None and type(free_bits) is float
                     and free_bits == 0.0 and not return_unit_kl) else options
    if not _elbo_args_ok(recon_x, x, mu, logvar, recon, reduction, beta, extra):
        given = _optional_tensors((("prior_mu", prior_mu), ("prior_logvar", prior_logvar),
                                   ("recon_logvar", recon_logvar)))
        tensors = _autocast_common_dtype((recon_x, x, mu, logvar, *(t for _, t in given)))
        recon_x, x, mu, logvar = tensors[:4]
        given = [(n, t) for (n, _), t in zip(given, tensors[4:])]
        for name, t in (("recon_x", recon_x), ("x", x), ("mu", mu), ("logvar", logvar)):
            _check_is_tensor(name, t)
        _check_target_dtype(x, recon_x)
        _check_same((("recon_x", recon_x), ("x", x), ("mu", mu), ("logvar", logvar), *given), "device")
        _check_choice("recon", recon, RECON_MODES)
        _check_choice("reduction", reduction, REDUCTIONS)
        beta = _check_beta(beta)
        free_bits = _check_free_bits(free_bits)
        named = dict(given)
        prior_mu, prior_logvar, recon_logvar = (named.get(n) for n in ("prior_mu", "prior_logvar", "recon_logvar"))
    # dtypes, shapes and the options' values: checked by the op (csrc/checks.cpp)
    if x.shape != recon_x.shape:
        if recon_x.dim() < 1:
            raise ValueError("recon_x: expected a tensor of shape (N, ...), got a 0-d tensor")
        n = recon_x.shape[0]
        # elements per sample, not numel: an empty batch has 0 of any size
        if x.dim() < 1 or x.shape[0] != n or math.prod(x.shape[1:]) != math.prod(recon_x.shape[1:]):
            raise ValueError(
                f"x: expected the shape of recon_x {list(recon_x.shape)} (or the same batch size "
                f"and number of elements per sample), got {list(x.shape)}"
            )
        x = x.reshape(recon_x.shape)
    grad_on = torch.is_grad_enabled()
    if grad_on and x.requires_grad:
        raise ValueError(_X_REQUIRES_GRAD)

    def req(t):
        return t is not None and t.requires_grad

    grad_recon = grad_on and (recon_x.requires_grad or req(recon_logvar))
    grad_latent = grad_on and (mu.requires_grad or logvar.requires_grad or req(prior_mu) or req(prior_logvar))
    # beta stays out of the kernel: a new value needs no rebuild and no torch.compile
    # recompilation; autograd carries it to the KL gradient. In eager mode with beta = 1 (most
    # calls) the kernel adds the two terms itself: no add op, no autograd node, no extra tensor.
    # (When compiling, beta is never compared, so the graph does not specialize on 1.0.)
    # "pixel_mean" is "mean" with the reconstruction term divided by the values per sample (a 0-d
    # op; its backward scales the recon gradient once more, where a per-term scale in the kernel
    # would not: a cost only this porting aid pays; the common call's lean op above divides itself).
    pixel_mean = reduction == "pixel_mean"
    total = not return_terms and not pixel_mean and not torch.compiler.is_compiling() and beta == 1.0
    units_wanted = return_unit_kl or (return_terms and free_bits > 0)
    rec, kl, units, *_ = torch.ops.vae_ext.elbo_loss(
        recon_x, x, mu, logvar, recon, "mean" if pixel_mean else reduction, grad_recon, grad_latent,
        bool(validate), total, prior_mu, prior_logvar, recon_logvar, free_bits, units_wanted
    )
    extra_out = (units,) if return_unit_kl else ()
    if total:
        return (rec, *extra_out) if extra_out else rec  # rec + kl
    if pixel_mean:
        rec = rec / math.prod(recon_x.shape[1:])
    loss = rec + beta * kl
    if return_terms:
        if free_bits > 0:
            kl = _kl_true(kl, units, mu.shape[0], reduction)
        return (loss, rec, kl, *extra_out)
    return (loss, *extra_out) if extra_out else loss


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor | None = None,
                prior_logvar: torch.Tensor | None = None, *, reduction: str = "sum", free_bits: float = 0.0,
                return_unit_kl: bool = False):
    """``KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar)))`` alone, fused: for a hierarchical
    VAE's KL per layer, or a loss whose reconstruction term is computed elsewhere (diffusers'
    ``AutoencoderKL``).

    Args:
        mu, logvar: the posterior's mean and log-variance, shape (N, ...): latents of any shape,
            conv latents (N, C, H, W) as they are. Summed per sample over every non-batch dimension.
        prior_mu, prior_logvar: the prior (both or neither; default N(0, I)), mu's shape or
            broadcastable to it, as in :func:`elbo_loss`; they get gradients.
        reduction: ``"sum"`` over everything, ``"mean"`` (per-sample sums averaged over the batch)
            or ``"none"`` (one value per sample, shape (N,)).
        free_bits: the floor in nats per latent unit, as in :func:`elbo_loss` (the result is then
            the floored KL).
        return_unit_kl: also return each unit's KL averaged over the batch (mu.shape[1:], detached).

    Per element ``0.5 * (plv - lv + (exp(lv) + (mu - pmu)^2) * exp(-plv) - 1)`` (with no prior
    ``0.5 * (mu^2 + exp(logvar) - 1 - logvar)``), the KL term of :func:`elbo_loss`, computed by the
    same kernel (with an empty reconstruction). Returns a tensor of mu's dtype (float32 for
    float16/bfloat16).
    """
    given = _optional_tensors((("prior_mu", prior_mu), ("prior_logvar", prior_logvar)))
    if isinstance(mu, torch.Tensor) and isinstance(logvar, torch.Tensor):
        tensors = _autocast_common_dtype((mu, logvar, *(t for _, t in given)))
        mu, logvar = tensors[:2]
        named = dict((n, t) for (n, _), t in zip(given, tensors[2:]))
        prior_mu, prior_logvar = named.get("prior_mu"), named.get("prior_logvar")
    _check_tensor("mu", mu)
    _check_tensor("logvar", logvar)
    _check_same((("mu", mu), ("logvar", logvar), *given), "device")
    _check_same((("mu", mu), ("logvar", logvar)), "dtype")
    _check_choice("reduction", reduction, KL_REDUCTIONS)
    free_bits = _check_free_bits(free_bits)
    if mu.dim() < 1:
        raise ValueError("mu: expected a tensor of shape (N, ...), got a 0-d tensor")
    if logvar.shape != mu.shape:
        raise ValueError(f"logvar: expected the shape of mu {list(mu.shape)}, got {list(logvar.shape)}")
    empty = mu.new_empty(mu.shape[0], 0)  # no reconstruction term: the kernel's KL part alone
    grad_latent = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                  for t in (mu, logvar, prior_mu, prior_logvar))
    kl, _, units, *_ = torch.ops.vae_ext.elbo_loss(empty, empty, mu, logvar, "mse", reduction, False, grad_latent,
                                                   False, True, prior_mu, prior_logvar, None, free_bits,
                                                   bool(return_unit_kl))
    return (kl, units) if return_unit_kl else kl


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
    k = _check_num_samples(num_samples)
    _check_generator(generator, mu)
    z, eps, _ = torch.ops.vae_ext.reparameterize(mu, logvar, k, bool(return_eps), generator)
    if return_eps:
        return z, eps
    return z


def _elbo_loss_dmol(params, x, mu, logvar, *, beta, reduction, return_terms, validate, prior_mu, prior_logvar,
                   recon_logvar, free_bits, return_unit_kl, num_bits, log_scale_min):
    """``vae_ext.elbo_loss(recon="dmol")``: :func:`dmol_nll` beside :func:`vae_ext.gaussian_kl`, two fused
    ops (the loss kernel has no DMoL term: its gradient is written by the DMoL kernel's own pass), with
    elbo_loss's semantics for beta, the reductions, the terms, priors, free bits and unit KL."""
    if recon_logvar is not None:
        raise ValueError("recon_logvar: only for recon='gaussian'; recon='dmol' takes its scales from params")
    num_bits, log_scale_min = check_dmol_options("dmol", reduction, num_bits, log_scale_min)
    _check_choice("reduction", reduction, _DMOL_REDUCTIONS)
    _check_beta(beta)
    free_bits = _check_free_bits(free_bits)
    # before the DMoL kernel runs (gaussian_kl's op would refuse them only after it)
    if not (free_bits >= 0.0 and free_bits < math.inf):
        raise ValueError(f"free_bits: expected a finite float >= 0 (nats per latent unit), got {free_bits}")
    if free_bits > 0.0 and reduction == "none":
        raise ValueError("free_bits: the floor applies to each unit's KL averaged over the batch, so it needs "
                         "reduction 'sum' or 'mean', not 'none'")
    for name, t in (("params", params), ("x", x), ("mu", mu), ("logvar", logvar)):
        _check_is_tensor(name, t)
    _check_same((("params", params), ("x", x), ("mu", mu), ("logvar", logvar)), "device")
    if params.dim() < 1 or mu.dim() < 1:
        raise ValueError(f"{'params' if params.dim() < 1 else 'mu'}: expected a tensor of shape (N, ...), "
                         "got a 0-d tensor")
    if mu.shape[0] != params.shape[0]:
        raise ValueError(f"mu: expected the batch size of params ({params.shape[0]}), got {mu.shape[0]}")
    if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.requires_grad:
        raise ValueError("x: the target must not require grad (the fused loss treats it as a constant); "
                         "pass x.detach()")
    rec = dmol_nll(params, x, num_bits=num_bits, reduction=reduction, log_scale_min=log_scale_min,
                   validate=validate)
    units_wanted = bool(return_unit_kl) or (return_terms and free_bits > 0)
    kl = gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=reduction, free_bits=free_bits,
                     return_unit_kl=units_wanted)
    kl, units = kl if units_wanted else (kl, None)
    loss = rec + beta * kl
    extra_out = (units,) if return_unit_kl else ()
    if return_terms:
        if free_bits > 0:
            kl = _kl_true(kl, units, mu.shape[0], reduction)
        return (loss, rec, kl, *extra_out)
    return (loss, *extra_out) if extra_out else loss
