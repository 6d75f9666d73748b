"""vae_ext.elbo_loss and FusedELBOLoss agree with vae_ext.reference.elbo_loss (the plain-PyTorch oracle).

The oracle is evaluated in float64 from the very same input values (a half input upcast exactly),
so each tolerance is the fused op's own error: float64 ~1e-10, float32 ~1e-5, half types computed in
float32 with gradients rounded to the half type (see helpers.TOLS). Every dtype, recon mode and
reduction; odd, non-contiguous, expanded and channels_last inputs; grad_output != 1; the literal
pytorch/examples formula.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from vae_ext import reference

import helpers as h

SHAPES = {
    "37x1271_L13": ((37, 1271), 13),
    "img3x1x5x7_L4": ((3, 1, 5, 7), 4),
    "1x1_L1": ((1, 1), 1),
    # more elements than one parallel_for grain, odd sizes: vector bodies, tails and block sums
    "3x100003_L37": ((3, 100003), 37),
}


# --------------------------------------------------------------------------- forward + gradients
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
@pytest.mark.parametrize("device", h.DEVICES)
def test_matches_reference(device, dtype, mode, reduction, shape_id):
    """Loss and d/d(recon_x, mu, logvar), beta != 1 and a random grad_output (a vector for 'none')."""
    shape, latent = SHAPES[shape_id]
    inputs = h.make_elbo_inputs(mode, shape, latent, dtype, device, seed=list(SHAPES).index(shape_id))
    up = h.upstream_for(reduction, shape[0], device=device)
    h.check_against_reference(mode, reduction, dtype, *inputs, beta=0.7, upstream=up,
                              what=f"{mode}/{reduction}/{h.dtype_id(dtype)}/{shape_id}")


@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
@pytest.mark.parametrize("device", h.DEVICES)
def test_defaults_and_unit_grad_output(device, dtype, mode):
    """Default beta=1 and reduction='sum', plain loss.backward()."""
    inputs = h.make_elbo_inputs(mode, (16, 97), 7, dtype, device, seed=5)
    tol = h.TOLS[dtype]
    leaves = [t.detach().requires_grad_(True) for t in (inputs[0], inputs[2], inputs[3])]
    loss = vae_ext.elbo_loss(leaves[0], inputs[1], leaves[1], leaves[2], recon=mode)
    loss.backward()
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in (inputs[0], inputs[2], inputs[3])]
    ref = reference.elbo_loss(ref_leaves[0], inputs[1].double().cpu(), ref_leaves[1], ref_leaves[2], recon=mode)
    ref.backward()
    assert loss.dim() == 0 and loss.dtype == h.out_dtype(dtype)
    h.assert_close(loss, ref, rtol=tol.loss, what="loss")
    for name, a, b in zip(h.NAMES, leaves, ref_leaves):
        h.assert_close(a.grad, b.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name}")


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False), (False, False, True),
                                      (False, True, True)], ids=["recon_only", "mu_only", "logvar_only", "latent"])
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_partial_requires_grad(mode, requires):
    inputs = h.make_elbo_inputs(mode, (9, 41), 5, h.F32, seed=3)
    for reduction in h.REDUCTIONS:
        h.check_against_reference(mode, reduction, h.F32, *inputs, beta=1.3, requires=requires,
                                  upstream=h.upstream_for(reduction, 9), what=f"{reduction} {requires}")


# --------------------------------------------------------------------------- shapes and layouts
@pytest.mark.parametrize("flip", [False, True], ids=["x_image", "recon_image"])
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_x_with_other_shape_same_numel(mode, flip):
    """x of shape (N, 1, 28, 28) against recon_x (N, 784) (the classic x.view(-1, 784)), and the reverse."""
    r, x, mu, lv = h.make_elbo_inputs(mode, (6, 784), 20, h.F32, seed=8)
    if flip:
        r = r.reshape(6, 1, 28, 28)
    else:
        x = x.reshape(6, 1, 28, 28)
    for reduction in h.REDUCTIONS:
        h.check_against_reference(mode, reduction, h.F32, r, x, mu, lv, upstream=h.upstream_for(reduction, 6),
                                  what=reduction)


@pytest.mark.parametrize("dtype", [h.F32, h.F64, h.BF16], ids=h.dtype_id)
@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("device", h.DEVICES)
def test_non_contiguous_inputs(device, mode, dtype):
    """recon_x a transposed view, x expanded, mu a strided slice, logvar a transposed view."""
    n, d, latent = 11, 53, 6
    r0, x0, mu0, lv0 = h.make_elbo_inputs(mode, (n, d), latent, dtype, device, seed=21)
    r = r0.t().contiguous().t()                        # (n, d) with strides (1, n)
    assert not r.is_contiguous()
    x = x0[:1].expand(n, d)                            # stride 0 along the batch
    mu = torch.cat([mu0, mu0 * 0.5], dim=1)[:, ::2]    # (n, latent) with column stride 2
    lv = lv0.t().contiguous().t()
    assert not (x.is_contiguous() or mu.is_contiguous() or lv.is_contiguous())
    for reduction in h.REDUCTIONS:
        h.check_against_reference(mode, reduction, dtype, r, x, mu, lv, beta=0.5,
                                  upstream=h.upstream_for(reduction, n, device=device), what=reduction)


@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_expanded_recon_leaf_accumulates(mode):
    """recon_x = leaf.expand(N, D): the leaf's gradient is the batch sum of the per-sample gradients."""
    n, d = 7, 29
    _, x, mu, lv = h.make_elbo_inputs(mode, (n, d), 3, h.F64, seed=4)
    base = h.make_elbo_inputs(mode, (1, d), 3, h.F64, seed=5)[0]
    leaf = base.clone().requires_grad_(True)
    ref_leaf = base.clone().requires_grad_(True)
    w = h.upstream_for("none", n)
    loss = vae_ext.elbo_loss(leaf.expand(n, d), x, mu, lv, recon=mode, reduction="none")
    (loss * w).sum().backward()
    ref = reference.elbo_loss(ref_leaf.expand(n, d), x, mu, lv, recon=mode, reduction="none")
    (ref * w).sum().backward()
    h.assert_close(loss, ref, rtol=1e-10, what="loss")
    h.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol_rel=1e-12, what="grad of the expanded leaf")


@pytest.mark.parametrize("x_layout", ["x_contiguous", "x_same"])
@pytest.mark.parametrize("shape,fmt", [((3, 4, 5, 7), torch.channels_last), ((3, 2, 3, 4, 5), torch.channels_last_3d)],
                         ids=["channels_last", "channels_last_3d"])
@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("device", h.DEVICES)
def test_channels_last_recon(device, mode, shape, fmt, x_layout):
    """A channels_last recon_x (a conv decoder's output) against a contiguous or channels_last x:
    elements pair up by logical index, and the recon gradient comes back channels_last (the
    kernels read that layout as it is: no copy of recon_x, none of its gradient later)."""
    r, x, mu, lv = h.make_elbo_inputs(mode, shape, 4, h.F32, device, seed=9)
    r = r.contiguous(memory_format=fmt)
    if x_layout == "x_same":
        x = x.contiguous(memory_format=fmt)
    assert not r.is_contiguous()
    for reduction in h.REDUCTIONS:
        h.check_against_reference(mode, reduction, h.F32, r, x, mu, lv,
                                  upstream=h.upstream_for(reduction, 3, device=device), what=reduction)
    # autograd.grad hands over the op's own gradient (.grad would be re-laid out by AccumulateGrad)
    leaf = r.detach().requires_grad_(True)
    g, = torch.autograd.grad(vae_ext.elbo_loss(leaf, x, mu, lv, recon=mode), leaf)
    assert g.is_contiguous(memory_format=fmt), g.stride()


# --------------------------------------------------------------------------- gradient scaling
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_grad_scaling_for_mean_and_none(mode):
    """mean: grads are the sum's divided by N; none: sample i's grads are scaled by grad_output[i]
    (rec and KL scaled by their own upstream when both terms are used)."""
    n = 6
    r, x, mu, lv = h.make_elbo_inputs(mode, (n, 31), 5, h.F64, seed=30)
    _, g_sum = h.loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="sum", beta=0.8)
    _, g_mean = h.loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="mean", beta=0.8)
    for name, gs, gm in zip(h.NAMES, g_sum, g_mean):
        h.assert_close(gm * n, gs, rtol=1e-12, atol_rel=1e-14, what=f"mean: N * grad {name} vs sum")
    w = h.upstream_for("none", n)
    _, g_none = h.loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="none", beta=0.8, upstream=w)
    for name, gs, gn in zip(h.NAMES, g_sum, g_none):
        h.assert_close(gn, gs * w.view(-1, *([1] * (gs.dim() - 1))), rtol=1e-12, atol_rel=1e-14,
                       what=f"none: grad {name} vs w_i * per-sample grad")
    # separate upstream on each term: recon grads follow w_rec, latent grads follow w_kl (times beta)
    w_rec, w_kl = w, torch.linspace(-1.0, 2.0, n, dtype=h.F64)
    _, g_terms = h.loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="none", beta=0.8,
                                  return_terms=True, combo=lambda o: o[1] * w_rec + o[2] * w_kl)
    h.assert_close(g_terms[0], g_sum[0] * w_rec.view(-1, 1), rtol=1e-12, atol_rel=1e-14, what="rec-only upstream")
    for name, gs, gt in zip(h.NAMES[1:], g_sum[1:], g_terms[1:]):
        # g_sum's latent grads carry beta (0.8); the kl term itself does not
        h.assert_close(gt, gs / 0.8 * w_kl.view(-1, 1), rtol=1e-12, atol_rel=1e-14, what=f"kl-only upstream {name}")


# --------------------------------------------------------------------------- return_terms
@pytest.mark.parametrize("dtype", [h.F32, h.F64, h.BF16, h.F16], ids=h.dtype_id)
@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("device", h.DEVICES)
def test_return_terms(device, mode, reduction, dtype):
    n = 10
    inputs = h.make_elbo_inputs(mode, (n, 123), 9, dtype, device, seed=40)
    tol = h.TOLS[dtype]
    kw = dict(recon=mode, reduction=reduction, beta=0.3, return_terms=True)
    w = h.upstream_for(reduction, n, device=device)

    def combo(o):
        return o[0] + 2 * o[1] + 3 * o[2]

    out, grads = h.loss_and_grads(vae_ext.elbo_loss, *inputs, combo=combo, upstream=w, **kw)
    ref, ref_grads = h.loss_and_grads(reference.elbo_loss, *h.f64_copies(*inputs), combo=combo, upstream=w.cpu(), **kw)
    assert isinstance(out, tuple) and len(out) == 3
    for what, a, b in zip(("loss", "rec", "kl"), out, ref):
        assert a.dtype == h.out_dtype(dtype) and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)}"
        h.assert_close(a, b, rtol=tol.loss, what=what)
    h.assert_close(out[0], out[1] + 0.3 * out[2], rtol=1e-6 if dtype != h.F64 else 1e-12, what="loss = rec + beta*kl")
    for name, g, rg in zip(h.NAMES, grads, ref_grads):
        h.assert_close(g, rg, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name} of loss+2rec+3kl")


# --------------------------------------------------------------------------- beta
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5, 7])
def test_beta_values(beta):
    inputs = h.make_elbo_inputs("bce", (5, 60), 4, h.F64, seed=41)
    for reduction in h.REDUCTIONS:
        h.check_against_reference("bce", reduction, h.F64, *inputs, beta=beta, upstream=h.upstream_for(reduction, 5),
                                  what=f"beta={beta} {reduction}")


# --------------------------------------------------------------------------- classic formula
def _classic_loss_function(recon_x, x, mu, logvar):
    BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
    KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return BCE + KLD


@pytest.mark.parametrize("targets", ["binary", "soft"])
def test_same_as_pytorch_examples_loss_function(targets):
    g = torch.Generator().manual_seed(70)
    n = 32
    logits0 = torch.randn(n, 784, generator=g) * 2.5
    x = torch.rand(n, 1, 28, 28, generator=g)
    if targets == "binary":
        x = (x > 0.5).float()
    mu0 = torch.randn(n, 20, generator=g)
    lv0 = torch.randn(n, 20, generator=g) * 0.6
    results = []
    for loss_fn in (_classic_loss_function, vae_ext.FusedELBOLoss()):
        logits, mu, lv = (t.clone().requires_grad_(True) for t in (logits0, mu0, lv0))
        recon_x = torch.sigmoid(logits)
        loss = loss_fn(recon_x, x, mu, lv)
        loss.backward()
        results.append((loss.detach(), logits.grad, mu.grad, lv.grad))
    classic, fused = results
    assert fused[0].dtype == torch.float32 and fused[0].dim() == 0
    h.assert_close(fused[0], classic[0], rtol=1e-5, what="loss")
    for what, a, b in zip(("grad logits", "grad mu", "grad logvar"), fused[1:], classic[1:]):
        h.assert_close(a, b, rtol=1e-5, atol_rel=1e-6, what=what)


# --------------------------------------------------------------------------- FusedELBOLoss
@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_fused_elbo_loss_module(mode, reduction):
    inputs = h.make_elbo_inputs(mode, (7, 45), 5, h.F32, seed=90)
    loss_fn = vae_ext.FusedELBOLoss(recon=mode, beta=0.4, reduction=reduction)
    w = h.upstream_for(reduction, 7)
    out, grads = h.loss_and_grads(loss_fn, *inputs, upstream=w)
    ref, ref_grads = h.loss_and_grads(vae_ext.elbo_loss, *inputs, upstream=w, recon=mode, beta=0.4,
                                      reduction=reduction)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    terms = loss_fn(*inputs, return_terms=True)
    assert len(terms) == 3
    # beta is a plain attribute: a KL warm-up sets it every step
    loss_fn.beta = 2.0
    h.assert_close(loss_fn(*inputs),
                   reference.elbo_loss(*h.f64_copies(*inputs), recon=mode, beta=2.0, reduction=reduction),
                   rtol=1e-5, what="after loss_fn.beta = 2.0")


# --------------------------------------------------------------------------- reduction="pixel_mean"
@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_pixel_mean_matches_reference(mode, dtype):
    """The reconstruction term averaged over every element, the KL term over the batch: value,
    both terms and every gradient, with grad_output != 1."""
    recon_x, x, mu, logvar = h.make_elbo_inputs(mode, (6, 3, 5, 7), 9, dtype, seed=95)
    h.check_against_reference(mode, "pixel_mean", dtype, recon_x, x, mu, logvar, beta=0.3,
                              upstream=h.upstream_for("sum", 6), what=f"pixel_mean {mode}")
    loss, rec, kl = vae_ext.elbo_loss(recon_x, x, mu, logvar, recon=mode, reduction="pixel_mean", beta=0.3,
                                      return_terms=True)
    _, rec_mean, kl_mean = vae_ext.elbo_loss(recon_x, x, mu, logvar, recon=mode, reduction="mean",
                                             return_terms=True)
    h.assert_close(rec, rec_mean / (3 * 5 * 7), rtol=1e-6, what="pixel_mean rec = mean rec / values per sample")
    assert torch.equal(kl, kl_mean)


def test_pixel_mean_is_f_mse_loss():
    """reduction="pixel_mean" with recon="mse" is F.mse_loss(recon_x, x) (its default mean)."""
    r, x, mu, lv = h.make_elbo_inputs("mse", (4, 20), 3, h.F64, seed=96)
    _, rec, _ = vae_ext.elbo_loss(r, x, mu, lv, recon="mse", reduction="pixel_mean", return_terms=True)
    h.assert_close(rec, F.mse_loss(r, x), rtol=1e-12, what="pixel_mean vs F.mse_loss")
