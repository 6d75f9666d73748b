"""The common elbo_loss call's lean op (torch.ops.vae_ext.elbo_loss_basic, csrc/elbo_basic.h): the
path vae_ext.elbo_loss takes for it, its registration, its beta and pixel_mean, and the backward's
one-pass scale-and-round of a half input's gradients (csrc/scale_round.h)."""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

import helpers as h

BASIC_OP = torch.ops.vae_ext.elbo_loss_basic.default
ALL_REDUCTIONS = ("sum", "mean", "pixel_mean", "none")


def test_the_common_call_takes_the_lean_op():
    r, x, mu, lv = h.make_elbo_inputs("bce", (4, 6), 3, h.F32, seed=1)
    r.requires_grad_(True)
    lean = vae_ext.elbo_loss(r, x, mu, lv)
    assert "ElboBasicFunction" in str(lean.grad_fn.name()), lean.grad_fn.name()
    full = vae_ext.elbo_loss(r, x, mu, lv, prior_mu=torch.zeros(3), prior_logvar=torch.zeros(3))
    assert "ElboBasicFunction" not in str(full.grad_fn.name())
    h.assert_close(lean, full, rtol=1e-6, what="lean vs full op")


@pytest.mark.parametrize("mode", ("bce", "bce_logits", "mse", "l1"))
@pytest.mark.parametrize("reduction", ALL_REDUCTIONS)
@pytest.mark.parametrize("beta", (1.0, 0.37, 0.0))
def test_matches_the_reference(mode, reduction, beta):
    """Loss and every gradient against the float64 reference, grad_output != 1 (a negative one
    for "none"), beta applied by the backward, pixel_mean's 1/D too."""
    maker = "mse" if mode == "l1" else mode
    r, x, mu, lv = h.make_elbo_inputs(maker, (5, 3, 7), 4, h.F32, seed=3)
    n = r.shape[0]
    up = h.upstream_for("none" if reduction == "none" else "sum", n)
    kw = dict(recon=mode, reduction=reduction, beta=beta)
    out, grads = h.loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, upstream=up, **kw)
    ref, ref_grads = h.loss_and_grads(reference.elbo_loss, *h.f64_copies(r, x, mu, lv), upstream=up, **kw)
    tol = h.TOLS[h.F32]
    h.assert_close(out, ref, rtol=tol.loss, atol=1e-6, what=f"{mode} {reduction} beta={beta} loss")
    for name, g, rg, t in zip(h.NAMES, grads, ref_grads, (r, mu, lv)):
        h.assert_grad_like(g, rg, t, tol, f"{mode} {reduction} beta={beta} grad {name}")


@pytest.mark.parametrize("reduction", ALL_REDUCTIONS)
@pytest.mark.parametrize("grads", ((True, True), (True, False), (False, True), (False, False)))
def test_opcheck(reduction, grads):
    r, x, mu, lv = h.make_elbo_inputs("bce_logits", (4, 9), 3, h.F32, seed=5)
    torch.library.opcheck(BASIC_OP, (r.requires_grad_(grads[0]), x, mu.requires_grad_(grads[1]),
                                     lv.requires_grad_(grads[1]), "bce_logits", reduction, 0.5, *grads, False))


@pytest.mark.parametrize("dtype", h.HALF)
def test_opcheck_half_channels_last(dtype):
    r, x, mu, lv = h.make_elbo_inputs("bce", (2, 3 * 4 * 5), 3, dtype, seed=6)
    r = r.reshape(2, 3, 4, 5).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.reshape(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(BASIC_OP, (r, x, mu.requires_grad_(True), lv.requires_grad_(True), "bce", "none", 1.0,
                                     True, True, False))


def test_direct_call_returns_the_buffers_unscaled_by_beta_and_pixel_mean():
    """Called with inputs that need no grad, the op returns its buffers: "mean"'s (1/N) for
    pixel_mean, without beta; its loss is rec / D + beta * kl."""
    r, x, mu, lv = h.make_elbo_inputs("mse", (4, 10), 3, h.F64, seed=7)
    loss, g_r, g_mu, g_lv = BASIC_OP(r, x, mu, lv, "mse", "pixel_mean", 0.25, True, True, False)
    rec = ((r - x) ** 2).sum() / r.numel()
    kl = 0.5 * (mu ** 2 + lv.exp() - 1 - lv).sum() / r.shape[0]
    h.assert_close(loss, rec + 0.25 * kl, rtol=1e-12)
    h.assert_close(g_r, 2 * (r - x) / r.shape[0], rtol=1e-12)
    h.assert_close(g_mu, mu / r.shape[0], rtol=1e-12)
    h.assert_close(g_lv, 0.5 * (lv.exp() - 1) / r.shape[0], rtol=1e-12)


@pytest.mark.parametrize("dtype", h.HALF)
@pytest.mark.parametrize("reduction", ("sum", "pixel_mean", "none"))
@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_half_gradients_are_the_buffers_scaled_then_rounded_once(dtype, reduction, layout):
    """The backward gives exactly round(buffer * (grad_output * scale)), the product in float32, as
    ATen's mul then a cast would. The buffers are in the input's dtype (csrc/checks.cpp
    grad_buffer_dtype); bfloat16's are the ones scaled, float16's are computed again in float32 for
    a grad_output other than 1 (csrc/autograd.cpp final_in_half): the float32 op's on the inputs."""
    r, x, mu, lv = h.make_elbo_inputs("bce", (6, 2 * 3 * 5), 4, dtype, seed=8)
    r, x = (t.reshape(6, 2, 3, 5) for t in (r, x))
    if layout == "channels_last":
        r, x = (t.contiguous(memory_format=torch.channels_last) for t in (r, x))
    _, g_r, g_mu, g_lv = BASIC_OP(r, x, mu, lv, "bce", reduction, 0.75, True, True, False)
    assert g_r.dtype == g_mu.dtype == g_lv.dtype == dtype
    if dtype == torch.float16:
        _, g_r, g_mu, g_lv = BASIC_OP(*(t.float() for t in (r, x, mu, lv)), "bce", reduction, 0.75, True, True,
                                      False)
    up = h.upstream_for("none" if reduction == "none" else "sum", 6).to(torch.float32) * 300.0
    leaves = [t.detach().requires_grad_(True) for t in (r, mu, lv)]
    loss = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon="bce", reduction=reduction, beta=0.75)
    (loss * up).sum().backward()
    per = up.reshape(-1, 1, 1, 1) if reduction == "none" else up
    d_rec = per / 30 if reduction == "pixel_mean" else per
    d_kl = (up.reshape(-1, 1) if reduction == "none" else up) * 0.75
    assert torch.equal(leaves[0].grad, (g_r * d_rec).to(dtype))
    assert leaves[0].grad.stride() == r.stride()
    assert torch.equal(leaves[1].grad, (g_mu * d_kl).to(dtype))
    assert torch.equal(leaves[2].grad, (g_lv * d_kl).to(dtype))


@pytest.mark.parametrize("reduction", ("sum", "mean", "none"))
@pytest.mark.parametrize("op", ("basic", "full"))
def test_float16_buffers_are_the_gradients_of_a_grad_output_of_one(reduction, op):
    """float16 on the CPU: the forward writes the gradients as they are for grad_output 1 (the
    float32 buffers rounded once), and loss.backward() hands them on; any other grad_output, or a
    beta other than 1 in the common call, has them computed again (the test above)."""
    r, x, mu, lv = h.make_elbo_inputs("bce", (6, 2 * 3 * 5), 4, torch.float16, seed=11)
    _, g_r, g_mu, g_lv = BASIC_OP(*(t.float() for t in (r, x, mu, lv)), "bce", reduction, 1.0, True, True, False)
    leaves = [t.detach().requires_grad_(True) for t in (r, mu, lv)]
    extra = {} if op == "basic" else {"return_terms": True}  # return_terms takes the full op
    loss = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon="bce", reduction=reduction, **extra)
    if op == "full":
        loss = loss[0]
    (loss.sum() if reduction == "none" else loss).backward()
    for leaf, g in zip(leaves, (g_r, g_mu, g_lv)):
        assert torch.equal(leaf.grad, g.to(torch.float16))


@pytest.mark.parametrize("prior_shape", [(5, 3), (3,), (1, 3)], ids=["per_sample", "L", "1xL"])
def test_bfloat16_prior_buffers_stay_float32_where_the_backward_sums_them(prior_shape):
    """bfloat16's gradient buffers are bfloat16 on the CPU, but a broadcast prior's are float32: the
    backward sums them over the batch, where a bfloat16 rounding of each term is amplified when the
    sum cancels (one of mu's shape is handed on: bfloat16)."""
    bf = torch.bfloat16
    _, _, mu, lv = h.make_elbo_inputs("bce", (5, 4), 3, bf, seed=9)
    pm, pl = torch.zeros(prior_shape, dtype=bf), torch.zeros(prior_shape, dtype=bf)
    empty = mu.new_empty(mu.shape[0], 0)  # no reconstruction term, as vae_ext.gaussian_kl calls it
    out = torch.ops.vae_ext.elbo_loss(empty, empty, mu, lv, "mse", "sum", False, True, False, False, pm, pl)
    g_mu, g_lv, g_pm, g_pl = out[4:8]
    assert g_mu.dtype == g_lv.dtype == bf
    whole = prior_shape == tuple(mu.shape)
    assert g_pm.dtype == g_pl.dtype == (bf if whole else torch.float32)
    # the fake kernel (torch.compile, opcheck) says the same
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.vae_ext.elbo_loss(*(mode.from_tensor(t) for t in (empty, empty, mu, lv)), "mse", "sum",
                                           False, True, False, False, mode.from_tensor(pm), mode.from_tensor(pl))
    assert [t.dtype for t in fake[3:9]] == [t.dtype for t in out[3:9]]


def test_bad_reduction_and_mode_name_the_argument():
    r, x, mu, lv = h.make_elbo_inputs("bce", (2, 3), 2, h.F32)
    with pytest.raises(ValueError, match="reduction"):
        BASIC_OP(r, x, mu, lv, "bce", "avg", 1.0, False, False, False)
    with pytest.raises(ValueError, match="recon_logvar"):
        BASIC_OP(r, x, mu, lv, "gaussian", "sum", 1.0, False, False, False)
