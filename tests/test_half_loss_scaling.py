"""float16 / bfloat16 gradients under loss scaling (torch.amp.GradScaler multiplies the loss by
2**16, halving on overflow): each gradient element is within 2 ulps of the exact value wherever
that value is a normal number of the dtype. The exact value: the float64 reference's gradient on
the same half values, times the grad_output. A recon gradient stored in half precision already
divided by N (mean, pixel_mean) underflows before the scale can rescue it.
"""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

import helpers as h

N, D, L = 1000, 16, 4
SCALES = [2.0 ** k for k in range(17)]
MODES = ("bce", "bce_logits", "mse", "l1", "gaussian_scalar", "gaussian_pixel")
MANTISSA = {h.F16: 10, h.BF16: 7}


def _inputs(mode, dtype, seed=0):
    """Residuals log-uniform over [1e-6, 1] (bce_logits: [5e-3, 0.5]), so that the local gradients span
    decades, most of them normal numbers of the dtype once scaled. The logvars stay away from 0,
    where exp(lv) - 1 cancels in float32 (as in plain float32 PyTorch)."""
    g = torch.Generator().manual_seed(seed)

    def decades(lo, shape):  # log-uniform magnitudes in [10**-lo, 1], random signs
        sign = torch.sign(torch.rand(shape, generator=g, dtype=h.F64) - 0.5)
        return 10 ** (-lo * torch.rand(shape, generator=g, dtype=h.F64)) * sign

    if mode == "bce":
        r = torch.rand(N, D, generator=g, dtype=h.F64) * 0.9 + 0.05
        x = (r + decades(6, (N, D)) * 0.04).clamp(0, 1)
    elif mode == "bce_logits":
        r = torch.randn(N, D, generator=g, dtype=h.F64) * 2
        x = (torch.sigmoid(r) + decades(2, (N, D)) * 0.5).clamp(0, 1)
    else:
        x = torch.rand(N, D, generator=g, dtype=h.F64) * 10 ** (-3 * torch.rand(N, D, generator=g, dtype=h.F64))
        r = x + decades(6, (N, D))
    lv = torch.sign(torch.rand(N, L, generator=g, dtype=h.F64) - 0.5) * (torch.rand(N, L, generator=g) + 0.5)
    out = dict(recon_x=r, x=x, mu=decades(3, (N, L)), logvar=lv, prior_mu=None, prior_logvar=None, recon_logvar=None)
    if mode == "gaussian_scalar":
        out["recon_logvar"] = torch.tensor(0.25, dtype=h.F64)
    elif mode == "gaussian_pixel":
        out["recon_logvar"] = torch.rand(N, D, generator=g, dtype=h.F64) * 2 - 1
    return {k: None if t is None else t.to(dtype) for k, t in out.items()}


def _ulp(exact, dtype):
    """The spacing of `dtype` at each (normal) |exact|, in float64."""
    _, e = torch.frexp(exact)
    return torch.ldexp(torch.ones_like(exact), (e - 1 - MANTISSA[dtype]).to(torch.int32))


def _conditioned(mode, inputs):
    """Where the local recon gradient holds the half dtype's digits in float32: not "bce_logits"'s
    sigmoid(l) - x with x within float32 rounding of sigmoid(l), a cancellation plain float32 PyTorch
    makes too (x rounded to the dtype may land there)."""
    if mode != "bce_logits":
        return None
    s, x = torch.sigmoid(inputs["recon_x"].double()), inputs["x"].double()
    return (s - x).abs() >= 2**-11 * (s + x.abs())


def _check(got, exact, dtype, what, judged=None):
    assert got.dtype == dtype, what
    fi = torch.finfo(dtype)
    normal = (exact.abs() >= fi.tiny) & (exact.abs() <= fi.max)
    if judged is not None:
        normal &= judged
    err = (got.double() - exact).abs() / _ulp(exact, dtype)
    bad = normal & ~(err <= 2)  # NaN is bad too
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {int(normal.sum())} normal elements off by more than "
                           f"2 ulps, worst {err[normal].nan_to_num(float('inf')).max().item():.3g} ulps")


@pytest.mark.parametrize("reduction", ["sum", "mean", "pixel_mean", "none"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [h.F16, h.BF16], ids=h.dtype_id)
def test_half_gradients_under_loss_scaling(dtype, mode, reduction):
    recon = "gaussian" if mode.startswith("gaussian") else mode
    inputs = _inputs(mode, dtype)
    names = [k for k in ("recon_x", "mu", "logvar", "recon_logvar") if inputs[k] is not None and
             not (k == "recon_logvar" and inputs[k].dim() == 0)]
    # per-sample weights that float32 holds exactly (reduction none: a weighted sum over samples)
    w = (torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5).to(h.F64)
    ref_in = {k: None if t is None else t.double() for k, t in inputs.items()}
    upstream1 = w if reduction == "none" else torch.ones((), dtype=h.F64)
    _, ref_grads = h.objective_run(reference.elbo_loss, ref_in, upstream=upstream1, recon=recon, reduction=reduction,
                                   beta=0.5)
    judged = _conditioned(mode, inputs)
    assert judged is None or judged.float().mean() > 0.9
    for scale in SCALES:
        _, grads = h.objective_run(vae_ext.elbo_loss, inputs, upstream=upstream1 * scale, recon=recon,
                                   reduction=reduction, beta=0.5)
        for name in names:
            _check(grads[name], ref_grads[name] * scale, dtype, f"{recon} {reduction} grad {name} at scale {scale:g}",
                   judged if name == "recon_x" else None)
