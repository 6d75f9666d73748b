"""How vae_ext.elbo_loss plugs into PyTorch: autograd (no_grad, inference mode, the gradient
buffers it allocates, retain_graph, higher orders), float64 gradcheck, torch.library.opcheck,
torch.compile(fullgraph=True) and autocast.
"""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

import helpers as h

ELBO_OP = torch.ops.vae_ext.elbo_loss.default
BASIC_OP = torch.ops.vae_ext.elbo_loss_basic.default  # the common call's (csrc/elbo_basic.h)


@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_no_grad(mode):
    r, x, mu, lv = h.make_elbo_inputs(mode, (8, 50), 4, h.F32, seed=6)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    for reduction in h.REDUCTIONS:
        with torch.no_grad():
            out = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon=mode, reduction=reduction)
            terms = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon=mode, reduction=reduction,
                                      return_terms=True)
        assert not out.requires_grad and out.grad_fn is None
        assert not any(t.requires_grad for t in terms)
        ref = reference.elbo_loss(*h.f64_copies(r, x, mu, lv), recon=mode, reduction=reduction)
        h.assert_close(out, ref, rtol=1e-5, what=f"{reduction} under no_grad")
        h.assert_close(terms[0], ref, rtol=1e-5, what=f"{reduction} return_terms under no_grad")


@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_inference_mode(mode):
    r, x, mu, lv = h.make_elbo_inputs(mode, (8, 50), 4, h.F32, seed=6)
    with torch.inference_mode():
        out = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="none")
    h.assert_close(out, reference.elbo_loss(*h.f64_copies(r, x, mu, lv), recon=mode, reduction="none"),
                   rtol=1e-5, what="inference_mode")


def test_direct_op_allocates_no_grad_buffers_when_flags_false():
    r, x, mu, lv = h.make_elbo_inputs("bce", (8, 50), 4, h.F32, seed=6)
    for reduction in h.REDUCTIONS:
        rec, kl, _units, g_r, g_mu, g_lv, *_ = ELBO_OP(r, x, mu, lv, "bce", reduction, False, False, False)
        assert (g_r.numel(), g_mu.numel(), g_lv.numel()) == (0, 0, 0), (
            f"{reduction}: flags False but grad buffers of numel {g_r.numel()}, {g_mu.numel()}, {g_lv.numel()}")
        rec2, kl2, _units, g_r, g_mu, g_lv, *_ = ELBO_OP(r, x, mu, lv, "bce", reduction, True, False, False)
        assert g_r.shape == r.shape and g_mu.numel() == 0 and g_lv.numel() == 0
        rec3, kl3, _units, g_r, g_mu, g_lv, *_ = ELBO_OP(r, x, mu, lv, "bce", reduction, False, True, False)
        assert g_r.numel() == 0 and g_mu.shape == mu.shape and g_lv.shape == lv.shape
        # the flags change what is written, not the values of the terms
        for a, b in ((rec, rec2), (rec, rec3), (kl, kl2), (kl, kl3)):
            h.assert_close(a, b, rtol=1e-6, what=f"{reduction}: terms with/without grad buffers")


@pytest.mark.parametrize("reduction", h.REDUCTIONS)
def test_direct_op_buffers_not_changed_by_a_later_backward(reduction):
    """Called directly with inputs that require grad, the op returns no buffer that its backward
    scales in place (issue 19, item 4: (rec * 2 + kl * 3).backward() doubled the g_recon returned)."""
    r, x, mu, lv = h.make_elbo_inputs("bce", (4, 30), 3, h.F32, seed=7)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    rec, kl, _units, g_r, g_mu, g_lv, *_ = ELBO_OP(leaves[0], x, leaves[1], leaves[2], "bce", reduction, True, True,
                                                   False)
    before = [t.clone() for t in (g_r, g_mu, g_lv)]
    w = h.upstream_for(reduction, 4).float()
    ((rec * 2 + kl * 3) * w).sum().backward()
    for name, t, b in zip(("g_recon", "g_mu", "g_logvar"), (g_r, g_mu, g_lv), before):
        assert torch.equal(t, b), f"{name} returned by the op was changed by the backward"
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    rr = reference.elbo_loss(ref[0], x.double(), ref[1], ref[2], reduction=reduction, return_terms=True)
    ((rr[1] * 2 + rr[2] * 3) * w.double()).sum().backward()
    for t, rt in zip(leaves, ref):
        h.assert_close(t.grad, rt.grad, rtol=1e-5, atol_rel=1e-6, what="gradients through the raw op")


class _RecordElboCalls(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is ELBO_OP:
            self.calls.append((args[6:8], out[3:6]))
        elif func is BASIC_OP:  # the common call's lean op: (..., beta, grad_recon, grad_latent, validate)
            self.calls.append((args[7:9], out[1:4]))
        return out


@pytest.mark.parametrize("case", ["no_grad", "nothing_requires_grad", "recon_only", "mu_only", "logvar_only", "all"])
def test_api_requests_only_needed_grad_buffers(case):
    """Through vae_ext.elbo_loss the op gets grad flags only for what autograd will need."""
    r, x, mu, lv = h.make_elbo_inputs("mse", (8, 50), 4, h.F32, seed=6)
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
    flags, (g_recon, g_mu, g_logvar) = mode.calls[0]
    assert (bool(flags[0]), bool(flags[1])) == (expect_recon, expect_latent), f"grad flags {flags}"
    assert (g_recon.numel() > 0) == expect_recon, f"g_recon numel {g_recon.numel()}"
    assert (g_mu.numel() > 0) == expect_latent and (g_logvar.numel() > 0) == expect_latent


def test_backward_twice_with_retain_graph():
    """Saved gradient buffers must not be scaled in place: a second backward gives the same gradients."""
    r, x, mu, lv = h.make_elbo_inputs("bce", (6, 40), 5, h.F64, seed=12)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    for reduction in h.REDUCTIONS:
        for t in leaves:
            t.grad = None
        loss = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], reduction=reduction, beta=0.5)
        w = h.upstream_for(reduction, 6)
        (loss * w).sum().backward(retain_graph=True)
        first = [t.grad.clone() for t in leaves]
        (loss * w).sum().backward()
        for name, g1, t in zip(h.NAMES, first, leaves):
            h.assert_close(t.grad, 2 * g1, rtol=1e-12, what=f"{reduction}: grad {name} after two backwards")


def _compile_count_for_betas(betas):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    cnt = CompileCounter()
    r, x, mu, lv = h.make_elbo_inputs("bce", (4, 30), 3, h.F32, seed=42)
    f = torch.compile(lambda r, x, m, lv, b: vae_ext.elbo_loss(r, x, m, lv, beta=b), backend=cnt, fullgraph=True)
    for b in betas:
        got = f(r, x, mu, lv, b)
        h.assert_close(got, reference.elbo_loss(*h.f64_copies(r, x, mu, lv), beta=b), rtol=1e-5, what=f"beta={b}")
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
@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_gradcheck(mode, reduction):
    r, x, mu, lv = h.make_elbo_inputs(mode, (3, 2, 3), 2, h.F64, seed=50)
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


@pytest.mark.parametrize("x_dtype", [h.F32, h.BF16], ids=["x_float32", "x_bfloat16"])
@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("device", h.DEVICES)
def test_autocast_mixed_dtypes(device, mode, x_dtype):
    """Under torch.autocast a bfloat16 decoder output meets a float32 batch x: the inputs are
    promoted to float32, as autocast's float32 policy for PyTorch's losses does (all-bfloat16 inputs
    stay bfloat16: the kernel computes in float32 either way). Loss and gradients (each in its
    leaf's dtype) match a float64 reference; outside autocast the mismatch is still an error."""
    r, x, mu, lv = h.make_elbo_inputs(mode, (6, 50), 4, h.BF16, device, seed=80)
    leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
    xx = x.to(x_dtype)
    with torch.autocast(device, dtype=h.BF16):
        loss = vae_ext.elbo_loss(leaves[0], xx, leaves[1], leaves[2], recon=mode, beta=0.5)
    loss.backward()
    ref_leaves = [t.detach().cpu().double().requires_grad_(True) for t in leaves]
    ref = reference.elbo_loss(ref_leaves[0], xx.cpu().double(), ref_leaves[1], ref_leaves[2], recon=mode, beta=0.5)
    ref.backward()
    assert loss.dtype == h.F32
    h.assert_close(loss, ref, rtol=h.TOLS[h.F32].loss, what="loss")
    for name, a, b in zip(h.NAMES, leaves, ref_leaves):
        assert a.grad.dtype == h.BF16, name
        tol = h.TOLS[h.BF16]
        h.assert_close(a.grad, b.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name}")
    if x_dtype != h.BF16:
        with pytest.raises(TypeError, match="x: expected the same dtype as recon_x"):
            vae_ext.elbo_loss(leaves[0], xx, leaves[1], leaves[2], recon=mode)


@pytest.mark.parametrize("use", ["grad", "backward", "penalty"])
@pytest.mark.parametrize("beta", [1.0, 0.6], ids=["total", "terms"])
@pytest.mark.parametrize("device", h.DEVICES)
def test_higher_order_gradients_raise_a_clear_error(device, beta, use):
    """create_graph=True gives the right first derivatives; differentiating them again (with
    autograd.grad, backward, or a gradient penalty added to the loss) raises an error that says
    why and what to use, instead of a silent zero or autograd's "does not require grad"."""
    r, x, mu, lv = h.make_elbo_inputs("bce_logits", (6, 11), 3, h.F64, device, seed=70)
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
    r, x, mu, lv = h.make_elbo_inputs(mode, (5, 21), 3, dtype, seed=60)
    if transpose:
        r = r.t().contiguous().t()
    if grads:
        r, mu, lv = (t.requires_grad_(True) for t in (r, mu, lv))
    return (r, x, mu, lv, mode, reduction, grads, grads, False, total)


@pytest.mark.parametrize("total", [False, True], ids=["terms", "total"])
@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_opcheck(mode, reduction, total):
    torch.library.opcheck(ELBO_OP, _opcheck_args(mode, reduction, h.F32, total=total))


@pytest.mark.parametrize("unit_grad", [False, True], ids=["grad_output", "ones"])
@pytest.mark.parametrize("dtype", [h.F32, h.BF16], ids=h.dtype_id)
@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("device", h.DEVICES)
def test_op_total_is_rec_plus_kl(device, reduction, dtype, unit_grad):
    """total=True: the first output is rec + kl (summed in double before rounding), the second is
    empty, and backward gives both terms the loss's gradient (grad_output != 1, and == 1 on the
    loss's device: the CUDA backward's skip of its scaling pass)."""
    r, x, mu, lv = h.make_elbo_inputs("bce", (37, 1271), 7, dtype, device, seed=61)
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
    dtype = dict(f64=h.F64, f16=h.F16, bf16=h.BF16).get(case, h.F32)
    args = _opcheck_args("bce_logits", "none", dtype, grads=case != "no_grad_flags",
                         transpose=case == "transposed_recon")
    torch.library.opcheck(ELBO_OP, args)


@pytest.mark.parametrize("x_same", [False, True], ids=["x_contiguous", "x_channels_last"])
def test_opcheck_channels_last(x_same):
    """The fake kernel gives the recon gradient the layout the real one does (channels_last)."""
    r, x, mu, lv = h.make_elbo_inputs("bce_logits", (3, 4, 5, 2), 3, h.F32, seed=62)
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
        inputs = h.make_elbo_inputs(mode, (n, 1, 7, 9), 5, h.F32, seed=n)
        w = h.upstream_for(reduction, n).float()
        outs = []
        for fn in (f, cf):
            leaves = [t.clone().requires_grad_(True) for t in (inputs[0], inputs[2], inputs[3])]
            loss, kl = fn(leaves[0], inputs[1], leaves[1], leaves[2])
            ((loss * w).sum() + kl.sum()).backward()
            outs.append((loss.detach(), kl.detach(), *[t.grad for t in leaves]))
        for what, a, b in zip(("loss", "kl") + h.NAMES, outs[1], outs[0]):
            h.assert_close(a, b, rtol=1e-6, atol_rel=1e-7, what=f"N={n} compiled vs eager {what}")
    torch._dynamo.reset()


def test_torch_func_grad_raises_a_helpful_error():
    """torch.func.grad cannot run the C++ autograd: the error names the op and vae_ext.reference
    (functorch's own says only 'cannot use C++ torch::autograd::Function with functorch transforms')."""
    r, x, mu, lv = h.make_elbo_inputs("bce", (4, 30), 3, h.F32, seed=8)
    with pytest.raises(RuntimeError) as info:
        torch.func.grad(lambda rr: vae_ext.elbo_loss(rr, x, mu, lv))(r)
    msg = str(info.value)
    assert "vae_ext.elbo_loss" in msg and "vae_ext.reference.elbo_loss" in msg and "torch.func" in msg, msg
    # the reference works there, and vmap of the fused op runs (PyTorch's per-sample fallback)
    g = torch.func.grad(lambda rr: reference.elbo_loss(rr, x, mu, lv))(r)
    assert g.shape == r.shape
    out = torch.func.vmap(lambda a, b, m, v: vae_ext.elbo_loss(a[None], b[None], m[None], v[None]))(r, x, mu, lv)
    want = reference.elbo_loss(r, x, mu, lv, reduction="none")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError) as info:
        torch.func.grad(lambda m: vae_ext.reparameterize(m, lv).sum())(mu)
    msg = str(info.value)
    assert "vae_ext.reparameterize" in msg and "vae_ext.reference.reparameterize" in msg, msg
