"""Issue 15's objectives in the fused vae_ext.elbo_loss, gaussian_kl and FusedELBOLoss against
vae_ext.reference in float64 (the same input values, a half input upcast exactly): learned priors
(per sample and broadcast), "l1", "gaussian" with a scalar or per-pixel recon_logvar, free bits,
return_unit_kl. The loss and every gradient (recon_x, mu, logvar, prior_mu, prior_logvar,
recon_logvar), every dtype and reduction, conv-shaped, odd, channels_last and non-contiguous
inputs, grad_output != 1 (a vector for "none")."""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import (
    BF16,
    DEVICES,
    DTYPES,
    F16,
    F32,
    F64,
    REDUCTIONS,
    TOLS,
    assert_close,
    check_objective,
    dtype_id,
    kl_as_elbo,
    make_objective_inputs,
    objective_run,
    out_dtype,
    upstream_for,
)

ALL_REDUCTIONS = REDUCTIONS + ("pixel_mean",)
FUSED_KL, REF_KL = kl_as_elbo(vae_ext.gaussian_kl), kl_as_elbo(reference.gaussian_kl)


def _up(reduction, n, device="cpu"):
    return upstream_for("sum" if reduction == "pixel_mean" else reduction, n, device=device)


# --------------------------------------------------------------------------- l1 and gaussian
RECON_CASES = {"l1": ("l1", None), "gaussian_scalar": ("gaussian", "scalar"), "gaussian_pixel": ("gaussian", "pixel")}
RECON_SHAPES = {
    "37x1271_L13": ((37, 1271), (37, 13)),
    "img3x1x5x7_conv": ((3, 1, 5, 7), (3, 2, 3, 3)),
    "1x1_L1": ((1, 1), (1, 1)),
    # more elements than one parallel_for grain, odd sizes: vector bodies, tails and block sums
    "3x100003_3x7x5": ((3, 100003), (3, 7, 5)),
}


@pytest.mark.parametrize("shape_id", list(RECON_SHAPES))
@pytest.mark.parametrize("reduction", ALL_REDUCTIONS)
@pytest.mark.parametrize("case", list(RECON_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_recon_modes_match_reference(device, dtype, case, reduction, shape_id):
    """Loss and d/d(recon_x, mu, logvar, recon_logvar): beta != 1, grad_output != 1."""
    mode, rlv = RECON_CASES[case]
    shape, latent = RECON_SHAPES[shape_id]
    if dtype == F16 and rlv == "scalar" and shape[0] * shape[1] > 2000:
        pytest.skip("a 0-d recon_logvar's gradient (a sum over every element) is beyond float16's range")
    inputs = make_objective_inputs(mode, shape, latent, dtype, device, seed=list(RECON_SHAPES).index(shape_id), rlv=rlv)
    check_objective(inputs, recon=mode, reduction=reduction, beta=0.7, upstream=_up(reduction, shape[0], device),
                    what=f"{case}/{reduction}/{dtype_id(dtype)}/{shape_id}")


@pytest.mark.parametrize("case", list(RECON_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_recon_modes_return_terms(dtype, case):
    """(loss, rec, kl) and the gradients of loss + 2 rec + 3 kl (each term's own upstream)."""
    mode, rlv = RECON_CASES[case]
    inputs = make_objective_inputs(mode, (10, 123), (10, 9), dtype, seed=40, rlv=rlv)
    for reduction in ALL_REDUCTIONS:
        out, _ = check_objective(inputs, recon=mode, reduction=reduction, beta=0.3, return_terms=True,
                                 combo=lambda o: o[0] + 2 * o[1] + 3 * o[2], upstream=_up(reduction, 10),
                                 what=f"{case}/{reduction}")
        assert_close(out[0], out[1] + 0.3 * out[2], rtol=1e-6 if dtype != F64 else 1e-12, what="loss = rec + beta*kl")


def test_l1_gradient_is_zero_at_a_tie():
    """sign(r - x), 0 where r == x, as torch.sign; scaled by grad_output."""
    r = torch.tensor([[0.5, 1.0, -2.0, 0.0], [3.0, 3.0, -1.0, -1.0]], requires_grad=True)
    x = torch.tensor([[0.5, 0.0, -1.0, 0.0], [3.0, 2.0, -1.0, 4.0]])
    mu = lv = torch.zeros(2, 1)
    loss = vae_ext.elbo_loss(r, x, mu, lv, recon="l1", reduction="none")
    assert loss.tolist() == [2.0, 6.0]
    (loss * torch.tensor([2.0, -3.0])).sum().backward()
    assert r.grad.tolist() == [[0.0, 2.0, -2.0, 0.0], [0.0, -3.0, 0.0, 3.0]]


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_l1_gradient_at_a_nan_difference_is_the_reference_s(dtype):
    """r - x NaN (a NaN input, inf - inf): the loss is NaN, the gradient there 0, as F.l1_loss's
    backward and the reference's (torch.sign(NaN) is 0); the other elements keep theirs."""
    nan, inf = float("nan"), float("inf")
    r = torch.tensor([[nan, 1.0, inf, 0.25, 2.0, -1.0, 0.5, 0.5, 1.0, 3.0]], dtype=dtype)
    x = torch.tensor([[0.0, nan, inf, 0.0, 1.0, 0.0, 0.5, nan, -2.0, nan]], dtype=dtype)
    mu = lv = torch.zeros(1, 1, dtype=dtype)
    grads = []
    for fn in (vae_ext.elbo_loss, reference.elbo_loss):
        leaf = r.detach().requires_grad_(True)
        out = fn(leaf, x, mu, lv, recon="l1", reduction="none")
        assert torch.isnan(out).all()
        (out * 3.0).sum().backward()
        grads.append(leaf.grad)
    leaf = r.detach().requires_grad_(True)
    (torch.nn.functional.l1_loss(leaf, x, reduction="sum") * 3.0).backward()
    assert torch.equal(grads[0], grads[1]), grads
    assert torch.equal(grads[0], leaf.grad), (grads[0], leaf.grad)
    assert grads[0].tolist()[0] == [0.0, 0.0, 0.0, 3.0, 3.0, -3.0, 0.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize("rlv", ["scalar", "pixel"])
def test_gaussian_recon_logvar_alone_requires_grad(rlv):
    """Only recon_logvar requires grad (a learned output variance, fixed decoder): its gradient alone."""
    inputs = make_objective_inputs("gaussian", (6, 3, 4, 5), (6, 4), F32, seed=41, rlv=rlv)
    for reduction in ALL_REDUCTIONS:
        check_objective(inputs, recon="gaussian", reduction=reduction, requires=("recon_logvar",),
                        upstream=_up(reduction, 6), what=f"{rlv}/{reduction}")


def test_gaussian_scalar_recon_logvar_is_the_sum_over_elements():
    """A 0-d recon_logvar's gradient is the per-pixel one (the same value everywhere) summed."""
    inputs = make_objective_inputs("gaussian", (5, 17), (5, 3), F64, seed=42, rlv="scalar")
    w = upstream_for("none", 5)
    _, g0 = objective_run(vae_ext.elbo_loss, inputs, recon="gaussian", reduction="none", upstream=w)
    pix = dict(inputs, recon_logvar=inputs["recon_logvar"].expand(5, 17).contiguous())
    _, g1 = objective_run(vae_ext.elbo_loss, pix, recon="gaussian", reduction="none", upstream=w)
    assert g0["recon_logvar"].shape == ()
    assert_close(g0["recon_logvar"], g1["recon_logvar"].sum(), rtol=1e-12, what="scalar grad = sum of per-pixel")
    assert_close(g0["recon_x"], g1["recon_x"], rtol=1e-14, what="recon_x grad")


# --------------------------------------------------------------------------- priors
# (latent shape, prior shape): a conditional prior's per-sample output, and the broadcasts of a
# learned unconditional prior.
PRIOR_CASES = {
    "per_sample_NxL": ((7, 13), (7, 13)),
    "L": ((7, 13), (13,)),
    "1xL": ((7, 13), (1, 13)),
    "per_sample_conv": ((3, 4, 5, 6), (3, 4, 5, 6)),
    "Cx1x1": ((3, 4, 5, 6), (4, 1, 1)),
    "1xCxHxW": ((3, 4, 5, 6), (1, 4, 5, 6)),
    "CxHxW": ((3, 4, 5, 6), (4, 5, 6)),
    "Nx1x1x1": ((3, 4, 5, 6), (3, 1, 1, 1)),  # one prior per sample, shared by its units
    "NxCx1x1": ((3, 4, 5, 6), (3, 4, 1, 1)),
    "scalar": ((7, 13), ()),
    "odd_3x7x5_per_sample": ((3, 7, 5), (3, 7, 5)),
    "odd_3x7x5_7x1": ((3, 7, 5), (7, 1)),
    "big_2x3x2049_3x1": ((2, 3, 2049), (3, 1)),
}


@pytest.mark.parametrize("reduction", ALL_REDUCTIONS)
@pytest.mark.parametrize("case", list(PRIOR_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_prior_matches_reference(device, dtype, case, reduction):
    """elbo_loss with a prior: loss and every gradient, the prior's reduced over its broadcast dims."""
    latent, pshape = PRIOR_CASES[case]
    n = latent[0]
    mode = ("bce", "mse", "bce_logits", "l1")[list(PRIOR_CASES).index(case) % 4]
    inputs = make_objective_inputs(mode, (n, 2, 11), latent, dtype, device, seed=7, prior_shape=pshape)
    check_objective(inputs, recon=mode, reduction=reduction, beta=0.6, upstream=_up(reduction, n, device),
                    what=f"{case}/{mode}/{reduction}/{dtype_id(dtype)}")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(PRIOR_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_gaussian_kl_prior_matches_reference(device, dtype, case, reduction):
    latent, pshape = PRIOR_CASES[case]
    inputs = make_objective_inputs("mse", (latent[0], 1), latent, dtype, device, seed=8, prior_shape=pshape)
    check_objective(inputs, fused=FUSED_KL, ref=REF_KL, reduction=reduction, requires=("mu", "logvar", "prior_mu",
                    "prior_logvar"), upstream=upstream_for(reduction, latent[0], device=device),
                    what=f"gaussian_kl {case}/{reduction}/{dtype_id(dtype)}")


@pytest.mark.parametrize("case", ["per_sample_NxL", "L", "Cx1x1"])
def test_prior_partial_requires_grad(case):
    """Only the prior requires grad (a prior network trained against a fixed encoder), only the
    encoder, only prior_logvar: each gradient asked for, and no other."""
    latent, pshape = PRIOR_CASES[case]
    inputs = make_objective_inputs("mse", (latent[0], 9), latent, F32, seed=9, prior_shape=pshape)
    for requires in (("prior_mu", "prior_logvar"), ("prior_logvar",), ("mu", "logvar"), ("recon_x",), ("mu",)):
        for reduction in REDUCTIONS:
            _, grads = check_objective(inputs, recon="mse", reduction=reduction, beta=1.3, requires=requires,
                                       upstream=upstream_for(reduction, latent[0]), what=f"{requires}/{reduction}")
            assert set(grads) == set(requires)


def test_prior_kl_only_upstream():
    """return_terms with the kl term alone differentiated: the prior's gradient follows the kl's
    upstream (not beta's), recon_x gets none."""
    inputs = make_objective_inputs("bce", (6, 20), (6, 5), F64, seed=10, prior_shape=(5,))
    w = torch.linspace(-1.0, 2.0, 6, dtype=F64)
    check_objective(inputs, recon="bce", reduction="none", beta=0.8, return_terms=True, combo=lambda o: o[2],
                    upstream=w, requires=("mu", "logvar", "prior_mu", "prior_logvar"), what="kl only")


def test_standard_normal_prior_is_no_prior():
    """prior_mu = 0, prior_logvar = 0 (broadcast or per sample) gives the no-prior loss and gradients."""
    inputs = make_objective_inputs("bce", (5, 30), (5, 2, 3), F64, seed=11)
    for pshape in [(2, 3), (5, 2, 3), (1,)]:
        z = torch.zeros(pshape, dtype=F64)
        for reduction in REDUCTIONS:
            w = upstream_for(reduction, 5)
            a, ga = objective_run(vae_ext.elbo_loss, dict(inputs, prior_mu=z, prior_logvar=z), reduction=reduction,
                                  upstream=w, requires=("recon_x", "mu", "logvar"))
            b, gb = objective_run(vae_ext.elbo_loss, inputs, reduction=reduction, upstream=w)
            assert_close(a, b, rtol=1e-12, what=f"{pshape} {reduction}")
            for k in gb:
                assert_close(ga[k], gb[k], rtol=1e-12, atol_rel=1e-14, what=f"{pshape} {reduction} grad {k}")


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("prior", ["none", "per_sample", "Cx1x1"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_latents(device, dtype, prior):
    """Conv latents from a conv encoder, channels_last (mu and logvar, a per-sample prior too)."""
    latent = (3, 4, 5, 6)
    pshape = {"none": None, "per_sample": latent, "Cx1x1": (4, 1, 1)}[prior]
    inputs = make_objective_inputs("l1", (3, 3, 8, 8), latent, dtype, device, seed=12, prior_shape=pshape)
    cl = torch.channels_last
    names = ["recon_x", "mu", "logvar"] + (["prior_mu", "prior_logvar"] if prior == "per_sample" else [])
    for k in names:
        inputs[k] = inputs[k].contiguous(memory_format=cl)
    assert not inputs["mu"].is_contiguous()
    for reduction in ALL_REDUCTIONS:
        check_objective(inputs, recon="l1", reduction=reduction, upstream=_up(reduction, 3, device),
                        what=f"{prior}/{reduction}")
    check_objective(inputs, fused=FUSED_KL, ref=REF_KL, upstream=upstream_for("sum", 3, device=device),
                    requires=("mu", "logvar", "prior_mu", "prior_logvar"), what="gaussian_kl")


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, dtype):
    """mu transposed, logvar a strided slice, a per-sample prior transposed, a broadcast prior a
    strided slice, a per-pixel recon_logvar transposed, a 0-d recon_logvar with a storage offset."""
    n, d, l = 11, 53, 6
    base = make_objective_inputs("gaussian", (n, d), (n, l), dtype, device, seed=13, prior_shape=(n, l), rlv="pixel")
    t = lambda a: a.t().contiguous().t()  # noqa: E731
    inputs = dict(base, recon_x=t(base["recon_x"]), mu=t(base["mu"]),
                  logvar=torch.cat([base["logvar"], base["logvar"]], dim=1)[:, ::2],
                  prior_mu=t(base["prior_mu"]), prior_logvar=t(base["prior_logvar"]),
                  recon_logvar=t(base["recon_logvar"]))
    assert not any(v.is_contiguous() for k, v in inputs.items() if k != "x")
    for reduction in ALL_REDUCTIONS:
        check_objective(inputs, recon="gaussian", reduction=reduction, beta=0.5, upstream=_up(reduction, n, device),
                        what=f"per-sample {reduction}")
    pm, pl = base["prior_mu"], base["prior_logvar"]
    strided = dict(inputs, prior_mu=torch.stack([pm[0], pm[1]], dim=1)[:, 0],  # (l,) with stride 2
                   prior_logvar=torch.stack([pl[2], pl[3]], dim=1)[:, 1],
                   recon_logvar=torch.linspace(-1, 0, 7, dtype=dtype, device=device)[3])
    assert strided["prior_mu"].shape == (l,) and not strided["prior_mu"].is_contiguous()
    assert strided["recon_logvar"].dim() == 0 and strided["recon_logvar"].storage_offset() == 3
    for reduction in ALL_REDUCTIONS:
        check_objective(strided, recon="gaussian", reduction=reduction, beta=0.5, upstream=_up(reduction, n, device),
                        what=f"broadcast {reduction}")


@pytest.mark.parametrize("which", ["prior", "recon_logvar"])
def test_expanded_leaf_accumulates(which):
    """A per-sample prior (or per-pixel recon_logvar) that is leaf.expand(...) of a smaller leaf:
    the leaf's gradient is the sum over the expanded dims (stride-0 inputs read as they are)."""
    n, l = 7, 5
    inputs = make_objective_inputs("gaussian", (n, 12), (n, l), F64, seed=14, prior_shape=(1, l), rlv="pixel")
    w = upstream_for("none", n)
    grads = []
    for fn in (vae_ext.elbo_loss, reference.elbo_loss):
        if which == "prior":
            pm, pl = (inputs[k].clone().requires_grad_(True) for k in ("prior_mu", "prior_logvar"))
            rl = inputs["recon_logvar"]
            out = fn(inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"], recon="gaussian",
                     reduction="none", prior_mu=pm.expand(n, l), prior_logvar=pl.expand(n, l), recon_logvar=rl)
            leaves = (pm, pl)
        else:
            rl = inputs["recon_logvar"][:1].clone().requires_grad_(True)
            out = fn(inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"], recon="gaussian",
                     reduction="none", recon_logvar=rl.expand(n, 12))
            leaves = (rl,)
        (out * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert_close(a, b, rtol=1e-10, atol_rel=1e-12, what=f"grad of the expanded {which} leaf")


# --------------------------------------------------------------------------- free bits
def _free_bits_inputs(dtype, latent=(8, 3, 4), pshape=None, mode="mse", seed=20):
    """Latents whose units' batch-mean KLs spread over [~0, ~3] nats, and a floor midway between two
    of them, well away from every unit (a unit on the floor would flip with rounding): some units
    under it, some over."""
    inputs = make_objective_inputs(mode, (latent[0], 21), latent, dtype, seed=seed, prior_shape=pshape)
    n = latent[0]
    scale = torch.linspace(0.02, 1.6, inputs["mu"][0].numel(), dtype=F64).view(latent[1:])
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(scale.numel(), generator=g)
    scale = scale.flatten()[perm].view(latent[1:])
    inputs["mu"] = (inputs["mu"].double() * scale).to(dtype)
    inputs["logvar"] = (inputs["logvar"].double() * scale).to(dtype)
    ukl = reference.unit_kl(*(inputs[k].double() if inputs[k] is not None else None
                              for k in ("mu", "logvar", "prior_mu", "prior_logvar"))).flatten().sort().values
    k = ukl.numel() // 2
    gaps = ukl[1:] - ukl[:-1]
    i = k - 3 + int(gaps[k - 3:k + 3].argmax())  # the widest gap near the middle
    lam = float((ukl[i] + ukl[i + 1]) / 2)
    assert gaps[i] > 0.02 * lam, f"units too close to the floor {lam}: {ukl.tolist()}"
    assert n > 1
    return inputs, lam


FB_CASES = {"no_prior": ((8, 3, 4), None), "prior_L": ((8, 12), (12,)), "prior_per_sample": ((8, 12), (8, 12)),
            "prior_Cx1x1": ((6, 3, 2, 5), (3, 1, 1))}


@pytest.mark.parametrize("reduction", ["sum", "mean", "pixel_mean"])
@pytest.mark.parametrize("case", list(FB_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_free_bits_match_reference(dtype, case, reduction):
    """The floored KL in the loss, the true KL in return_terms, the per-unit KL, and every gradient
    (zero on the units under the floor) against the reference; loss + 2 rec + 3 kl differentiated."""
    latent, pshape = FB_CASES[case]
    inputs, lam = _free_bits_inputs(dtype, latent, pshape)
    kw = dict(recon="mse", reduction=reduction, beta=0.7, free_bits=lam)
    check_objective(inputs, upstream=torch.tensor(-2.3, dtype=F64), what=f"{case}/{reduction}", **kw)
    out, grads = check_objective(inputs, return_terms=True, return_unit_kl=True,
                                 combo=lambda o: o[0] + 2 * o[1] + 3 * o[2], upstream=torch.tensor(1.7, dtype=F64),
                                 what=f"{case}/{reduction} terms", **kw)
    loss, rec, kl, ukl = out
    under = ukl < lam
    assert 0 < int(under.sum()) < under.numel(), "the case needs units on both sides of the floor"
    # the mask: no KL gradient on a unit under the floor, for any sample
    for name in ("mu", "logvar"):
        g = grads[name]
        assert g[(slice(None),) + tuple(under.nonzero().t())].eq(0).all(), f"grad {name} under the floor"
        assert g[(slice(None),) + tuple((~under).nonzero().t())].ne(0).any(), f"grad {name} over the floor"
    if pshape is not None:
        # a prior element all of whose units are under the floor gets no gradient
        units_over = (~under).to(F64).expand(latent).sum_to_size(pshape)
        for name in ("prior_mu", "prior_logvar"):
            assert grads[name][units_over == 0].eq(0).all(), f"grad {name} under the floor"
            assert grads[name][units_over > 0].ne(0).any(), f"grad {name} over the floor"
        assert (units_over == 0).any()


@pytest.mark.parametrize("case", list(FB_CASES))
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_free_bits_true_kl_and_unit_kl_are_detached(dtype, case):
    """With free bits, return_terms' kl is the true KL (smaller than the floored term, no grad) and
    unit_kl the true per-unit KL (no grad); the loss is rec + beta * floored."""
    latent, pshape = FB_CASES[case]
    inputs, lam = _free_bits_inputs(dtype, latent, pshape)
    leaves = {k: (v.detach().requires_grad_(True) if k != "x" and v is not None else v) for k, v in inputs.items()}
    for reduction in ("sum", "mean"):
        loss, rec, kl, ukl = vae_ext.elbo_loss(leaves["recon_x"], leaves["x"], leaves["mu"], leaves["logvar"],
                                               recon="mse", reduction=reduction, beta=0.7, free_bits=lam,
                                               prior_mu=leaves["prior_mu"], prior_logvar=leaves["prior_logvar"],
                                               return_terms=True, return_unit_kl=True)
        assert loss.requires_grad and not kl.requires_grad and not ukl.requires_grad
        assert ukl.shape == latent[1:] and ukl.dtype == out_dtype(dtype)
        floored = ukl.double().clamp(min=lam).sum() * (latent[0] if reduction == "sum" else 1)
        true = ukl.double().sum() * (latent[0] if reduction == "sum" else 1)
        assert_close(kl, true, rtol=1e-5, what="kl is the true KL")
        assert_close(loss.detach(), rec.detach() + 0.7 * floored, rtol=1e-5, what="loss uses the floored KL")
        assert kl < floored


@pytest.mark.parametrize("case", list(FB_CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gaussian_kl_free_bits_match_reference(dtype, case):
    latent, pshape = FB_CASES[case]
    inputs, lam = _free_bits_inputs(dtype, latent, pshape)
    for reduction in ("sum", "mean"):
        check_objective(inputs, fused=FUSED_KL, ref=REF_KL, reduction=reduction, free_bits=lam,
                        upstream=torch.tensor(0.6, dtype=F64), requires=("mu", "logvar", "prior_mu", "prior_logvar"),
                        what=f"gaussian_kl {case}/{reduction}")
        check_objective(inputs, fused=FUSED_KL, ref=REF_KL, reduction=reduction, free_bits=lam, return_unit_kl=True,
                        combo=lambda o: o[0], upstream=torch.tensor(0.6, dtype=F64),
                        requires=("mu", "logvar", "prior_mu", "prior_logvar"), what=f"gaussian_kl unit_kl {case}")


def test_free_bits_unit_exactly_at_the_floor_keeps_its_gradient():
    """clamp's rule: a unit whose KL equals the floor exactly keeps its gradient. mu = +-1, logvar 0
    gives KL 0.5 exactly in every dtype; unit 1 is under (mu = 0.1), unit 2 over (mu = 2)."""
    for dtype in (F32, F64):
        mu = torch.tensor([[1.0, 0.1, 2.0], [-1.0, -0.1, 2.0]], dtype=dtype, requires_grad=True)
        lv = torch.zeros(2, 3, dtype=dtype, requires_grad=True)
        r = torch.zeros(2, 4, dtype=dtype)
        loss = vae_ext.elbo_loss(r, r, mu, lv, recon="mse", free_bits=0.5)
        assert loss.item() == 2 * (0.5 + 0.5 + 2.0)
        loss.backward()
        assert mu.grad.tolist() == [[1.0, 0.0, 2.0], [-1.0, 0.0, 2.0]], mu.grad
        kl = vae_ext.gaussian_kl(mu.detach(), lv.detach(), reduction="mean", free_bits=0.5)
        assert kl.item() == 3.0


@pytest.mark.parametrize("reduction", ["sum", "mean", "pixel_mean"])
def test_free_bits_empty_batch_matches_reference(reduction):
    """N = 0 under free bits: every output as the reference's; the true KL of "sum" is 0 (an empty
    sum), not 0 / 0 times 0 from the per-unit KL."""
    args = (torch.rand(0, 4), torch.rand(0, 4), torch.randn(0, 3), torch.randn(0, 3))
    got = vae_ext.elbo_loss(*args, free_bits=0.5, return_terms=True, reduction=reduction)
    want = reference.elbo_loss(*args, free_bits=0.5, return_terms=True, reduction=reduction)
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True, msg=f"output {i}: {g} vs {w}")
    if reduction == "sum":
        assert got[2].item() == 0.0


def test_free_bits_zero_is_no_free_bits():
    inputs = make_objective_inputs("bce", (4, 10), (4, 3), F64, seed=21, prior_shape=(3,))
    for reduction in REDUCTIONS:
        w = upstream_for(reduction, 4)
        a, ga = objective_run(vae_ext.elbo_loss, inputs, reduction=reduction, free_bits=0.0, upstream=w)
        b, gb = objective_run(vae_ext.elbo_loss, inputs, reduction=reduction, upstream=w)
        assert torch.equal(a, b)
        for k in gb:
            assert torch.equal(ga[k], gb[k]), k


# --------------------------------------------------------------------------- return_unit_kl
@pytest.mark.parametrize("prior", [None, "per_sample", "Cx1x1"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_return_unit_kl(device, dtype, prior):
    """unit_kl: mu.shape[1:], the loss dtype, detached, each unit's KL averaged over the batch; it
    comes last, after the terms or alone; the loss and gradients are the same with and without it."""
    latent = (5, 3, 4, 2)
    pshape = {None: None, "per_sample": latent, "Cx1x1": (3, 1, 1)}[prior]
    inputs = make_objective_inputs("bce_logits", (5, 40), latent, dtype, device, seed=22, prior_shape=pshape)
    tol = TOLS[dtype]
    want = reference.unit_kl(*(None if inputs[k] is None else inputs[k].double().cpu()
                               for k in ("mu", "logvar", "prior_mu", "prior_logvar")))
    for reduction in ALL_REDUCTIONS:
        w = _up(reduction, 5, device)
        base, g_base = objective_run(vae_ext.elbo_loss, inputs, recon="bce_logits", reduction=reduction, upstream=w)
        out, g = objective_run(vae_ext.elbo_loss, inputs, recon="bce_logits", reduction=reduction, upstream=w,
                               return_unit_kl=True, combo=lambda o: o[0])
        assert isinstance(out, tuple) and len(out) == 2
        assert torch.equal(out[0], base)
        for k in g_base:
            assert torch.equal(g[k], g_base[k]), k
        terms = vae_ext.elbo_loss(*(inputs[k] for k in ("recon_x", "x", "mu", "logvar")), recon="bce_logits",
                                  reduction=reduction, prior_mu=inputs["prior_mu"], prior_logvar=inputs["prior_logvar"],
                                  return_terms=True, return_unit_kl=True)
        assert len(terms) == 4
        for ukl in (out[1], terms[3]):
            assert ukl.shape == latent[1:] and ukl.dtype == out_dtype(dtype) and ukl.device == inputs["mu"].device
            assert not ukl.requires_grad
            assert_close(ukl, want, rtol=tol.loss, atol=1e-6, what=f"unit_kl {reduction}")
    kl, ukl = vae_ext.gaussian_kl(inputs["mu"], inputs["logvar"], inputs["prior_mu"], inputs["prior_logvar"],
                                  return_unit_kl=True)
    assert_close(ukl, want, rtol=tol.loss, atol=1e-6, what="gaussian_kl unit_kl")
    assert_close(kl, want.sum() * 5, rtol=tol.loss, what="gaussian_kl = N * sum of unit_kl")


# --------------------------------------------------------------------------- FusedELBOLoss
@pytest.mark.parametrize("reduction", ["sum", "mean", "pixel_mean"])
def test_fused_elbo_loss_module_new_options(reduction):
    """free_bits on the module, prior and recon_logvar per call: the same as elbo_loss, bitwise."""
    inputs, lam = _free_bits_inputs(F32, (8, 12), (12,), mode="mse")
    inputs["recon_logvar"] = torch.tensor(-0.4)
    loss_fn = vae_ext.FusedELBOLoss(recon="gaussian", beta=0.4, reduction=reduction, free_bits=lam)
    w = torch.tensor(1.9, dtype=F64)

    def via_module(r, x, mu, lv, recon=None, beta=None, reduction=None, free_bits=None, **kw):
        # the module's own options stand; the ones passed are the reference's
        return loss_fn(r, x, mu, lv, kw.pop("return_terms", False), **kw)

    for extra in ({}, {"return_terms": True, "return_unit_kl": True}):
        combo = (lambda o: o[0] + o[1]) if extra else None
        out, g = objective_run(via_module, inputs, upstream=w, combo=combo, **extra)
        ref, rg = objective_run(vae_ext.elbo_loss, inputs, upstream=w, combo=combo, recon="gaussian", beta=0.4,
                                reduction=reduction, free_bits=lam, **extra)
        for a, b in zip(out if extra else (out,), ref if extra else (ref,)):
            assert torch.equal(a, b)
        for k in rg:
            assert torch.equal(g[k], rg[k]), k
    check_objective(inputs, fused=via_module, recon="gaussian", beta=0.4, reduction=reduction, free_bits=lam,
                    upstream=w, what="module vs reference")


# --------------------------------------------------------------------------- more paths
@pytest.mark.parametrize("case", ["prior_L", "gaussian_scalar", "gaussian_pixel_prior", "l1_free_bits"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_defaults_beta_one(dtype, case):
    """beta = 1 without return_terms: the kernel adds the terms itself (the op's total=True path)."""
    mode, pshape, rlv = {"prior_L": ("bce", (6,), None), "gaussian_scalar": ("gaussian", None, "scalar"),
                         "gaussian_pixel_prior": ("gaussian", (8, 6), "pixel"),
                         "l1_free_bits": ("l1", (6,), None)}[case]
    inputs = make_objective_inputs(mode, (8, 3, 5), (8, 6), dtype, seed=30, prior_shape=pshape, rlv=rlv)
    kw = {"free_bits": 0.4} if case == "l1_free_bits" else {}
    for reduction in ("sum", "mean") + (() if kw else ("none",)):
        check_objective(inputs, recon=mode, reduction=reduction, upstream=upstream_for(reduction, 8),
                        what=f"{case}/{reduction}", **kw)
        check_objective(inputs, recon=mode, reduction=reduction, what=f"{case}/{reduction} unit grad_output", **kw)


@pytest.mark.parametrize("layout", ["recon_channels_last", "rlv_channels_last", "both"])
def test_gaussian_channels_last_recon_and_recon_logvar(layout):
    """A per-pixel recon_logvar and recon_x in different memory layouts pair up by logical index."""
    inputs = make_objective_inputs("gaussian", (3, 4, 5, 6), (3, 7), F32, seed=31, rlv="pixel")
    cl = torch.channels_last
    if layout in ("recon_channels_last", "both"):
        inputs["recon_x"] = inputs["recon_x"].contiguous(memory_format=cl)
    if layout in ("rlv_channels_last", "both"):
        inputs["recon_logvar"] = inputs["recon_logvar"].contiguous(memory_format=cl)
    for reduction in ALL_REDUCTIONS:
        check_objective(inputs, recon="gaussian", reduction=reduction, upstream=_up(reduction, 3), what=reduction)


def test_empty_batch():
    """N = 0: sums are 0 as the reference's; free bits and unit_kl are batch means, NaN as the reference's."""
    mu = torch.zeros(0, 3, 2)
    pm = torch.zeros(3, 2)
    r = torch.zeros(0, 4)
    for fn, args, kw in ((vae_ext.gaussian_kl, (mu, mu, pm, pm), {}),
                         (vae_ext.gaussian_kl, (mu, mu, pm, pm), dict(free_bits=0.5, return_unit_kl=True)),
                         (vae_ext.elbo_loss, (r, r, mu, mu), dict(recon="gaussian", recon_logvar=torch.tensor(0.0),
                                                                  return_terms=True)),
                         (vae_ext.elbo_loss, (r, r, mu, mu), dict(recon="l1", free_bits=0.5, reduction="mean",
                                                                  return_terms=True))):
        got = fn(*args, **kw)
        want = getattr(reference, fn.__name__)(*args, **kw)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert a.shape == b.shape, (fn.__name__, kw, a, b)
            assert torch.equal(a.isnan(), b.isnan()), (fn.__name__, kw, a, b)
            assert torch.equal(a.nan_to_num(), b.nan_to_num()), (fn.__name__, kw, a, b)
