"""vae_ext.elbo_loss / FusedELBOLoss against vae_ext.reference.elbo_loss (the plain-PyTorch oracle).

The oracle is evaluated in float64 from the very same input values (a half input upcast exactly),
so each tolerance below is the fused op's own error: float64 ~1e-10, float32 ~1e-5, half types
computed in float32 with gradients rounded to the half type (see conftest.TOLS).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from conftest import capture_cuda_graph
from vae_ext import reference

from conftest import (
    BF16, DEVICES, DTYPES, F16, F32, F64, HALF, RECON_MODES, REDUCTIONS, TOLS,
    arg_re, assert_close, dtype_id, f64_copies, loss_and_grads, make_elbo_inputs, num_threads,
    out_dtype, requires_cuda, skip_unless_cuda_free, upstream_for,
)

ELBO_OP = torch.ops.vae_ext.elbo_loss.default
NAMES = ("recon_x", "mu", "logvar")

SHAPES = {
    "37x1271_L13": ((37, 1271), 13),
    "img3x1x5x7_L4": ((3, 1, 5, 7), 4),
    "1x1_L1": ((1, 1), 1),
    # more elements than one parallel_for grain, odd sizes: vector bodies, tails and block sums
    "3x100003_L37": ((3, 100003), 37),
}


def check_against_reference(mode, reduction, dtype, recon_x, x, mu, logvar, *, beta=1.0, upstream=None,
                            requires=(True, True, True), what=""):
    """Fused loss and gradients vs the float64 reference on the same values."""
    tol = TOLS[dtype]
    kw = dict(recon=mode, reduction=reduction, beta=beta)
    out, grads = loss_and_grads(vae_ext.elbo_loss, recon_x, x, mu, logvar, upstream=upstream,
                                requires=requires, **kw)
    ref_out, ref_grads = loss_and_grads(reference.elbo_loss, *f64_copies(recon_x, x, mu, logvar),
                                        upstream=None if upstream is None else upstream.cpu(),
                                        requires=requires, **kw)
    n = recon_x.shape[0]
    assert out.dtype == out_dtype(dtype), f"{what}: loss dtype {out.dtype}"
    assert out.device == recon_x.device
    assert tuple(out.shape) == ((n,) if reduction == "none" else ()), f"{what}: loss shape {tuple(out.shape)}"
    assert_close(out, ref_out, rtol=tol.loss, what=f"{what} loss")
    for name, g, rg, t in zip(NAMES, grads, ref_grads, (recon_x, mu, logvar)):
        if rg is None:
            assert g is None, f"{what}: unexpected gradient for {name}"
            continue
        assert g is not None, f"{what}: no gradient for {name}"
        assert g.dtype == t.dtype and tuple(g.shape) == tuple(t.shape), (
            f"{what}: grad {name} is {g.dtype}{tuple(g.shape)}, expected {t.dtype}{tuple(t.shape)}")
        assert_close(g, rg, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"{what} grad {name}")
    return out, grads


# --------------------------------------------------------------------------- forward + gradients
@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", RECON_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, dtype, mode, reduction, shape_id):
    """Loss and d/d(recon_x, mu, logvar), beta != 1 and a random grad_output (a vector for 'none')."""
    shape, latent = SHAPES[shape_id]
    inputs = make_elbo_inputs(mode, shape, latent, dtype, device, seed=list(SHAPES).index(shape_id))
    up = upstream_for(reduction, shape[0], device=device)
    check_against_reference(mode, reduction, dtype, *inputs, beta=0.7, upstream=up,
                            what=f"{mode}/{reduction}/{dtype_id(dtype)}/{shape_id}")


@pytest.mark.parametrize("mode", RECON_MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_defaults_and_unit_grad_output(device, dtype, mode):
    """Default beta=1 and reduction='sum', plain loss.backward()."""
    inputs = make_elbo_inputs(mode, (16, 97), 7, dtype, device, seed=5)
    tol = TOLS[dtype]
    leaves = [t.detach().requires_grad_(True) for t in (inputs[0], inputs[2], inputs[3])]
    loss = vae_ext.elbo_loss(leaves[0], inputs[1], leaves[1], leaves[2], recon=mode)
    loss.backward()
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in (inputs[0], inputs[2], inputs[3])]
    ref = reference.elbo_loss(ref_leaves[0], inputs[1].double().cpu(), ref_leaves[1], ref_leaves[2], recon=mode)
    ref.backward()
    assert loss.dim() == 0 and loss.dtype == out_dtype(dtype)
    assert_close(loss, ref, rtol=tol.loss, what="loss")
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        assert_close(a.grad, b.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name}")


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False), (False, False, True),
                                      (False, True, True)], ids=["recon_only", "mu_only", "logvar_only", "latent"])
@pytest.mark.parametrize("mode", RECON_MODES)
def test_partial_requires_grad(mode, requires):
    inputs = make_elbo_inputs(mode, (9, 41), 5, F32, seed=3)
    for reduction in REDUCTIONS:
        check_against_reference(mode, reduction, F32, *inputs, beta=1.3, requires=requires,
                                upstream=upstream_for(reduction, 9), what=f"{reduction} {requires}")


# --------------------------------------------------------------------------- shapes and layouts
@pytest.mark.parametrize("flip", [False, True], ids=["x_image", "recon_image"])
@pytest.mark.parametrize("mode", RECON_MODES)
def test_x_with_other_shape_same_numel(mode, flip):
    """x of shape (N, 1, 28, 28) against recon_x (N, 784) (the classic x.view(-1, 784)), and the reverse."""
    r, x, mu, lv = make_elbo_inputs(mode, (6, 784), 20, F32, seed=8)
    if flip:
        r = r.reshape(6, 1, 28, 28)
    else:
        x = x.reshape(6, 1, 28, 28)
    for reduction in REDUCTIONS:
        check_against_reference(mode, reduction, F32, r, x, mu, lv, upstream=upstream_for(reduction, 6),
                                what=reduction)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("mode", RECON_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, mode, dtype):
    """recon_x a transposed view, x expanded, mu a strided slice, logvar a transposed view."""
    n, d, latent = 11, 53, 6
    r0, x0, mu0, lv0 = make_elbo_inputs(mode, (n, d), latent, dtype, device, seed=21)
    r = r0.t().contiguous().t()                        # (n, d) with strides (1, n)
    assert not r.is_contiguous()
    x = x0[:1].expand(n, d)                            # stride 0 along the batch
    mu = torch.cat([mu0, mu0 * 0.5], dim=1)[:, ::2]    # (n, latent) with column stride 2
    lv = lv0.t().contiguous().t()
    assert not (x.is_contiguous() or mu.is_contiguous() or lv.is_contiguous())
    for reduction in REDUCTIONS:
        check_against_reference(mode, reduction, dtype, r, x, mu, lv, beta=0.5,
                                upstream=upstream_for(reduction, n, device=device), what=reduction)


@pytest.mark.parametrize("mode", RECON_MODES)
def test_expanded_recon_leaf_accumulates(mode):
    """recon_x = leaf.expand(N, D): the leaf's gradient is the batch sum of the per-sample gradients."""
    n, d = 7, 29
    _, x, mu, lv = make_elbo_inputs(mode, (n, d), 3, F64, seed=4)
    base = make_elbo_inputs(mode, (1, d), 3, F64, seed=5)[0]
    leaf = base.clone().requires_grad_(True)
    ref_leaf = base.clone().requires_grad_(True)
    w = upstream_for("none", n)
    loss = vae_ext.elbo_loss(leaf.expand(n, d), x, mu, lv, recon=mode, reduction="none")
    (loss * w).sum().backward()
    ref = reference.elbo_loss(ref_leaf.expand(n, d), x, mu, lv, recon=mode, reduction="none")
    (ref * w).sum().backward()
    assert_close(loss, ref, rtol=1e-10, what="loss")
    assert_close(leaf.grad, ref_leaf.grad, rtol=1e-10, atol_rel=1e-12, what="grad of the expanded leaf")


@pytest.mark.parametrize("x_layout", ["x_contiguous", "x_same"])
@pytest.mark.parametrize("shape,fmt", [((3, 4, 5, 7), torch.channels_last), ((3, 2, 3, 4, 5), torch.channels_last_3d)],
                         ids=["channels_last", "channels_last_3d"])
@pytest.mark.parametrize("mode", RECON_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_recon(device, mode, shape, fmt, x_layout):
    """A channels_last recon_x (a conv decoder's output) against a contiguous or channels_last x:
    elements pair up by logical index, and the recon gradient comes back channels_last (the
    kernels read that layout as it is: no copy of recon_x, none of its gradient later)."""
    r, x, mu, lv = make_elbo_inputs(mode, shape, 4, F32, device, seed=9)
    r = r.contiguous(memory_format=fmt)
    if x_layout == "x_same":
        x = x.contiguous(memory_format=fmt)
    assert not r.is_contiguous()
    for reduction in REDUCTIONS:
        check_against_reference(mode, reduction, F32, r, x, mu, lv,
                                upstream=upstream_for(reduction, 3, device=device), what=reduction)
    # autograd.grad hands over the op's own gradient (.grad would be re-laid out by AccumulateGrad)
    leaf = r.detach().requires_grad_(True)
    g, = torch.autograd.grad(vae_ext.elbo_loss(leaf, x, mu, lv, recon=mode), leaf)
    assert g.is_contiguous(memory_format=fmt), g.stride()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mode", RECON_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, mode, dtype):
    r = torch.empty(0, 784, dtype=dtype, device=device).requires_grad_(True)
    x = torch.empty(0, 784, dtype=dtype, device=device)
    mu = torch.empty(0, 20, dtype=dtype, device=device).requires_grad_(True)
    lv = torch.empty(0, 20, dtype=dtype, device=device).requires_grad_(True)
    s = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="sum")
    assert s.shape == () and s.dtype == out_dtype(dtype) and s.item() == 0.0
    s.backward()
    for t in (r, mu, lv):
        assert t.grad is not None and t.grad.shape == t.shape
    m = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="mean")
    assert m.shape == () and math.isnan(m.item())
    none = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="none")
    assert none.shape == (0,) and none.dtype == out_dtype(dtype)
    loss, rec, kl = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="none", return_terms=True)
    assert loss.shape == rec.shape == kl.shape == (0,)


@pytest.mark.parametrize("mode", RECON_MODES)
def test_empty_latent_and_empty_features(mode):
    """L = 0 (KL is 0) and D = 0 (reconstruction is 0) are valid shapes."""
    r, x, mu, lv = make_elbo_inputs(mode, (4, 9), 3, F64, seed=2)
    empty_lat = torch.empty(4, 0, dtype=F64)
    loss, rec, kl = vae_ext.elbo_loss(r, x, empty_lat, empty_lat, recon=mode, reduction="none", return_terms=True)
    assert torch.equal(kl, torch.zeros(4, dtype=F64))
    assert_close(rec, reference.elbo_loss(r, x, empty_lat, empty_lat, recon=mode, reduction="none"),
                 rtol=1e-10, what="rec with L=0")
    empty_d = torch.empty(4, 0, dtype=F64)
    loss, rec, kl = vae_ext.elbo_loss(empty_d, empty_d, mu, lv, recon=mode, reduction="none", return_terms=True)
    assert torch.equal(rec, torch.zeros(4, dtype=F64))
    assert_close(kl, reference.kl_divergence(mu, lv), rtol=1e-10, what="kl with D=0")


# --------------------------------------------------------------------------- non-finite inputs
NONFINITE_CASES = [
    ("recon_x", float("nan"), RECON_MODES),
    ("recon_x", float("inf"), ("bce_logits", "mse")),
    ("recon_x", float("-inf"), ("bce_logits", "mse")),
    ("x", float("nan"), RECON_MODES),
    ("x", float("inf"), RECON_MODES),
    ("mu", float("nan"), RECON_MODES),
    ("mu", float("inf"), RECON_MODES),
    ("logvar", float("nan"), RECON_MODES),
    ("logvar", float("inf"), RECON_MODES),
    ("logvar", float("-inf"), RECON_MODES),
]


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("where,value,modes", NONFINITE_CASES,
                         ids=[f"{w}={v}" for w, v, _ in NONFINITE_CASES])
def test_non_finite_input_gives_non_finite_loss(where, value, modes, dtype):
    """A NaN/inf in sample 2 makes the loss NaN/inf (never finite and wrong, never an exception);
    with reduction='none' the other samples keep their exact values and gradients."""
    n, d, latent, bad = 5, 67, 6, 2
    for mode in modes:
        r, x, mu, lv = make_elbo_inputs(mode, (n, d), latent, dtype, seed=13)
        tensors = dict(recon_x=r, x=x, mu=mu, logvar=lv)
        t = tensors[where].clone()
        t[bad, t.shape[1] - 1 if where in ("recon_x", "x") else 1] = value  # last column: a vector tail
        tensors[where] = t
        args = [tensors[k] for k in ("recon_x", "x", "mu", "logvar")]
        for reduction in REDUCTIONS:
            out, grads = loss_and_grads(vae_ext.elbo_loss, *args, recon=mode, reduction=reduction,
                                        upstream=upstream_for(reduction, n))
            if reduction != "none":
                assert not torch.isfinite(out).item(), f"{mode}/{reduction}: finite loss {out.item()}"
                continue
            assert not torch.isfinite(out[bad]).item(), f"{mode}/none: sample {bad} finite: {out[bad].item()}"
            keep = [i for i in range(n) if i != bad]
            clean = [a[keep] for a in args]
            tol = TOLS[dtype]
            ref_out, ref_grads = loss_and_grads(reference.elbo_loss, *f64_copies(*clean), recon=mode,
                                                reduction="none", upstream=upstream_for("none", n)[keep])
            assert_close(out[keep], ref_out, rtol=tol.loss, what=f"{mode}/none: clean samples' loss")
            for name, g, rg in zip(NAMES, grads, ref_grads):
                assert_close(g[keep], rg, rtol=tol.grad, atol_rel=tol.grad_atol_rel,
                             what=f"{mode}/none: clean samples' grad {name}")


# --------------------------------------------------------------------------- determinism, no_grad
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("mode", RECON_MODES)
def test_bitwise_same_for_1_and_2_threads(mode, dtype):
    r, x, mu, lv = make_elbo_inputs(mode, (64, 20011), 33, dtype, seed=17)
    results = []
    for nt in (1, 2, 1):
        with num_threads(nt):
            res = []
            for reduction in ("sum", "mean", "none"):
                out, grads = loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction=reduction,
                                            upstream=upstream_for(reduction, 64))
                res.append((out, *grads))
            results.append(res)
    for other, label in ((results[1], "2 threads"), (results[2], "1 thread again")):
        for reduction, a, b in zip(REDUCTIONS, results[0], other):
            for what, ta, tb in zip(("loss",) + NAMES, a, b):
                assert torch.equal(ta, tb), (
                    f"{mode}/{reduction} {what}: 1 thread vs {label} differ, max abs diff "
                    f"{(ta.double() - tb.double()).abs().max().item():.3g}")


@pytest.mark.parametrize("mode", RECON_MODES)
def test_no_grad(mode):
    r, x, mu, lv = make_elbo_inputs(mode, (8, 50), 4, F32, seed=6)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    for reduction in REDUCTIONS:
        with torch.no_grad():
            out = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon=mode, reduction=reduction)
            terms = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon=mode, reduction=reduction,
                                      return_terms=True)
        assert not out.requires_grad and out.grad_fn is None
        assert not any(t.requires_grad for t in terms)
        ref = reference.elbo_loss(*f64_copies(r, x, mu, lv), recon=mode, reduction=reduction)
        assert_close(out, ref, rtol=1e-5, what=f"{reduction} under no_grad")
        assert_close(terms[0], ref, rtol=1e-5, what=f"{reduction} return_terms under no_grad")


@pytest.mark.parametrize("mode", RECON_MODES)
def test_inference_mode(mode):
    r, x, mu, lv = make_elbo_inputs(mode, (8, 50), 4, F32, seed=6)
    with torch.inference_mode():
        out = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="none")
    assert_close(out, reference.elbo_loss(*f64_copies(r, x, mu, lv), recon=mode, reduction="none"),
                 rtol=1e-5, what="inference_mode")


def test_direct_op_allocates_no_grad_buffers_when_flags_false():
    r, x, mu, lv = make_elbo_inputs("bce", (8, 50), 4, F32, seed=6)
    for reduction in REDUCTIONS:
        rec, kl, g_r, g_mu, g_lv = ELBO_OP(r, x, mu, lv, "bce", reduction, False, False, False)
        assert (g_r.numel(), g_mu.numel(), g_lv.numel()) == (0, 0, 0), (
            f"{reduction}: flags False but grad buffers of numel {g_r.numel()}, {g_mu.numel()}, {g_lv.numel()}")
        rec2, kl2, g_r, g_mu, g_lv = ELBO_OP(r, x, mu, lv, "bce", reduction, True, False, False)
        assert g_r.shape == r.shape and g_mu.numel() == 0 and g_lv.numel() == 0
        rec3, kl3, g_r, g_mu, g_lv = ELBO_OP(r, x, mu, lv, "bce", reduction, False, True, False)
        assert g_r.numel() == 0 and g_mu.shape == mu.shape and g_lv.shape == lv.shape
        # the flags change what is written, not the values of the terms
        for a, b in ((rec, rec2), (rec, rec3), (kl, kl2), (kl, kl3)):
            assert_close(a, b, rtol=1e-6, what=f"{reduction}: terms with/without grad buffers")


class _RecordElboCalls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is ELBO_OP:
            self.calls.append((args, out))
        return out


@pytest.mark.parametrize("case", ["no_grad", "nothing_requires_grad", "recon_only", "mu_only", "logvar_only", "all"])
def test_api_requests_only_needed_grad_buffers(case):
    """Through vae_ext.elbo_loss the op gets grad flags only for what autograd will need."""
    r, x, mu, lv = make_elbo_inputs("mse", (8, 50), 4, F32, seed=6)
    req = dict(no_grad=(1, 1, 1), nothing_requires_grad=(0, 0, 0), recon_only=(1, 0, 0), mu_only=(0, 1, 0),
               logvar_only=(0, 0, 1), all=(1, 1, 1))[case]
    leaves = [t.clone().requires_grad_(bool(q)) for t, q in zip((r, mu, lv), req)]
    expect_recon = case != "no_grad" and bool(req[0])
    expect_latent = case != "no_grad" and bool(req[1] or req[2])
    mode = _RecordElboCalls()
    with mode:
        if case == "no_grad":
            with torch.no_grad():
                vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon="mse")
        else:
            vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon="mse")
    assert len(mode.calls) == 1, f"expected one vae_ext::elbo_loss call, saw {len(mode.calls)}"
    args, out = mode.calls[0]
    assert (bool(args[6]), bool(args[7])) == (expect_recon, expect_latent), f"grad flags {args[6:8]}"
    assert (out[2].numel() > 0) == expect_recon, f"g_recon numel {out[2].numel()}"
    assert (out[3].numel() > 0) == expect_latent and (out[4].numel() > 0) == expect_latent


def test_backward_twice_with_retain_graph():
    """Saved gradient buffers must not be scaled in place: a second backward gives the same gradients."""
    r, x, mu, lv = make_elbo_inputs("bce", (6, 40), 5, F64, seed=12)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    for reduction in REDUCTIONS:
        for t in leaves:
            t.grad = None
        loss = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], reduction=reduction, beta=0.5)
        w = upstream_for(reduction, 6)
        (loss * w).sum().backward(retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        (loss * w).sum().backward()
        for name, g1, t in zip(NAMES, first, leaves):
            assert_close(t.grad, 2 * g1, rtol=1e-12, what=f"{reduction}: grad {name} after two backwards")


# --------------------------------------------------------------------------- gradient scaling
@pytest.mark.parametrize("mode", RECON_MODES)
def test_grad_scaling_for_mean_and_none(mode):
    """mean: grads are the sum's divided by N; none: sample i's grads are scaled by grad_output[i]
    (rec and KL scaled by their own upstream when both terms are used)."""
    n = 6
    r, x, mu, lv = make_elbo_inputs(mode, (n, 31), 5, F64, seed=30)
    _, g_sum = loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="sum", beta=0.8)
    _, g_mean = loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="mean", beta=0.8)
    for name, gs, gm in zip(NAMES, g_sum, g_mean):
        assert_close(gm * n, gs, rtol=1e-12, atol_rel=1e-14, what=f"mean: N * grad {name} vs sum")
    w = upstream_for("none", n)
    _, g_none = loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="none", beta=0.8, upstream=w)
    for name, gs, gn in zip(NAMES, g_sum, g_none):
        assert_close(gn, gs * w.view(-1, *([1] * (gs.dim() - 1))), rtol=1e-12, atol_rel=1e-14,
                     what=f"none: grad {name} vs w_i * per-sample grad")
    # separate upstream on each term: recon grads follow w_rec, latent grads follow w_kl (times beta)
    w_rec, w_kl = w, torch.linspace(-1.0, 2.0, n, dtype=F64)
    _, g_terms = loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction="none", beta=0.8,
                                return_terms=True, combo=lambda o: o[1] * w_rec + o[2] * w_kl)
    assert_close(g_terms[0], g_sum[0] * w_rec.view(-1, 1), rtol=1e-12, atol_rel=1e-14, what="rec-only upstream")
    for name, gs, gt in zip(NAMES[1:], g_sum[1:], g_terms[1:]):
        # g_sum's latent grads carry beta (0.8); the kl term itself does not
        assert_close(gt, gs / 0.8 * w_kl.view(-1, 1), rtol=1e-12, atol_rel=1e-14, what=f"kl-only upstream {name}")


# --------------------------------------------------------------------------- return_terms
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", RECON_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_return_terms(device, mode, reduction, dtype):
    n = 10
    inputs = make_elbo_inputs(mode, (n, 123), 9, dtype, device, seed=40)
    tol = TOLS[dtype]
    kw = dict(recon=mode, reduction=reduction, beta=0.3, return_terms=True)
    w = upstream_for(reduction, n, device=device)

    def combo(o):
        return o[0] + 2 * o[1] + 3 * o[2]

    out, grads = loss_and_grads(vae_ext.elbo_loss, *inputs, combo=combo, upstream=w, **kw)
    ref, ref_grads = loss_and_grads(reference.elbo_loss, *f64_copies(*inputs), combo=combo, upstream=w.cpu(), **kw)
    assert isinstance(out, tuple) and len(out) == 3
    for what, a, b in zip(("loss", "rec", "kl"), out, ref):
        assert a.dtype == out_dtype(dtype) and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)}"
        assert_close(a, b, rtol=tol.loss, what=what)
    assert_close(out[0], out[1] + 0.3 * out[2], rtol=1e-6 if dtype != F64 else 1e-12, what="loss = rec + beta*kl")
    for name, g, rg in zip(NAMES, grads, ref_grads):
        assert_close(g, rg, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name} of loss+2rec+3kl")


# --------------------------------------------------------------------------- beta
@pytest.mark.parametrize("beta", [0.0, 1.0, 2.5, 7])
def test_beta_values(beta):
    inputs = make_elbo_inputs("bce", (5, 60), 4, F64, seed=41)
    for reduction in REDUCTIONS:
        check_against_reference("bce", reduction, F64, *inputs, beta=beta, upstream=upstream_for(reduction, 5),
                                what=f"beta={beta} {reduction}")


def _compile_count_for_betas(betas):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cnt = CompileCounter()
    r, x, mu, lv = make_elbo_inputs("bce", (4, 30), 3, F32, seed=42)
    f = torch.compile(lambda r, x, m, lv, b: vae_ext.elbo_loss(r, x, m, lv, beta=b), backend=cnt, fullgraph=True)
    for b in betas:
        got = f(r, x, mu, lv, b)
        assert_close(got, reference.elbo_loss(*f64_copies(r, x, mu, lv), beta=b), rtol=1e-5, what=f"beta={b}")
    torch._dynamo.reset()
    return cnt.frame_count


# Before torch 2.6 dynamo specializes every Python float argument (a guard on its value), so each
# new beta recompiles whatever the op does; from 2.6 a float that changes becomes a symbolic input.
_SYMBOLIC_FLOATS = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < "2.6",
                                      reason="torch < 2.6 recompiles for every new Python float")


@_SYMBOLIC_FLOATS
def test_beta_changes_compile_at_most_twice():
    count = _compile_count_for_betas([0.1, 0.5, 2.0, 4.0])
    assert count <= 2, f"4 betas (0.1, 0.5, 2.0, 4.0) compiled {count} times"


@_SYMBOLIC_FLOATS
def test_beta_warmup_schedule_compiles_at_most_twice():
    """The KL warm-up use case: beta goes 0 -> 1 (1.0 and 0.0 included)."""
    count = _compile_count_for_betas([0.0, 0.25, 0.5, 1.0])
    assert count <= 2, f"4 betas (0.0, 0.25, 0.5, 1.0) compiled {count} times"


# --------------------------------------------------------------------------- gradcheck / opcheck / compile
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", RECON_MODES)
def test_gradcheck(mode, reduction):
    r, x, mu, lv = make_elbo_inputs(mode, (3, 2, 3), 2, F64, seed=50)
    if mode == "bce":
        r = r.clamp(0.05, 0.95)
    leaves = tuple(t.clone().requires_grad_(True) for t in (r, mu, lv))
    assert torch.autograd.gradcheck(
        lambda a, b, c: vae_ext.elbo_loss(a, x, b, c, recon=mode, reduction=reduction, beta=0.6), leaves)
    assert torch.autograd.gradcheck(
        lambda a, b, c: vae_ext.elbo_loss(a, x, b, c, recon=mode, reduction=reduction, beta=0.6,
                                          return_terms=True), leaves)
    # beta = 1 without terms: the kernel returns rec + kl itself (the op's total=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: vae_ext.elbo_loss(a, x, b, c, recon=mode, reduction=reduction), leaves)


@pytest.mark.parametrize("x_dtype", [F32, BF16], ids=["x_float32", "x_bfloat16"])
@pytest.mark.parametrize("mode", RECON_MODES)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_mixed_dtypes(device, mode, x_dtype):
    """Under torch.autocast a bfloat16 decoder output meets a float32 batch x: the inputs are
    promoted to float32, as autocast's float32 policy for PyTorch's losses does (all-bfloat16 inputs
    stay bfloat16: the kernel computes in float32 either way). Loss and gradients (each in its
    leaf's dtype) match a float64 reference; outside autocast the mismatch is still an error."""
    r, x, mu, lv = make_elbo_inputs(mode, (6, 50), 4, BF16, device, seed=80)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    xx = x.to(x_dtype)
    with torch.autocast(device, dtype=BF16):
        loss = vae_ext.elbo_loss(leaves[0], xx, leaves[1], leaves[2], recon=mode, beta=0.5)
    loss.backward()
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    ref = reference.elbo_loss(ref_leaves[0], xx.cpu().double(), ref_leaves[1], ref_leaves[2], recon=mode, beta=0.5)
    ref.backward()
    assert loss.dtype == F32
    assert_close(loss, ref, rtol=TOLS[F32].loss, what="loss")
    for name, a, b in zip(NAMES, leaves, ref_leaves):
        assert a.grad.dtype == BF16, name
        assert_close(a.grad, b.grad, rtol=TOLS[BF16].grad, atol_rel=TOLS[BF16].grad_atol_rel, what=f"grad {name}")
    if x_dtype != BF16:
        with pytest.raises(TypeError, match="x: expected the same dtype as recon_x"):
            vae_ext.elbo_loss(leaves[0], xx, leaves[1], leaves[2], recon=mode)


@pytest.mark.parametrize("use", ["grad", "backward", "penalty"])
@pytest.mark.parametrize("beta", [1.0, 0.6], ids=["total", "terms"])
@pytest.mark.parametrize("device", DEVICES)
def test_higher_order_gradients_raise_a_clear_error(device, beta, use):
    """create_graph=True gives the right first derivatives; differentiating them again (with
    autograd.grad, backward, or a gradient penalty added to the loss) raises an error that says
    why and what to use, instead of a silent zero or autograd's "does not require grad"."""
    r, x, mu, lv = make_elbo_inputs("bce_logits", (6, 11), 3, F64, device, seed=70)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    loss = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon="bce_logits", beta=beta)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    ref_leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    ref = reference.elbo_loss(ref_leaves[0], x, ref_leaves[1], ref_leaves[2], recon="bce_logits", beta=beta)
    for a, b in zip(grads, torch.autograd.grad(ref, ref_leaves)):
        torch.testing.assert_close(a, b)
    assert all(g.requires_grad for g in grads)
    with pytest.raises(RuntimeError, match=r"first derivatives only.*vae_ext\.reference\.elbo_loss"):
        if use == "grad":
            torch.autograd.grad(grads[0].sum(), leaves[0])
        elif use == "backward":
            grads[2].sum().backward()
        else:
            (loss + grads[0].square().sum()).backward()


def _opcheck_args(mode, reduction, dtype, grads=True, transpose=False, total=False):
    r, x, mu, lv = make_elbo_inputs(mode, (5, 21), 3, dtype, seed=60)
    if transpose:
        r = r.t().contiguous().t()
    if grads:
        r, mu, lv = (t.requires_grad_(True) for t in (r, mu, lv))
    return (r, x, mu, lv, mode, reduction, grads, grads, False, total)


@pytest.mark.parametrize("total", [False, True], ids=["terms", "total"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", RECON_MODES)
def test_opcheck(mode, reduction, total):
    torch.library.opcheck(ELBO_OP, _opcheck_args(mode, reduction, F32, total=total))


@pytest.mark.parametrize("unit_grad", [False, True], ids=["grad_output", "ones"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_op_total_is_rec_plus_kl(device, reduction, dtype, unit_grad):
    """total=True: the first output is rec + kl (summed in double before rounding), the second is
    empty, and backward gives both terms the loss's gradient (grad_output != 1, and == 1 on the
    loss's device: the CUDA backward's skip of its scaling pass)."""
    r, x, mu, lv = make_elbo_inputs("bce", (37, 1271), 7, dtype, device, seed=61)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    rec, kl, *_ = ELBO_OP(*_args_with(leaves, x, reduction, total=False))
    tot, empty, *_ = ELBO_OP(*_args_with(leaves, x, reduction, total=True))
    assert empty.numel() == 0 and tot.shape == rec.shape and tot.device == rec.device
    torch.testing.assert_close(tot, rec + kl, rtol=1e-6, atol=0)
    go = torch.ones_like(tot) if unit_grad else torch.rand_like(tot) + 0.5
    # retain_graph: the reference takes the plain out-of-place `g * grad_output`; without it the
    # backward scales in place (on CUDA: one kernel for the three buffers, which skips a 1).
    g_ref = torch.autograd.grad(rec + kl, leaves, go, retain_graph=True)
    g_tot = torch.autograd.grad(tot, leaves, go)
    for a, b in zip(g_tot, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _args_with(leaves, x, reduction, total):
    r, mu, lv = leaves
    return (r, x, mu, lv, "bce", reduction, True, True, False, total)


@pytest.mark.parametrize("case", ["f64", "f16", "bf16", "no_grad_flags", "transposed_recon"])
def test_opcheck_variants(case):
    dtype = dict(f64=F64, f16=F16, bf16=BF16).get(case, F32)
    args = _opcheck_args("bce_logits", "none", dtype, grads=case != "no_grad_flags",
                         transpose=case == "transposed_recon")
    torch.library.opcheck(ELBO_OP, args)


@pytest.mark.parametrize("x_same", [False, True], ids=["x_contiguous", "x_channels_last"])
def test_opcheck_channels_last(x_same):
    """The fake kernel gives the recon gradient the layout the real one does (channels_last)."""
    r, x, mu, lv = make_elbo_inputs("bce_logits", (3, 4, 5, 2), 3, F32, seed=62)
    r = r.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    x = x.contiguous(memory_format=torch.channels_last) if x_same else x
    mu, lv = mu.requires_grad_(True), lv.requires_grad_(True)
    torch.library.opcheck(ELBO_OP, (r, x, mu, lv, "bce_logits", "sum", True, True, False, False))


COMPILE_CASES = [("bce", "sum"), ("bce_logits", "none"), ("mse", "mean")]


@pytest.mark.slow
@pytest.mark.parametrize("mode,reduction", COMPILE_CASES, ids=[f"{m}-{r}" for m, r in COMPILE_CASES])
def test_torch_compile_fullgraph_matches_eager(mode, reduction):
    """torch.compile(fullgraph=True) (inductor) of a function calling elbo_loss; the backward runs the
    compiled (AOTAutograd) backward graph. Two batch sizes: the second call goes through the dynamic
    shape path of the fake kernel."""
    torch._dynamo.reset()

    def f(r, x, m, lv):
        loss, rec, kl = vae_ext.elbo_loss(r, x, m, lv, recon=mode, reduction=reduction, beta=0.5, return_terms=True)
        return loss * 1.5 + rec.detach() * 0.0, kl

    cf = torch.compile(f, fullgraph=True)
    for n in (8, 13):
        inputs = make_elbo_inputs(mode, (n, 1, 7, 9), 5, F32, seed=n)
        w = upstream_for(reduction, n).float()
        outs = []
        for fn in (f, cf):
            leaves = [t.clone().requires_grad_(True) for t in (inputs[0], inputs[2], inputs[3])]
            loss, kl = fn(leaves[0], inputs[1], leaves[1], leaves[2])
            ((loss * w).sum() + kl.sum()).backward()
            outs.append((loss.detach(), kl.detach(), *[t.grad for t in leaves]))
        for what, a, b in zip(("loss", "kl") + NAMES, outs[1], outs[0]):
            assert_close(a, b, rtol=1e-6, atol_rel=1e-7, what=f"N={n} compiled vs eager {what}")
    torch._dynamo.reset()


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
    assert_close(fused[0], classic[0], rtol=1e-5, what="loss")
    for what, a, b in zip(("grad logits", "grad mu", "grad logvar"), fused[1:], classic[1:]):
        assert_close(a, b, rtol=1e-5, atol_rel=1e-6, what=what)


# --------------------------------------------------------------------------- bce edges
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_bce_probabilities_exactly_0_and_1(device, dtype, reduction):
    """p = 0 or 1: the log clamp at -100 gives a finite loss and the 1e-12 floor finite gradients,
    equal to F.binary_cross_entropy's."""
    p = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1e-30 if dtype == F64 else 1e-38, 1.0 - 2 ** -24],
                      [1.0, 0.0, 1.0, 0.0, 0.25, 0.0, 1.0, 0.0, 0.0]], dtype=dtype, device=device)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.3, 0.7, 0.5, 1.0, 0.0],
                      [0.0, 1.0, 1.0, 0.0, 0.25, 0.0, 1.0, 0.5, 0.2]], dtype=dtype, device=device)
    mu = torch.tensor([[0.3], [-1.0]], dtype=dtype, device=device)
    lv = torch.tensor([[0.1], [-0.5]], dtype=dtype, device=device)
    w = upstream_for(reduction, 2, device=device).to(dtype)

    pf, muf, lvf = (t.clone().requires_grad_(True) for t in (p, mu, lv))
    out = vae_ext.elbo_loss(pf, x, muf, lvf, recon="bce", reduction=reduction)
    (out * w).sum().backward()

    pr, mur, lvr = (t.clone().requires_grad_(True) for t in (p, mu, lv))
    per_sample = F.binary_cross_entropy(pr, x, reduction="none").sum(1) + reference.kl_divergence(mur, lvr)
    ref = {"sum": per_sample.sum(), "mean": per_sample.mean(), "none": per_sample}[reduction]
    (ref * w).sum().backward()

    assert torch.isfinite(out).all() and torch.isfinite(pf.grad).all(), f"loss {out}, grad {pf.grad}"
    rtol = 1e-6 if dtype == F32 else 1e-12
    assert_close(out, ref, rtol=rtol, what="loss")
    assert_close(pf.grad, pr.grad, rtol=rtol, what="grad recon_x")
    assert_close(muf.grad, mur.grad, rtol=rtol, what="grad mu")
    assert_close(lvf.grad, lvr.grad, rtol=rtol, what="grad logvar")


BINARY_PATTERNS = ("all_binary", "mixed_in_vectors", "binary_rows", "soft_zero_one_rows")


@pytest.mark.parametrize("pattern", BINARY_PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_bce_binary_targets(device, dtype, pattern):
    """Targets exactly 0/1 (the MNIST case, which may take a one-log path) against soft targets, mixed
    inside a vector, by row, and rows of 0/1 targets with one soft value at the very end."""
    n, d = 7, 83
    g = torch.Generator().manual_seed(91)
    r = torch.rand(n, d, generator=g, dtype=F64) * 0.96 + 0.02
    hard = (torch.rand(n, d, generator=g, dtype=F64) > 0.5).to(F64)
    soft = torch.rand(n, d, generator=g, dtype=F64)
    if pattern == "all_binary":
        x = hard
    elif pattern == "mixed_in_vectors":
        x = hard.clone()
        x.view(-1)[::37] = soft.view(-1)[::37]
    elif pattern == "binary_rows":
        x = torch.where(torch.arange(n).view(-1, 1) % 2 == 0, hard, soft)
    else:
        x = hard.clone()
        x[:, -1] = 0.5
    mu = torch.randn(n, 4, generator=g, dtype=F64)
    lv = torch.randn(n, 4, generator=g, dtype=F64) * 0.5
    inputs = [t.to(dtype).to(device) for t in (r, x, mu, lv)]
    for mode in ("bce", "bce_logits"):
        rr = inputs[0] if mode == "bce" else (torch.logit(r) * 1.5).to(dtype).to(device)
        for reduction in REDUCTIONS:
            check_against_reference(mode, reduction, dtype, rr, *inputs[1:], beta=0.9,
                                    upstream=upstream_for(reduction, n, device=device),
                                    what=f"{mode}/{reduction}/{pattern}")


@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_bce_edges_with_binary_target_vectors(device, dtype):
    """p exactly 0/1 in rows whose targets are all 0/1 (whole vectors of binary targets): same clamp
    and floor as F.binary_cross_entropy."""
    d = 64
    pat_p = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 1e-30 if dtype == F64 else 1e-38, 1.0 - 2 ** -24],
                         dtype=F64)
    pat_x = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=F64)
    p = torch.stack([pat_p.repeat(d // 8), pat_p.flip(0).repeat(d // 8)]).to(dtype).to(device)
    x = torch.stack([pat_x.repeat(d // 8), pat_x.repeat(d // 8)]).to(dtype).to(device)
    mu = torch.zeros(2, 2, dtype=dtype, device=device)
    lv = torch.zeros(2, 2, dtype=dtype, device=device)
    for reduction in REDUCTIONS:
        w = upstream_for(reduction, 2, device=device).to(dtype)
        pf = p.clone().requires_grad_(True)
        out = vae_ext.elbo_loss(pf, x, mu, lv, recon="bce", reduction=reduction)
        (out * w).sum().backward()
        pr = p.clone().requires_grad_(True)
        per_sample = F.binary_cross_entropy(pr, x, reduction="none").sum(1)
        ref = {"sum": per_sample.sum(), "mean": per_sample.mean(), "none": per_sample}[reduction]
        (ref * w).sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(pf.grad).all()
        rtol = 1e-6 if dtype == F32 else 1e-12
        assert_close(out, ref, rtol=rtol, what=f"{reduction} loss")
        assert_close(pf.grad, pr.grad, rtol=rtol, what=f"{reduction} grad recon_x")


def _prob_regimes(dtype):
    """Rows of probabilities spanning the range the dtype can hold (grads must fit the dtype too)."""
    g = torch.Generator().manual_seed(92)
    lo = {F32: -30.0, F64: -30.0, BF16: -30.0, F16: -4.0}[dtype]
    hi_gap = {F32: -7.0, F64: -12.0, BF16: -2.0, F16: -3.0}[dtype]
    u = torch.rand(3, 160, generator=g, dtype=F64)
    rows = [
        10.0 ** (lo + (-1.0 - lo) * u[0]),            # near 0
        1.0 - 10.0 ** (hi_gap + (-1.0 - hi_gap) * u[1]),  # near 1
        0.05 + 0.9 * u[2],                            # middle
    ]
    if dtype in (F32, F64, BF16):
        tiny = torch.tensor([1e-39, 1e-41, 1e-44, 1.4e-45, 3e-38, 1.2e-38, 5e-39, 2e-40], dtype=F64)
        rows.append(torch.cat([tiny.repeat(20)]))    # float32 denormals (log clamped below ~1e-44)
    p = torch.stack(rows).to(dtype)
    p = torch.where(p >= 1.0, torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)), p)
    return p


@pytest.mark.parametrize("target", ["ones", "zeros", "soft", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bce_accuracy_across_probability_range(dtype, target):
    """Per-sample loss and gradients accurate for p near 0, near 1, in the middle and (float32)
    denormal: the logarithms must keep their relative accuracy everywhere (e.g. log p for p -> 1
    with target 1, where the loss is tiny)."""
    p = _prob_regimes(dtype)
    n, d = p.shape
    g = torch.Generator().manual_seed(93)
    x = {"ones": torch.ones(n, d, dtype=F64), "zeros": torch.zeros(n, d, dtype=F64),
         "soft": torch.rand(n, d, generator=g, dtype=F64),
         "mixed": (torch.rand(n, d, generator=g, dtype=F64) > 0.5).to(F64)}[target].to(dtype)
    mu = torch.zeros(n, 1, dtype=dtype)
    lv = torch.zeros(n, 1, dtype=dtype)
    check_against_reference("bce", "none", dtype, p, x, mu, lv, upstream=upstream_for("none", n),
                            what=f"targets {target}")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_bce_logits_accuracy_across_logit_range(dtype):
    """Logits from -100 to 100 with targets 1 (tiny losses for large positive logits), 0 and soft."""
    g = torch.Generator().manual_seed(94)
    lmax = 100.0
    l = torch.linspace(-lmax, lmax, 257, dtype=F64)
    r = torch.stack([l, l, l, torch.randn(257, generator=g, dtype=F64) * 30]).to(dtype)
    x = torch.stack([torch.ones(257, dtype=F64), torch.zeros(257, dtype=F64),
                     torch.rand(257, generator=g, dtype=F64), torch.ones(257, dtype=F64)]).to(dtype)
    mu = torch.zeros(4, 1, dtype=dtype)
    lv = torch.zeros(4, 1, dtype=dtype)
    for reduction in REDUCTIONS:
        check_against_reference("bce_logits", reduction, dtype, r, x, mu, lv,
                                upstream=upstream_for(reduction, 4), what=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_bce_logits_huge_logits(device, dtype):
    big = [1e4, -1e4] + ([1e30, -1e30] if dtype in (F32, F64) else [3e4, -3e4])
    vals = big + [50.0, -50.0, 0.0, 17.0, -88.0, 89.0]
    r = torch.tensor([vals, vals[::-1]], dtype=dtype, device=device)
    x = torch.tensor([[1.0, 0.0, 0.3, 0.7, 0.5, 0.5, 0.3, 1.0, 0.0, 1.0],
                      [0.0, 1.0, 1.0, 0.0, 0.25, 0.9, 0.1, 0.0, 1.0, 0.5]], dtype=dtype, device=device)
    mu = torch.zeros(2, 3, dtype=dtype, device=device)
    lv = torch.zeros(2, 3, dtype=dtype, device=device)
    for reduction in REDUCTIONS:
        out, grads = check_against_reference("bce_logits", reduction, dtype, r, x, mu, lv,
                                             upstream=upstream_for(reduction, 2, device=device), what=reduction)
        assert torch.isfinite(out).all(), f"{reduction}: {out}"
        assert torch.isfinite(grads[0]).all(), f"{reduction}: grad {grads[0]}"


# --------------------------------------------------------------------------- bad input
def _good():
    return make_elbo_inputs("bce", (4, 10), 3, F32, seed=80)


def _call_with(**over):
    r, x, mu, lv = _good()
    args = dict(recon_x=r, x=x, mu=mu, logvar=lv)
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return vae_ext.elbo_loss(args["recon_x"], args["x"], args["mu"], args["logvar"], **kw)


BAD_INPUTS = [
    # non-tensors
    ("recon_x_list", dict(recon_x=[[0.5] * 10] * 4), TypeError, "recon_x"),
    ("x_numpy", dict(x=_good()[1].numpy()), TypeError, "x"),
    ("mu_float", dict(mu=1.0), TypeError, "mu"),
    ("logvar_none", dict(logvar=None), TypeError, "logvar"),
    # non-floating dtypes
    ("recon_x_int", dict(recon_x=torch.ones(4, 10, dtype=torch.int64)), TypeError, "recon_x"),
    ("x_bool", dict(x=torch.ones(4, 10, dtype=torch.bool)), TypeError, "x"),
    ("mu_int32", dict(mu=torch.zeros(4, 3, dtype=torch.int32)), TypeError, "mu"),
    ("logvar_complex", dict(logvar=torch.zeros(4, 3, dtype=torch.complex64)), TypeError, "logvar"),
    # dtypes differing
    ("x_f64", dict(x=_good()[1].double()), TypeError, "x"),
    ("mu_f16", dict(mu=_good()[2].half()), TypeError, "mu"),
    ("logvar_bf16", dict(logvar=_good()[3].bfloat16()), TypeError, "logvar"),
    ("recon_x_f64", dict(recon_x=_good()[0].double()), TypeError, "x|mu|logvar|recon_x"),
    # devices differing (meta is a device on every machine)
    ("x_meta", dict(x=torch.empty(4, 10, device="meta")), ValueError, "x"),
    ("mu_meta", dict(mu=torch.empty(4, 3, device="meta")), ValueError, "mu"),
    ("logvar_meta", dict(logvar=torch.empty(4, 3, device="meta")), ValueError, "logvar"),
    # shapes
    ("x_other_numel", dict(x=torch.rand(4, 11)), ValueError, "x"),
    ("x_other_batch_same_numel", dict(x=torch.rand(10, 4)), ValueError, "x"),
    ("recon_x_0d", dict(recon_x=torch.tensor(0.5), x=torch.tensor(0.5)), ValueError, "recon_x"),
    ("mu_batch", dict(mu=torch.zeros(5, 3), logvar=torch.zeros(5, 3)), ValueError, "mu"),
    ("mu_1d", dict(mu=torch.zeros(4), logvar=torch.zeros(4)), ValueError, "mu"),
    ("mu_3d", dict(mu=torch.zeros(4, 3, 1), logvar=torch.zeros(4, 3, 1)), ValueError, "mu"),
    ("logvar_shape", dict(logvar=torch.zeros(4, 2)), ValueError, "logvar"),
    ("logvar_transposed_shape", dict(mu=torch.zeros(4, 4), logvar=torch.zeros(4, 3)), ValueError, "logvar"),
    # options
    ("recon_unknown", dict(recon="bernoulli"), ValueError, "recon"),
    ("recon_none", dict(recon=None), ValueError, "recon"),
    ("reduction_unknown", dict(reduction="avg"), ValueError, "reduction"),
    ("reduction_batchmean", dict(reduction="batchmean"), ValueError, "reduction"),
    ("beta_negative", dict(beta=-0.1), ValueError, "beta"),
    ("beta_nan", dict(beta=float("nan")), ValueError, "beta"),
    ("beta_inf", dict(beta=float("inf")), ValueError, "beta"),
    ("beta_str", dict(beta="1.0"), TypeError, "beta"),
    ("beta_bool", dict(beta=True), TypeError, "beta"),
    ("beta_none", dict(beta=None), TypeError, "beta"),
    ("beta_complex", dict(beta=1j), TypeError, "beta"),
]


@pytest.mark.parametrize("over,exc,name", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(over, exc, name):
    with pytest.raises(exc, match=arg_re(name) if "|" not in name else name):
        _call_with(**dict(over))


def test_x_requiring_grad_raises():
    r, x, mu, lv = _good()
    with pytest.raises(ValueError, match=arg_re("x")):
        vae_ext.elbo_loss(r.requires_grad_(True), x.clone().requires_grad_(True), mu, lv)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("which", ["x", "mu", "logvar"])
def test_cuda_cpu_mix_raises(which):
    r, x, mu, lv = (t.cuda() for t in _good())
    args = dict(recon_x=r, x=x, mu=mu, logvar=lv)
    args[which] = args[which].cpu()
    with pytest.raises(ValueError, match=arg_re(which)):
        vae_ext.elbo_loss(args["recon_x"], args["x"], args["mu"], args["logvar"])


OUT_OF_RANGE = [1.5, -0.1, 1.0 + 2 ** -23, -1e-30, 2.0]


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=[repr(v) for v in OUT_OF_RANGE])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_bce_recon_outside_0_1_raises_on_cpu(dtype, value, position):
    """Checked on CPU whatever `validate` says; the message names recon_x and [0, 1]. The bad value sits
    at the first element, in the middle or at the very last element (the tail of a vector loop)."""
    r, x, mu, lv = make_elbo_inputs("bce", (5, 37), 3, dtype, seed=81)
    idx = {"first": (0, 0), "middle": (2, 17), "last": (4, 36)}[position]
    r = r.clone()
    if dtype == BF16 and value == 1.0 + 2 ** -23:
        value = 1.0078125  # the next bfloat16 above 1
    r[idx] = value
    assert (r[idx].item() > 1.0) or (r[idx].item() < 0.0)
    for validate in (False, True):
        for reduction in REDUCTIONS:
            with pytest.raises(ValueError) as info:
                vae_ext.elbo_loss(r, x, mu, lv, recon="bce", reduction=reduction, validate=validate)
            msg = str(info.value)
            assert "recon_x" in msg and "[0, 1]" in msg, f"message does not name recon_x and [0, 1]: {msg!r}"


@pytest.mark.parametrize("mode", ["bce_logits", "mse"])
def test_no_range_check_outside_bce(mode):
    r, x, mu, lv = make_elbo_inputs(mode, (3, 8), 2, F32, seed=82)
    r = r.clone()
    r[0, 0], r[1, 1] = 5.0, -5.0
    vae_ext.elbo_loss(r, x, mu, lv, recon=mode)  # no exception


@pytest.mark.cuda
@requires_cuda
def test_bce_validate_on_cuda():
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs("bce", (5, 37), 3, F32, seed=81))
    r = r.clone()
    r[4, 36] = 1.5
    with pytest.raises(ValueError) as info:
        vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=True)
    assert "recon_x" in str(info.value) and "[0, 1]" in str(info.value)
    out = vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=False)
    assert not torch.isfinite(out).item(), "an out-of-range probability without validate must give NaN"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode", RECON_MODES)
def test_cuda_graph_capture_of_forward_and_backward(mode):
    """Loss + backward captured in a CUDA graph: replays on new input values give the eager results."""
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs(mode, (37, 1271), 13, F32, seed=83))
    leaves = [t.requires_grad_() for t in (r, mu, lv)]

    def step():
        for t in leaves:
            t.grad = None
        loss = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, beta=0.5)
        loss.backward()
        return loss

    graph, loss = capture_cuda_graph(step, warmups=2)
    grads = [t.grad for t in leaves]
    new = [t.cuda() for t in make_elbo_inputs(mode, (37, 1271), 13, F32, seed=84)]
    with torch.no_grad():
        for dst, src in zip((r, x, mu, lv), new):
            dst.copy_(src)
    loss_cap = torch.full_like(loss, float("nan"))
    for g in grads:
        g.fill_(float("nan"))  # every element must be rewritten by the replay
    graph.replay()
    torch.cuda.synchronize()
    loss_cap.copy_(loss)
    want = [t.detach().clone().requires_grad_() for t in (r, mu, lv)]
    ref = vae_ext.elbo_loss(want[0], x, want[1], want[2], recon=mode, beta=0.5)
    ref.backward()
    assert_close(loss_cap, ref, rtol=1e-6, atol=0, what=f"{mode} loss from a graph replay")
    for g, w, name in zip(grads, want, ("recon_x", "mu", "logvar")):
        assert_close(g, w.grad, rtol=1e-6, atol=0, what=f"{mode} grad {name} from a graph replay")


# --------------------------------------------------------------------------- FusedELBOLoss
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", RECON_MODES)
def test_fused_elbo_loss_module(mode, reduction):
    inputs = make_elbo_inputs(mode, (7, 45), 5, F32, seed=90)
    loss_fn = vae_ext.FusedELBOLoss(recon=mode, beta=0.4, reduction=reduction)
    w = upstream_for(reduction, 7)
    out, grads = loss_and_grads(loss_fn, *inputs, upstream=w)
    ref, ref_grads = loss_and_grads(vae_ext.elbo_loss, *inputs, upstream=w, recon=mode, beta=0.4,
                                    reduction=reduction)
    assert torch.equal(out, ref)
    for a, b in zip(grads, ref_grads):
        assert torch.equal(a, b)
    terms = loss_fn(*inputs, return_terms=True)
    assert len(terms) == 3
    # beta is a plain attribute: a KL warm-up sets it every step
    loss_fn.beta = 2.0
    assert_close(loss_fn(*inputs),
                 reference.elbo_loss(*f64_copies(*inputs), recon=mode, beta=2.0, reduction=reduction),
                 rtol=1e-5, what="after loss_fn.beta = 2.0")


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(recon="l1"), ValueError, "recon"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(beta="0.5"), TypeError, "beta"),
    (dict(beta=False), TypeError, "beta"),
], ids=["recon", "reduction", "beta_neg", "beta_nan", "beta_str", "beta_bool"])
def test_fused_elbo_loss_module_bad_args(kwargs, exc, name):
    with pytest.raises(exc, match=arg_re(name)):
        vae_ext.FusedELBOLoss(**kwargs)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_more_than_2_31_elements(reduction):
    """64-bit indexing: recon_x and x of 2^31 + 3072 bfloat16 elements (4 GiB each), equal everywhere
    but in the last three elements (past 2^31), so the loss is exactly 12 and the gradient 4 there
    and 0 elsewhere: an index that wrapped at 32 bits would read or write the wrong elements."""
    per_row = 2**30 + 1536
    skip_unless_cuda_free(3 * 2 * per_row * 2 + 4 * 2**30)
    r = torch.ones(2, per_row, dtype=BF16, device="cuda")
    r[1, -3:] = 3.0  # (3 - 1)^2 = 4 each
    x = torch.ones_like(r)
    mu = torch.zeros(2, 1, dtype=BF16, device="cuda", requires_grad=True)
    lv = torch.zeros(2, 1, dtype=BF16, device="cuda", requires_grad=True)  # KL = 0
    r.requires_grad_(True)
    loss = vae_ext.elbo_loss(r, x, mu, lv, recon="mse", reduction=reduction)
    want = torch.tensor(12.0) if reduction == "sum" else torch.tensor([0.0, 12.0])
    assert torch.equal(loss.cpu(), want), loss
    loss.sum().backward()
    g = r.grad
    del r, x
    assert torch.equal(g[1, -3:].float().cpu(), torch.full((3,), 4.0))
    assert g.count_nonzero().item() == 3
