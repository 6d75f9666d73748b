"""A 0-d recon_logvar (recon="gaussian") near the edges of its dtype's range, against the float64
reference: the counterexamples of the long property profile (VAE_EXT_HYPOTHESIS=long) and their
neighbours.

With one log-variance, the op sums q / 2 = (x - r)^2 exp(-rlv) / 2 over a row (or the batch) and
forms the loss and rlv's gradient from that sum in double (csrc/common/elbo_math.h
gaussian_scalar_terms). Three ways that went wrong:
  - float64: q summed before halving passed 1.8e308 where the loss, q / 2 summed, is finite;
  - float32: a loss or gradient formed in double beyond float's range raised "value cannot be
    converted to type float without overflow" where it is +-inf (as the reference's float32 gives);
  - float32: rlv's gradient stored in float32 before grad_output scaled it was -inf where the
    scaled gradient is finite (-1.2e36 at grad_output 0.002): it stays in double until scaled.
"""
from __future__ import annotations

import math

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import F32, F64


def _loss_and_grads(fn, r, x, rlv, dtype, reduction, up):
    r = r.to(dtype).requires_grad_(True)
    rlv = rlv.to(dtype).requires_grad_(True)
    empty = torch.zeros(r.shape[0], 0, dtype=dtype)
    out = fn(r, x.to(dtype), empty, empty, recon="gaussian", recon_logvar=rlv, reduction=reduction)
    (out * torch.full_like(out, up)).sum().backward()
    return out.detach(), r.grad, rlv.grad


def _check(got, want, dtype, rtol):
    """got (the op in dtype) against want (float64): want rounded to dtype where that is +-inf, else
    within rtol of want (and finite)."""
    expected = want.to(dtype).double()
    g = got.double()
    inf = torch.isinf(expected)
    assert torch.equal(g[inf], expected[inf]), (got, want)
    fin = ~inf
    assert torch.isfinite(g[fin]).all(), (got, want)
    assert ((g[fin] - want[fin]).abs() <= rtol * want[fin].abs()).all(), (got, want)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gaussian_scalar_logvar_row_past_the_double_range(reduction):
    """Each element's q = (x - r)^2 exp(-rlv) is halved before the row's sum, as the loss halves
    it, so a float64 row whose q sum to 2.6e308 (past 1.8e308) but whose loss is 1.3e308 gives that
    loss, not inf."""
    r = torch.full((1, 3), 9.4e153, dtype=F64, requires_grad=True)
    x = torch.zeros(1, 3, dtype=F64)
    mu, lv = torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64)
    rlv = torch.zeros((), dtype=F64, requires_grad=True)
    out = vae_ext.elbo_loss(r, x, mu, lv, recon="gaussian", recon_logvar=rlv, reduction=reduction)
    ref = reference.elbo_loss(r, x, mu, lv, recon="gaussian", recon_logvar=rlv, reduction=reduction)
    assert torch.isfinite(ref).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)
    g = torch.autograd.grad(out.sum(), (r, rlv))
    rg = torch.autograd.grad(ref.sum(), (r, rlv))
    for a, b in zip(g, rg):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


# float32 rows of three whose loss, formed in double, is past float32's 3.4e38 while each q / 2 is
# not: the long run's (q / 2 = 3.1e38 at two elements) and one whose q are finite in float32
# too (q = 2.9e38 at each, so that it needs no halving of q to reach the loss's formation).
ROWS = {
    "long-run": ([0.0, -1.29e19, -1.29e19], [1.54, -0.29, -2.18], -1.31),
    "q-finite": ([0.0, 0.0, 0.0], [1.7e19, -1.7e19, 1.7e19], 0.0),
}


@pytest.mark.parametrize("row", sorted(ROWS))
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("up", [0.002, 1.0])
def test_float32_gaussian_scalar_logvar_past_float_range(row, reduction, up):
    """The loss is inf (the float64 one, 6.2e38 or 4.3e38, is past float32's range): not the
    RuntimeError of a checked conversion. rlv's gradient at grad_output 0.002 (-1.2e36, -8.7e35)
    is finite, at 1 it is -inf: stored per sample before scaling, it was -inf at both; formed over
    the batch, it raised."""
    xs, rs, rlv = ROWS[row]
    x, r, rlv = torch.tensor([xs], dtype=F64), torch.tensor([rs], dtype=F64), torch.tensor(rlv, dtype=F64)
    # the float32 inputs, exactly, in float64 for the reference
    x, r, rlv = x.float().double(), r.float().double(), rlv.float().double()
    got = _loss_and_grads(vae_ext.elbo_loss, r, x, rlv, F32, reduction, up)
    want = _loss_and_grads(reference.elbo_loss, r, x, rlv, F64, reduction, up)
    assert not math.isfinite(float(want[0].float().sum())), "the case lost its point: a finite float32 loss"
    for name, g, w in zip(("loss", "grad recon_x", "grad recon_logvar"), got, want):
        assert g.dtype == F32, name
        _check(g, w, F32, 1e-5)
    if up < 1:
        assert math.isfinite(got[2].item()), "the case lost its point: rlv's gradient is not finite"
