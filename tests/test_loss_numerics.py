"""vae_ext.elbo_loss at the edges of its numbers: empty batches, NaN and inf, the bce clamps and
floors, extreme probabilities and logits, and results that do not depend on the thread count.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from vae_ext import reference

import helpers as h


@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("device", h.DEVICES)
def test_empty_batch(device, mode, dtype):
    r = torch.empty(0, 784, dtype=dtype, device=device).requires_grad_(True)
    x = torch.empty(0, 784, dtype=dtype, device=device)
    mu = torch.empty(0, 20, dtype=dtype, device=device).requires_grad_(True)
    lv = torch.empty(0, 20, dtype=dtype, device=device).requires_grad_(True)
    s = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="sum")
    assert s.shape == () and s.dtype == h.out_dtype(dtype) and s.item() == 0.0
    s.backward()
    for t in (r, mu, lv):
        assert t.grad is not None and t.grad.shape == t.shape
    m = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="mean")
    assert m.shape == () and math.isnan(m.item())
    none = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="none")
    assert none.shape == (0,) and none.dtype == h.out_dtype(dtype)
    loss, rec, kl = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction="none", return_terms=True)
    assert loss.shape == rec.shape == kl.shape == (0,)


@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_empty_latent_and_empty_features(mode):
    """L = 0 (KL is 0) and D = 0 (reconstruction is 0) are valid shapes."""
    r, x, mu, lv = h.make_elbo_inputs(mode, (4, 9), 3, h.F64, seed=2)
    empty_lat = torch.empty(4, 0, dtype=h.F64)
    loss, rec, kl = vae_ext.elbo_loss(r, x, empty_lat, empty_lat, recon=mode, reduction="none", return_terms=True)
    assert torch.equal(kl, torch.zeros(4, dtype=h.F64))
    h.assert_close(rec, reference.elbo_loss(r, x, empty_lat, empty_lat, recon=mode, reduction="none"),
                   rtol=1e-10, what="rec with L=0")
    empty_d = torch.empty(4, 0, dtype=h.F64)
    loss, rec, kl = vae_ext.elbo_loss(empty_d, empty_d, mu, lv, recon=mode, reduction="none", return_terms=True)
    assert torch.equal(rec, torch.zeros(4, dtype=h.F64))
    h.assert_close(kl, reference.kl_divergence(mu, lv), rtol=1e-10, what="kl with D=0")


# --------------------------------------------------------------------------- non-finite inputs
NONFINITE_CASES = [
    ("recon_x", float("nan"), h.RECON_MODES),
    ("recon_x", float("inf"), ("bce_logits", "mse")),
    ("recon_x", float("-inf"), ("bce_logits", "mse")),
    ("x", float("nan"), h.RECON_MODES),
    ("x", float("inf"), ("bce_logits", "mse")),  # bce: a target outside [0, 1] raises
    ("mu", float("nan"), h.RECON_MODES),
    ("mu", float("inf"), h.RECON_MODES),
    ("logvar", float("nan"), h.RECON_MODES),
    ("logvar", float("inf"), h.RECON_MODES),
    ("logvar", float("-inf"), h.RECON_MODES),
]


@pytest.mark.parametrize("dtype", [h.F32, h.F64, h.BF16], ids=h.dtype_id)
@pytest.mark.parametrize("where,value,modes", NONFINITE_CASES,
                         ids=[f"{w}={v}" for w, v, _ in NONFINITE_CASES])
def test_non_finite_input_gives_non_finite_loss(where, value, modes, dtype):
    """A NaN/inf in sample 2 makes the loss NaN/inf (never finite and wrong, never an exception);
    with reduction='none' the other samples keep their exact values and gradients."""
    n, d, latent, bad = 5, 67, 6, 2
    for mode in modes:
        r, x, mu, lv = h.make_elbo_inputs(mode, (n, d), latent, dtype, seed=13)
        tensors = dict(recon_x=r, x=x, mu=mu, logvar=lv)
        t = tensors[where].clone()
        t[bad, t.shape[1] - 1 if where in ("recon_x", "x") else 1] = value  # last column: a vector tail
        tensors[where] = t
        args = [tensors[k] for k in ("recon_x", "x", "mu", "logvar")]
        for reduction in h.REDUCTIONS:
            out, grads = h.loss_and_grads(vae_ext.elbo_loss, *args, recon=mode, reduction=reduction,
                                          upstream=h.upstream_for(reduction, n))
            if reduction != "none":
                assert not torch.isfinite(out).item(), f"{mode}/{reduction}: finite loss {out.item()}"
                continue
            assert not torch.isfinite(out[bad]).item(), f"{mode}/none: sample {bad} finite: {out[bad].item()}"
            keep = [i for i in range(n) if i != bad]
            clean = [a[keep] for a in args]
            tol = h.TOLS[dtype]
            ref_out, ref_grads = h.loss_and_grads(reference.elbo_loss, *h.f64_copies(*clean), recon=mode,
                                                  reduction="none", upstream=h.upstream_for("none", n)[keep])
            h.assert_close(out[keep], ref_out, rtol=tol.loss, what=f"{mode}/none: clean samples' loss")
            for name, g, rg in zip(h.NAMES, grads, ref_grads):
                h.assert_close(g[keep], rg, rtol=tol.grad, atol_rel=tol.grad_atol_rel,
                               what=f"{mode}/none: clean samples' grad {name}")


# --------------------------------------------------------------------------- determinism, no_grad
@pytest.mark.parametrize("dtype", [h.F32, h.F64, h.BF16], ids=h.dtype_id)
@pytest.mark.parametrize("mode", h.RECON_MODES)
def test_bitwise_same_for_1_and_2_threads(mode, dtype):
    r, x, mu, lv = h.make_elbo_inputs(mode, (64, 20011), 33, dtype, seed=17)
    results = []
    for nt in (1, 2, 1):
        with h.num_threads(nt):
            res = []
            for reduction in ("sum", "mean", "none"):
                out, grads = h.loss_and_grads(vae_ext.elbo_loss, r, x, mu, lv, recon=mode, reduction=reduction,
                                              upstream=h.upstream_for(reduction, 64))
                res.append((out, *grads))
            results.append(res)
    for other, label in ((results[1], "2 threads"), (results[2], "1 thread again")):
        for reduction, a, b in zip(h.REDUCTIONS, results[0], other):
            for what, ta, tb in zip(("loss",) + h.NAMES, a, b):
                assert torch.equal(ta, tb), (
                    f"{mode}/{reduction} {what}: 1 thread vs {label} differ, max abs diff "
                    f"{(ta.double() - tb.double()).abs().max().item():.3g}")


# --------------------------------------------------------------------------- bce edges
@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("dtype", [h.F32, h.F64], ids=h.dtype_id)
@pytest.mark.parametrize("device", h.DEVICES)
def test_bce_probabilities_exactly_0_and_1(device, dtype, reduction):
    """p = 0 or 1: the log clamp at -100 gives a finite loss and the 1e-12 floor finite gradients,
    equal to F.binary_cross_entropy's."""
    p = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 1e-30 if dtype == h.F64 else 1e-38, 1.0 - 2 ** -24],
                      [1.0, 0.0, 1.0, 0.0, 0.25, 0.0, 1.0, 0.0, 0.0]], dtype=dtype, device=device)
    x = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.3, 0.7, 0.5, 1.0, 0.0],
                      [0.0, 1.0, 1.0, 0.0, 0.25, 0.0, 1.0, 0.5, 0.2]], dtype=dtype, device=device)
    mu = torch.tensor([[0.3], [-1.0]], dtype=dtype, device=device)
    lv = torch.tensor([[0.1], [-0.5]], dtype=dtype, device=device)
    w = h.upstream_for(reduction, 2, device=device).to(dtype)

    pf, muf, lvf = (t.clone().requires_grad_(True) for t in (p, mu, lv))
    out = vae_ext.elbo_loss(pf, x, muf, lvf, recon="bce", reduction=reduction)
    (out * w).sum().backward()

    pr, mur, lvr = (t.clone().requires_grad_(True) for t in (p, mu, lv))
    per_sample = F.binary_cross_entropy(pr, x, reduction="none").sum(1) + reference.kl_divergence(mur, lvr)
    ref = {"sum": per_sample.sum(), "mean": per_sample.mean(), "none": per_sample}[reduction]
    (ref * w).sum().backward()

    assert torch.isfinite(out).all() and torch.isfinite(pf.grad).all(), f"loss {out}, grad {pf.grad}"
    rtol = 1e-6 if dtype == h.F32 else 1e-12
    h.assert_close(out, ref, rtol=rtol, what="loss")
    h.assert_close(pf.grad, pr.grad, rtol=rtol, what="grad recon_x")
    h.assert_close(muf.grad, mur.grad, rtol=rtol, what="grad mu")
    h.assert_close(lvf.grad, lvr.grad, rtol=rtol, what="grad logvar")


BINARY_PATTERNS = ("all_binary", "mixed_in_vectors", "binary_rows", "soft_zero_one_rows", "soft_among_binary")


@pytest.mark.parametrize("pattern", BINARY_PATTERNS)
@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
@pytest.mark.parametrize("device", h.DEVICES)
def test_bce_binary_targets(device, dtype, pattern):
    """Targets exactly 0/1 (the MNIST case, which may take a one-log path) against soft targets, mixed
    inside a vector, by row, rows of 0/1 targets with one soft value at the very end, and soft
    targets scattered among 0/1 ones (an image's edges: most vectors then mix the two kinds)."""
    n, d = 7, 83
    g = torch.Generator().manual_seed(91)
    r = torch.rand(n, d, generator=g, dtype=h.F64) * 0.96 + 0.02
    hard = (torch.rand(n, d, generator=g, dtype=h.F64) > 0.5).to(h.F64)
    soft = torch.rand(n, d, generator=g, dtype=h.F64)
    if pattern == "all_binary":
        x = hard
    elif pattern == "mixed_in_vectors":
        x = hard.clone()
        x.view(-1)[::37] = soft.view(-1)[::37]
    elif pattern == "binary_rows":
        x = torch.where(torch.arange(n).view(-1, 1) % 2 == 0, hard, soft)
    elif pattern == "soft_among_binary":
        x = torch.where(torch.rand(n, d, generator=g, dtype=h.F64) < 0.6, hard, soft)
    else:
        x = hard.clone()
        x[:, -1] = 0.5
    mu = torch.randn(n, 4, generator=g, dtype=h.F64)
    lv = torch.randn(n, 4, generator=g, dtype=h.F64) * 0.5
    inputs = [t.to(dtype).to(device) for t in (r, x, mu, lv)]
    for mode in ("bce", "bce_logits"):
        rr = inputs[0] if mode == "bce" else (torch.logit(r) * 1.5).to(dtype).to(device)
        for reduction in h.REDUCTIONS:
            h.check_against_reference(mode, reduction, dtype, rr, *inputs[1:], beta=0.9,
                                      upstream=h.upstream_for(reduction, n, device=device),
                                      what=f"{mode}/{reduction}/{pattern}")


@pytest.mark.parametrize("dtype", [h.F32, h.F64], ids=h.dtype_id)
@pytest.mark.parametrize("device", h.DEVICES)
def test_bce_edges_with_binary_target_vectors(device, dtype):
    """p exactly 0/1 in rows whose targets are all 0/1 (whole vectors of binary targets): same clamp
    and floor as F.binary_cross_entropy."""
    d = 64
    pat_p = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 1e-30 if dtype == h.F64 else 1e-38, 1.0 - 2 ** -24],
                         dtype=h.F64)
    pat_x = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=h.F64)
    p = torch.stack([pat_p.repeat(d // 8), pat_p.flip(0).repeat(d // 8)]).to(dtype).to(device)
    x = torch.stack([pat_x.repeat(d // 8), pat_x.repeat(d // 8)]).to(dtype).to(device)
    mu = torch.zeros(2, 2, dtype=dtype, device=device)
    lv = torch.zeros(2, 2, dtype=dtype, device=device)
    for reduction in h.REDUCTIONS:
        w = h.upstream_for(reduction, 2, device=device).to(dtype)
        pf = p.clone().requires_grad_(True)
        out = vae_ext.elbo_loss(pf, x, mu, lv, recon="bce", reduction=reduction)
        (out * w).sum().backward()
        pr = p.clone().requires_grad_(True)
        per_sample = F.binary_cross_entropy(pr, x, reduction="none").sum(1)
        ref = {"sum": per_sample.sum(), "mean": per_sample.mean(), "none": per_sample}[reduction]
        (ref * w).sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(pf.grad).all()
        rtol = 1e-6 if dtype == h.F32 else 1e-12
        h.assert_close(out, ref, rtol=rtol, what=f"{reduction} loss")
        h.assert_close(pf.grad, pr.grad, rtol=rtol, what=f"{reduction} grad recon_x")


def _prob_regimes(dtype):
    """Rows of probabilities spanning the range the dtype can hold (grads must fit the dtype too)."""
    g = torch.Generator().manual_seed(92)
    lo = {h.F32: -30.0, h.F64: -30.0, h.BF16: -30.0, h.F16: -4.0}[dtype]
    hi_gap = {h.F32: -7.0, h.F64: -12.0, h.BF16: -2.0, h.F16: -3.0}[dtype]
    u = torch.rand(3, 160, generator=g, dtype=h.F64)
    rows = [
        10.0 ** (lo + (-1.0 - lo) * u[0]),            # near 0
        1.0 - 10.0 ** (hi_gap + (-1.0 - hi_gap) * u[1]),  # near 1
        0.05 + 0.9 * u[2],                            # middle
    ]
    if dtype in (h.F32, h.F64, h.BF16):
        tiny = torch.tensor([1e-39, 1e-41, 1e-44, 1.4e-45, 3e-38, 1.2e-38, 5e-39, 2e-40], dtype=h.F64)
        rows.append(torch.cat([tiny.repeat(20)]))    # float32 denormals (log clamped below ~1e-44)
    p = torch.stack(rows).to(dtype)
    p = torch.where(p >= 1.0, torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)), p)
    return p


@pytest.mark.parametrize("target", ["ones", "zeros", "soft", "mixed"])
@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
def test_bce_accuracy_across_probability_range(dtype, target):
    """Per-sample loss and gradients accurate for p near 0, near 1, in the middle and (float32)
    denormal: the logarithms must keep their relative accuracy everywhere (e.g. log p for p -> 1
    with target 1, where the loss is tiny)."""
    p = _prob_regimes(dtype)
    n, d = p.shape
    g = torch.Generator().manual_seed(93)
    x = {"ones": torch.ones(n, d, dtype=h.F64), "zeros": torch.zeros(n, d, dtype=h.F64),
         "soft": torch.rand(n, d, generator=g, dtype=h.F64),
         "mixed": (torch.rand(n, d, generator=g, dtype=h.F64) > 0.5).to(h.F64)}[target].to(dtype)
    mu = torch.zeros(n, 1, dtype=dtype)
    lv = torch.zeros(n, 1, dtype=dtype)
    h.check_against_reference("bce", "none", dtype, p, x, mu, lv, upstream=h.upstream_for("none", n),
                              what=f"targets {target}")


@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
def test_bce_logits_accuracy_across_logit_range(dtype):
    """Logits from -100 to 100 with targets 1 (tiny losses for large positive logits), 0 and soft."""
    g = torch.Generator().manual_seed(94)
    lmax = 100.0
    l = torch.linspace(-lmax, lmax, 257, dtype=h.F64)
    r = torch.stack([l, l, l, torch.randn(257, generator=g, dtype=h.F64) * 30]).to(dtype)
    x = torch.stack([torch.ones(257, dtype=h.F64), torch.zeros(257, dtype=h.F64),
                     torch.rand(257, generator=g, dtype=h.F64), torch.ones(257, dtype=h.F64)]).to(dtype)
    mu = torch.zeros(4, 1, dtype=dtype)
    lv = torch.zeros(4, 1, dtype=dtype)
    for reduction in h.REDUCTIONS:
        h.check_against_reference("bce_logits", reduction, dtype, r, x, mu, lv,
                                  upstream=h.upstream_for(reduction, 4), what=reduction)


@pytest.mark.parametrize("dtype", h.DTYPES, ids=h.dtype_id)
@pytest.mark.parametrize("device", h.DEVICES)
def test_bce_logits_huge_logits(device, dtype):
    big = [1e4, -1e4] + ([1e30, -1e30] if dtype in (h.F32, h.F64) else [3e4, -3e4])
    vals = big + [50.0, -50.0, 0.0, 17.0, -88.0, 89.0]
    r = torch.tensor([vals, vals[::-1]], dtype=dtype, device=device)
    x = torch.tensor([[1.0, 0.0, 0.3, 0.7, 0.5, 0.5, 0.3, 1.0, 0.0, 1.0],
                      [0.0, 1.0, 1.0, 0.0, 0.25, 0.9, 0.1, 0.0, 1.0, 0.5]], dtype=dtype, device=device)
    mu = torch.zeros(2, 3, dtype=dtype, device=device)
    lv = torch.zeros(2, 3, dtype=dtype, device=device)
    for reduction in h.REDUCTIONS:
        out, grads = h.check_against_reference("bce_logits", reduction, dtype, r, x, mu, lv,
                                               upstream=h.upstream_for(reduction, 2, device=device), what=reduction)
        assert torch.isfinite(out).all(), f"{reduction}: {out}"
        assert torch.isfinite(grads[0]).all(), f"{reduction}: grad {grads[0]}"


# --------------------------------------------------------------------------- float32 overflow
# A float32 loss whose sum leaves float's range is inf, as the reference's (issue 19, item 1: the
# double accumulator's conversion raised "value cannot be converted to type float without overflow").
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("device", h.DEVICES)
@pytest.mark.parametrize("case", ["mse_f32", "mse_f32_batch", "bce_logits_bf16"])
def test_float32_loss_overflow_is_inf(device, case, reduction):
    if case == "mse_f32":
        mode, r = "mse", torch.full((1, 2), 1.4e19)
    elif case == "mse_f32_batch":  # its mean (a per-sample sum of 7e37) is finite
        mode, r = "mse", torch.full((64, 784), 3e17)
    else:  # bfloat16 inputs, float32 loss
        mode, r = "bce_logits", torch.full((4, 8), 2e38, dtype=h.BF16)
    r = r.to(device)
    x = torch.zeros_like(r)
    mu = torch.zeros(r.shape[0], 1, dtype=r.dtype, device=device)
    lv = torch.zeros_like(mu)
    want = reference.elbo_loss(*(t.double() for t in (r, x, mu, lv)), recon=mode, reduction=reduction).float()
    if not (case == "mse_f32_batch" and reduction == "mean"):
        assert want.item() == math.inf
    for terms in (False, True):
        out = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction=reduction, return_terms=terms)
        for got in out if terms else (out,):
            assert got.dtype == h.F32
        loss = out[0] if terms else out
        torch.testing.assert_close(loss, want.to(device), rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", h.RECON_MODES)
@pytest.mark.parametrize("shape", [(0, 784), (0, 1, 28, 28)], ids=["flat", "image"])
def test_reference_empty_batch_agrees(mode, shape):
    # The oracle gives the documented empty-batch results too: 0, NaN and an empty tensor (issue
    # 19, item 3: its reshape(0, -1) raised).
    r, x = torch.empty(shape), torch.empty(shape)
    mu, lv = torch.empty(0, 20), torch.empty(0, 20)
    for reduction in h.REDUCTIONS:
        want = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, reduction=reduction)
        got = reference.elbo_loss(r, x, mu, lv, recon=mode, reduction=reduction)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True)
    assert reference.reconstruction_loss(r, x, mode).shape == (0,)


# --------------------------------------------------------------------------- float16 gradients
# The backward scales the stored gradients in float32 and rounds once (issue 19, item 2: it rounded
# grad_output to float16 first, so 65536 became inf and 1e-10 became 0), and the latent gradients
# stay in float32 until scaled (0.5 (e^12 - 1) = 81376 is beyond float16).
def _f16_case(device, p, x, mu, lv, reduction, scale, beta=1.0):
    r = torch.tensor([[p, 0.5]], dtype=h.F16, device=device).requires_grad_(True)
    xt = torch.tensor([[x, 0.5]], dtype=h.F16, device=device)
    m = torch.tensor([[mu, 0.0]], dtype=h.F16, device=device).requires_grad_(True)
    v = torch.tensor([[lv, 0.0]], dtype=h.F16, device=device).requires_grad_(True)
    loss = vae_ext.elbo_loss(r, xt, m, v, beta=beta, reduction=reduction)
    (loss * scale).sum().backward()
    r64, x64, m64, v64 = (t.detach().cpu().double().requires_grad_(t.requires_grad) for t in (r, xt, m, v))
    (reference.elbo_loss(r64, x64, m64, v64, beta=beta, reduction=reduction) * scale).sum().backward()
    return (r.grad, m.grad, v.grad), (r64.grad, m64.grad, v64.grad)


@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("device", h.DEVICES)
def test_float16_large_grad_output(device, reduction):
    got, want = _f16_case(device, 0.5, 0.375, 0.5, 0.0, reduction, 65536.0)
    assert want[0][0, 0] == 32768 and want[1][0, 0] == 32768
    for g, w in zip(got, want):
        assert g.dtype == h.F16
        torch.testing.assert_close(g.cpu().double(), w, rtol=2e-3, atol=0)


@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("device", h.DEVICES)
def test_float16_latent_gradient_beyond_float16_range(device, reduction):
    got, want = _f16_case(device, 0.5, 0.375, 0.5, 12.0, reduction, 1.0, beta=0.0)
    assert want[2][0, 0] == 0
    torch.testing.assert_close(got[2].cpu().double(), want[2], rtol=0, atol=0)
    torch.testing.assert_close(got[1].cpu().double(), want[1], rtol=0, atol=0)


@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("device", h.DEVICES)
def test_float16_small_beta(device, reduction):
    got, want = _f16_case(device, 0.5, 0.375, 1000.0, 0.0, reduction, 1.0, beta=1e-7)
    assert math.isclose(want[1][0, 0].item(), 1e-4, rel_tol=1e-12)
    torch.testing.assert_close(got[1].cpu().double(), want[1], rtol=2e-3, atol=0)


@pytest.mark.parametrize("reduction", h.REDUCTIONS)
@pytest.mark.parametrize("device", h.DEVICES)
def test_float16_bce_gradient_at_its_floor(device, reduction):
    # p = 0, x = 1: the local gradient -1e12 (the 1e-12 floor), beyond float16, is kept in float32
    # until grad_output 1e-10 scales it: -100, as the reference (it was -inf while the recon gradient
    # was stored in float16).
    got, want = _f16_case(device, 0.0, 1.0, 0.5, 0.0, reduction, 1e-10)
    assert math.isclose(want[0][0, 0].item(), -100.0, rel_tol=1e-6)
    torch.testing.assert_close(got[0].cpu().double(), want[0], rtol=2e-3, atol=0)


@pytest.mark.parametrize("dtype", [h.F16, h.BF16], ids=h.dtype_id)
def test_half_per_sample_backward_with_no_features(dtype):
    """reduction="none" on half inputs scales the recon gradient per sample in a kernel of its own;
    with zero features per sample that gradient is empty and must be left alone (the hypothesis long
    profile's counterexample: an error 'expected a dense ... g whose samples are blocks')."""
    r = torch.empty(2, 0, dtype=dtype, requires_grad=True)
    mu = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
    lv = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
    loss = vae_ext.elbo_loss(r, torch.empty(2, 0, dtype=dtype), mu, lv, recon="bce", reduction="none")
    loss.backward(torch.tensor([1.9551, 1.5617]))
    assert r.grad.shape == (2, 0) and mu.grad.shape == (2, 3)
    assert torch.equal(loss, torch.zeros(2))
