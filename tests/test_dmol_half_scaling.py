"""float16 / bfloat16 gradients of dmol_nll under loss scaling, the rule of test_half_loss_scaling.py:
with grad_output from 1 to 65536 (torch.amp.GradScaler's scales), each element of the params gradient
is within 2 ulps of the exact value wherever that value is a normal number of the dtype. The exact
value: the float64 reference's gradient on the same half inputs, times the grad_output. The forward's
gradient buffer must stay in float32 until the backward scales it: stored in half (divided by N
for "mean"), a component's small responsibility-weighted gradients fall to subnormals or to 0 first.
"""
from __future__ import annotations

import pytest
import torch
from test_half_loss_scaling import SCALES, _check, _ulp

import vae_ext
from vae_ext import reference

import helpers as h
from dmol_originals import dmol_inputs

N = 50  # not a power of two: 1/N is rounded


def _grad(fn, params, x, upstream, reduction):
    p = params.detach().clone().requires_grad_(True)
    out = fn(p, x, reduction=reduction)
    (g,) = torch.autograd.grad(out, p, upstream.to(out.dtype))
    return g


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("dtype", [h.F16, h.BF16], ids=h.dtype_id)
def test_dmol_half_gradients_under_loss_scaling(dtype, c, reduction):
    params, x = dmol_inputs(N, c, (3, 4), 5, seed=7 + c)
    params, x = params.to(dtype), x.to(dtype)
    # per-sample weights that float32 holds exactly (reduction none: a weighted sum over samples)
    w = (torch.rand(N, generator=torch.Generator().manual_seed(1)) + 0.5).double()
    upstream1 = w if reduction == "none" else torch.ones((), dtype=h.F64)
    exact1 = _grad(reference.dmol_nll, params.double(), x.double(), upstream1, reduction)
    # judged where float32 math holds the dtype's digits: the fused float32 gradient of the same
    # values within half an ulp of the dtype (not a softmax - responsibility that cancels)
    f32 = _grad(vae_ext.dmol_nll, params.float(), x.float(), upstream1, reduction).double()
    judged = (f32 - exact1).abs() <= 0.5 * _ulp(exact1, dtype)
    assert judged.double().mean() > 0.6  # about 0.7 (RGB) and 0.86 (one channel) here
    for scale in SCALES:
        got = _grad(vae_ext.dmol_nll, params, x, upstream1 * scale, reduction)
        assert got.stride() == params.stride()
        _check(got, exact1 * scale, dtype, f"dmol {reduction} C={c} at scale {scale:g}", judged)
