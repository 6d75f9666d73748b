"""vae_ext.dmol_nll (the fused CPU kernel) against the float64 reference vae_ext.reference.dmol_nll:
the value and the gradient of every parameter kind, every branch, C = 1 and 3, M = 1, 5, 10,
num_bits 5, 8 and 16, image, 1-D and 0-D spatial shapes, every layout, dtype and reduction, and
bitwise equality on 1 and 2 threads.
"""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference as R

from dmol_originals import branch_counts, dmol_inputs
from helpers import BF16, DTYPES, F16, F32, F64, HALF, assert_close, dtype_id

# (loss rtol, gradient rtol = atol relative to the largest gradient / 10). float32: with log-scales
# down to -8 a component's log-likelihood is hundreds of nats, and the responsibilities
# exp(v_m - logsumexp) turn float32's absolute error of such v into a relative one: the reference
# itself, run in float32, is off by up to ~1e-4 on these inputs (as is the kernel). Half types: their
# inputs are exact (drawn in float64, rounded, fed to both), the gradient rounded once to the half type.
TOL = {F64: (1e-10, 1e-10), F32: (2e-5, 3e-4), F16: (2e-5, 2e-3), BF16: (2e-5, 1.6e-2)}


def _inputs(n, c, spatial, m, *, num_bits=8, seed=0, dtype=F64):
    params, x = dmol_inputs(n, c, spatial, m, num_bits=num_bits, seed=seed)
    return params.to(dtype), x.to(dtype)


def _run(fn, params, x, w, **kw):
    p = params.detach().clone().requires_grad_(True)
    out = fn(p, x, **kw)
    (g,) = torch.autograd.grad((out * w).sum(), p)
    return out.detach(), g


def _check(params, x, *, dtype=F64, reduction="none", seed=1, tol=None, **kw):
    """The fused loss and gradient (for grad_output w != 1) against the reference in float64 on the
    same (rounded) inputs."""
    w_shape = (params.shape[0],) if reduction == "none" else ()
    w = torch.rand(w_shape, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5
    ref, ref_g = _run(R.dmol_nll, params.to(F64), x.to(F64), w, reduction=reduction, **kw)
    out_dt = F32 if dtype in HALF else dtype
    got, got_g = _run(vae_ext.dmol_nll, params, x, w.to(out_dt), reduction=reduction, **kw)
    assert got.dtype == out_dt and got_g.dtype == params.dtype
    assert got_g.stride() == params.stride() or not params.is_contiguous()
    loss_tol, grad_tol = tol or TOL[dtype]
    assert_close(got, ref, rtol=loss_tol, atol_rel=loss_tol, what="loss")
    assert_close(got_g, ref_g, rtol=grad_tol, atol_rel=grad_tol / 10, what="gradient")
    return got_g, ref_g


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("m", [1, 5, 10])
@pytest.mark.parametrize("bits", [5, 8, 16])
def test_value_and_every_gradient_f64(c, m, bits):
    params, x = _inputs(3, c, (5, 7), m, num_bits=bits, seed=m + bits)
    counts, margin = branch_counts(params, x, num_bits=bits)
    assert margin > 1e-8
    if bits < 16:
        assert min(counts.values()) > 0, counts
    got_g, _ = _check(params, x, num_bits=bits)
    # every parameter kind gets a non-zero gradient somewhere, and the clamped log-scales none
    kinds = 3 if c == 3 else 2
    rest = got_g[:, m:].reshape(3, c, kinds, m, 5, 7)
    scales_raw = params[:, m:].reshape(rest.shape)[:, :, 1]
    assert (got_g[:, :m].abs().sum() > 0) == (m > 1)  # logits (M = 1: softmax - r = 0)
    assert rest[:, :, 0].abs().sum() > 0  # means
    assert (scales_raw < -7.0).any() and (rest[:, :, 1][scales_raw < -7.0] == 0).all()
    assert rest[:, :, 1][scales_raw > -7.0].abs().sum() > 0
    if c == 3:
        assert rest[:, :, 2].abs().sum() > 0  # coefficients


@pytest.mark.parametrize("bits,floor", [(1, -7.0), (3, -7.0), (4, -7.0), (8, -12.0)])
@pytest.mark.parametrize("c", [1, 3])
def test_wide_bins(c, bits, floor):
    """Half-bins wider than 40 logistic scales somewhere above the floor (h exp(-log_scale_min) > 40)
    take dmol_math.h's other exact form (the one without exp(-delta), which could underflow there)."""
    params, x = _inputs(3, c, (5, 7), 5, num_bits=bits, seed=bits)
    if floor < -7:
        rest = params[:, 5:].view(3, c, 3 if c == 3 else 2, 5, 5, 7)
        rest[:, :, 1] = rest[:, :, 1] * 1.5 - 1.0  # log-scales down to -13, some below the floor
    counts, margin = branch_counts(params, x, num_bits=bits, log_scale_min=floor)
    assert margin > 1e-8, counts
    _check(params, x, num_bits=bits, log_scale_min=floor)
    _check(params.float(), x.float(), dtype=F32, num_bits=bits, log_scale_min=floor)


def test_bin_centre_branch():
    """Parameters far from x (tiny scales): the mass under 1e-5, the bin-centre density taken."""
    params, x = _inputs(2, 3, (4, 4), 5, seed=3)
    m = 5
    p = params.clone()
    rest = p[:, m:].view(2, 3, 3, m, 4, 4)
    rest[:, :, 0] = 0.9 * torch.sign(rest[:, :, 0]) * -1  # means away from x
    rest[:, :, 1] = -6.5  # tiny scales
    counts, margin = branch_counts(p, x)
    assert counts["centre"] > 0 and margin > 1e-8, counts
    _check(p, x)
    # float32: each component's log-likelihood is hundreds of nats here, so the responsibilities
    # exp(v_m - logsumexp) carry float32's absolute error of such v (~3e-5) as a relative one
    _check(p.float(), x.float(), dtype=F32)


@pytest.mark.parametrize("spatial", [(), (1,), (13,), (3, 5), (2, 3, 4)], ids=str)
@pytest.mark.parametrize("c", [1, 3])
def test_spatial_shapes(spatial, c):
    params, x = _inputs(3, c, spatial, 4, seed=len(spatial))
    _check(params, x)
    _check(params.float(), x.float(), dtype=F32)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("c", [1, 3])
def test_dtypes(dtype, c):
    params, x = _inputs(4, c, (9, 11), 10, seed=5, dtype=dtype)
    _check(params, x, dtype=dtype)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=dtype_id)
def test_reductions(reduction, dtype):
    params, x = _inputs(5, 3, (6, 6), 3, seed=2, dtype=dtype)
    _check(params, x, dtype=dtype, reduction=reduction)


@pytest.mark.parametrize("dtype", [F64, F32, F16], ids=dtype_id)
def test_layouts(dtype):
    """channels_last (VDVAE's output permuted) and channels-first are read in place, the gradient in
    the same layout; other strides copied; all give the contiguous result."""
    params, x = _inputs(3, 3, (5, 6), 4, seed=9, dtype=dtype)
    cl = params.contiguous(memory_format=torch.channels_last)
    g_cl, _ = _check(cl, x, dtype=dtype)
    assert g_cl.stride() == cl.stride()
    g_cf, _ = _check(params, x, dtype=dtype)
    assert torch.equal(g_cl, g_cf)
    # 1-D channels_last: (N, T, P) permuted
    p1, x1 = _inputs(2, 1, (17,), 5, seed=4, dtype=dtype)
    p1_cl = p1.transpose(1, 2).contiguous().transpose(1, 2)
    g1, _ = _check(p1_cl, x1.transpose(1, 2).contiguous().transpose(1, 2), dtype=dtype)
    assert g1.stride() == p1_cl.stride()
    # a slice of a wider tensor and a spatial transpose: copied once
    wide = torch.cat([params, params[:, :7]], dim=1)[:, :params.shape[1]]
    _check(wide, x, dtype=dtype)
    _check(params.transpose(2, 3), x.transpose(2, 3), dtype=dtype)


def test_threads_bitwise():
    params, x = _inputs(3, 3, (23, 29), 10, seed=11, dtype=F32)
    params = params.requires_grad_(True)
    old = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            params.grad = None
            loss = vae_ext.dmol_nll(params, x, reduction="none")
            loss.sum().backward()
            results.append((loss.detach().clone(), params.grad.clone()))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_nan_in_nan_out():
    params, x = _inputs(2, 3, (4, 4), 3, seed=1, dtype=F32)
    params[0, 5, 1, 2] = float("nan")
    loss = vae_ext.dmol_nll(params, x, reduction="none")
    assert torch.isnan(loss[0]) and torch.isfinite(loss[1])


def test_no_grad_and_no_nan_leak():
    """Extreme parameters: every branch's unselected formulas overflow, nothing leaks."""
    params, x = _inputs(2, 3, (8, 8), 5, seed=6, dtype=F32)
    p = params.clone()
    p[:, 5:] *= 40  # means and coefficients far out, log-scales far below the clamp and far above
    p.requires_grad_(True)
    loss = vae_ext.dmol_nll(p, x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()
    with torch.no_grad():
        assert torch.equal(vae_ext.dmol_nll(p, x), loss.detach())
