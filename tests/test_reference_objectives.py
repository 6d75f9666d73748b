"""vae_ext.reference's issue-15 objectives against independent oracles, in float64.

The reference is the oracle of every fused-op test, so it gets its own: the learned-prior KL against
torch.distributions.kl_divergence(Normal, Normal), "gaussian" against F.gaussian_nll_loss(full=True)
(whose var is exp(recon_logvar)), "l1" against F.l1_loss, free bits and unit_kl against numbers
worked out by hand. Values and gradients (autograd through each side), per-sample and broadcast
priors, conv-shaped latents.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from vae_ext import reference

from helpers import BF16, F16, F32, F64, REDUCTIONS, arg_re, assert_close

RTOL = 1e-12


def _randn(shape, g, scale=1.0):
    return torch.randn(shape, generator=g, dtype=F64) * scale


def _latents(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return _randn(shape, g, 1.3), _randn(shape, g, 0.8)


def _prior(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return _randn(shape, g, 0.9), _randn(shape, g, 0.6)


def _oracle_kl_elements(mu, lv, pmu, plv):
    """KL(N(mu, exp(lv)) || N(pmu, exp(plv))) per element, mu's shape, by torch.distributions."""
    q = Normal(mu, torch.exp(0.5 * lv))
    p = Normal(pmu.expand_as(mu), torch.exp(0.5 * plv).expand_as(mu))
    return kl_divergence(q, p)


def _per_sample(t):
    return t.reshape(t.shape[0], -1).sum(dim=1)


def _reduce(per_sample, reduction):
    return {"sum": per_sample.sum, "mean": per_sample.mean, "none": lambda: per_sample}[reduction]()


def _grads(fn, tensors, upstream):
    """(fn(*leaves) detached, the gradient of sum(fn(...) * upstream) w.r.t. each leaf)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


def _upstream(reduction, n):
    if reduction == "none":
        return torch.linspace(-1.5, 2.0, n, dtype=F64)
    return torch.tensor(3.7, dtype=F64)


# --------------------------------------------------------------------------- prior KL
# (latent shape, prior shape): per sample (the prior network's output), and every broadcast a learned
# unconditional prior takes: (L,), (1, L), (C, 1, 1), (1, C, H, W), (C, H, W), a 0-d prior.
PRIOR_CASES = {
    "per_sample_NL": ((5, 7), (5, 7)),
    "per_sample_conv": ((3, 4, 5, 2), (3, 4, 5, 2)),
    "L": ((5, 7), (7,)),
    "1xL": ((5, 7), (1, 7)),
    "Cx1x1": ((3, 4, 5, 2), (4, 1, 1)),
    "1xCxHxW": ((3, 4, 5, 2), (1, 4, 5, 2)),
    "CxHxW": ((3, 4, 5, 2), (4, 5, 2)),
    "Nx1x1x1": ((3, 4, 5, 2), (3, 1, 1, 1)),
    "scalar": ((4, 6), ()),
    "odd_3x7x5": ((3, 7, 5), (7, 1)),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", list(PRIOR_CASES))
def test_prior_kl_vs_torch_distributions(case, reduction):
    """gaussian_kl and kl_divergence with a prior: the value and the gradient of mu, logvar and both
    prior tensors (a broadcast prior's gradient summed over its broadcast dimensions) equal
    torch.distributions' Normal-Normal KL summed per sample."""
    shape, pshape = PRIOR_CASES[case]
    mu, lv = _latents(shape, seed=1)
    pmu, plv = _prior(pshape, seed=2)
    up = _upstream(reduction, shape[0])
    got, g = _grads(lambda a, b, c, d: reference.gaussian_kl(a, b, c, d, reduction=reduction), (mu, lv, pmu, plv), up)
    want, w = _grads(lambda a, b, c, d: _reduce(_per_sample(_oracle_kl_elements(a, b, c, d)), reduction),
                     (mu, lv, pmu, plv), up)
    assert_close(got, want, rtol=RTOL, what=f"{case} kl")
    for name, a, b in zip(("mu", "logvar", "prior_mu", "prior_logvar"), g, w):
        assert a.shape == b.shape, f"{case}: grad {name} shape {tuple(a.shape)}"
        assert_close(a, b, rtol=1e-10, atol_rel=1e-12, what=f"{case} grad {name}")
    assert_close(reference.kl_divergence(mu, lv, pmu, plv), _per_sample(_oracle_kl_elements(mu, lv, pmu, plv)),
                 rtol=RTOL, what=f"{case} kl_divergence")


@pytest.mark.parametrize("case", ["L", "Cx1x1", "1xCxHxW", "scalar"])
def test_broadcast_prior_grad_is_the_sum_over_broadcast_dims(case):
    """A broadcast prior's gradient is the per-sample prior's gradient summed over the broadcast
    dimensions (what the fused op must reduce itself)."""
    shape, pshape = PRIOR_CASES[case]
    mu, lv = _latents(shape, seed=3)
    pmu, plv = _prior(pshape, seed=4)
    up = _upstream("none", shape[0])
    _, g_b = _grads(lambda c, d: reference.gaussian_kl(mu, lv, c, d, reduction="none"), (pmu, plv), up)
    full = tuple(t.expand(shape).contiguous() for t in (pmu, plv))
    _, g_f = _grads(lambda c, d: reference.gaussian_kl(mu, lv, c, d, reduction="none"), full, up)
    for name, gb, gf in zip(("prior_mu", "prior_logvar"), g_b, g_f):
        assert_close(gb, gf.sum_to_size(pshape), rtol=1e-12, atol_rel=1e-14, what=f"{case} grad {name}")


def test_zero_prior_is_the_standard_normal():
    """prior_mu = 0, prior_logvar = 0 gives the old N(0, I) KL, values and latent gradients."""
    mu, lv = _latents((6, 3, 4), seed=5)
    zero = torch.zeros(3, 4, dtype=F64)
    for reduction in REDUCTIONS:
        up = _upstream(reduction, 6)
        a, ga = _grads(lambda m, v, red=reduction: reference.gaussian_kl(m, v, zero, zero, reduction=red), (mu, lv), up)
        b, gb = _grads(lambda m, v, red=reduction: reference.gaussian_kl(m, v, reduction=red), (mu, lv), up)
        assert_close(a, b, rtol=RTOL, what=f"{reduction} kl")
        for x, y in zip(ga, gb):
            assert_close(x, y, rtol=RTOL, atol_rel=1e-14, what=f"{reduction} grad")


def test_prior_kl_is_zero_at_the_prior():
    """q equal to the prior: KL 0 (up to rounding) and a zero gradient for every argument."""
    pmu, plv = _prior((4, 5), seed=6)
    out, g = _grads(lambda a, b, c, d: reference.gaussian_kl(a, b, c, d), (pmu, plv, pmu, plv),
                    torch.tensor(1.0, dtype=F64))
    assert abs(out.item()) < 1e-13
    for t in g:
        assert t.abs().max().item() < 1e-13


@pytest.mark.parametrize("reduction", REDUCTIONS + ("pixel_mean",))
def test_elbo_loss_kl_term_with_prior(reduction):
    """elbo_loss's kl term with a prior is gaussian_kl's (pixel_mean: the KL as 'mean'), and the loss is
    rec + beta * kl, with the prior's gradient beta times the KL's."""
    n = 4
    g = torch.Generator().manual_seed(7)
    r, x = _randn((n, 3, 5), g), _randn((n, 3, 5), g)
    mu, lv = _latents((n, 2, 3), seed=8)
    pmu, plv = _prior((2, 1), seed=9)
    kl_red = "mean" if reduction == "pixel_mean" else reduction
    loss, rec, kl = reference.elbo_loss(r, x, mu, lv, recon="mse", reduction=reduction, beta=0.3,
                                        prior_mu=pmu, prior_logvar=plv, return_terms=True)
    want_kl = _reduce(_per_sample(_oracle_kl_elements(mu, lv, pmu, plv)), kl_red)
    assert_close(kl, want_kl, rtol=RTOL, what="kl")
    assert_close(loss, rec + 0.3 * kl, rtol=RTOL, what="loss")
    up = _upstream(kl_red, n)
    _, g_loss = _grads(lambda c, d: reference.elbo_loss(r, x, mu, lv, recon="mse", reduction=reduction, beta=0.3,
                                                        prior_mu=c, prior_logvar=d), (pmu, plv), up)
    _, g_kl = _grads(lambda c, d: reference.gaussian_kl(mu, lv, c, d, reduction=kl_red), (pmu, plv), up)
    for a, b in zip(g_loss, g_kl):
        assert_close(a, 0.3 * b, rtol=1e-12, atol_rel=1e-14, what="prior grad")


# --------------------------------------------------------------------------- gaussian reconstruction
@pytest.mark.parametrize("rlv_kind", ["scalar", "per_pixel"])
@pytest.mark.parametrize("shape", [(4, 13), (3, 2, 5, 7)], ids=["4x13", "conv3x2x5x7"])
def test_gaussian_recon_vs_gaussian_nll_loss(shape, rlv_kind):
    """recon="gaussian" is F.gaussian_nll_loss(recon_x, x, var=exp(recon_logvar), full=True) summed:
    per sample, summed, and the gradients of recon_x and recon_logvar (the scalar's: the sum over
    every element). log-variances within [-2, 2] keep var far above gaussian_nll_loss's eps clamp."""
    g = torch.Generator().manual_seed(10)
    r, x = _randn(shape, g), _randn(shape, g, 1.2)
    rlv = torch.rand(() if rlv_kind == "scalar" else shape, generator=g, dtype=F64) * 4 - 2
    per_sample = reference.reconstruction_loss(r, x, "gaussian", rlv)
    nll = F.gaussian_nll_loss(r, x, torch.exp(rlv).expand(shape), full=True, reduction="none")
    assert_close(per_sample, _per_sample(nll), rtol=RTOL, what="per sample")
    up = torch.tensor(2.5, dtype=F64)
    got, g_got = _grads(lambda a, v: reference.reconstruction_loss(a, x, "gaussian", v).sum(), (r, rlv), up)
    want, g_want = _grads(lambda a, v: F.gaussian_nll_loss(a, x, torch.exp(v).expand(shape), full=True,
                                                           reduction="sum"), (r, rlv), up)
    assert_close(got, want, rtol=RTOL, what="sum")
    for name, a, b in zip(("recon_x", "recon_logvar"), g_got, g_want):
        assert a.shape == b.shape
        assert_close(a, b, rtol=1e-10, atol_rel=1e-12, what=f"grad {name}")


def test_gaussian_recon_through_elbo_loss():
    """elbo_loss's rec term with recon="gaussian" for each reduction (pixel_mean: over every element)."""
    g = torch.Generator().manual_seed(11)
    r, x = _randn((5, 2, 3), g), _randn((5, 2, 3), g)
    rlv = _randn((5, 2, 3), g, 0.5)
    mu, lv = _latents((5, 4), seed=12)
    nll = _per_sample(F.gaussian_nll_loss(r, x, torch.exp(rlv), full=True, reduction="none"))
    for reduction in REDUCTIONS + ("pixel_mean",):
        _, rec, _ = reference.elbo_loss(r, x, mu, lv, recon="gaussian", recon_logvar=rlv, reduction=reduction,
                                        return_terms=True)
        want = nll.sum() / r.numel() if reduction == "pixel_mean" else _reduce(nll, reduction)
        assert_close(rec, want, rtol=RTOL, what=reduction)


def test_gaussian_recon_formula_by_hand():
    """One element: r = 1, x = 3, rlv = log 2 gives 0.5 * (4 / 2 + log 2 + log(2 pi))."""
    r, x = torch.tensor([[1.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64)
    rlv = torch.tensor(math.log(2.0), dtype=F64)
    got = reference.reconstruction_loss(r, x, "gaussian", rlv)
    assert got.item() == pytest.approx(0.5 * (2.0 + math.log(2.0) + math.log(2 * math.pi)), rel=1e-15)


# --------------------------------------------------------------------------- l1 reconstruction
def test_l1_vs_f_l1_loss():
    """recon="l1" is F.l1_loss(reduction="sum"), per sample and summed, with its gradient."""
    g = torch.Generator().manual_seed(13)
    r, x = _randn((6, 3, 7, 5), g), _randn((6, 3, 7, 5), g)
    assert_close(reference.reconstruction_loss(r, x, "l1"), _per_sample(F.l1_loss(r, x, reduction="none")),
                 rtol=RTOL, what="per sample")
    up = torch.tensor(-1.7, dtype=F64)
    got, (gg,) = _grads(lambda a: reference.reconstruction_loss(a, x, "l1").sum(), (r,), up)
    want, (gw,) = _grads(lambda a: F.l1_loss(a, x, reduction="sum"), (r,), up)
    assert_close(got, want, rtol=RTOL, what="sum")
    assert torch.equal(gg, gw)
    assert torch.equal(gg, up * torch.sign(r - x))


def test_l1_gradient_is_zero_at_a_tie():
    """|r - x| at r == x: gradient 0 (torch.sign's), +-1 elsewhere."""
    r = torch.tensor([[0.5, 1.0, -2.0, 0.0]], dtype=F64, requires_grad=True)
    x = torch.tensor([[0.5, 0.0, -1.0, 0.0]], dtype=F64)
    reference.reconstruction_loss(r, x, "l1").sum().backward()
    assert r.grad.tolist() == [[0.0, 1.0, -1.0, 0.0]]


# --------------------------------------------------------------------------- free bits
def _kl_by_hand(m, v):
    return 0.5 * (m * m + math.exp(v) - 1.0 - v)


def _free_bits_case():
    """N=2, 4 units, no prior. Unit KLs (batch means): under, at, over, over the floor 0.5.
    unit 0: small mu and logvar, a nonzero KL gradient that free bits must zero;
    unit 1: mu = +-1, logvar 0: KL exactly 0.5 (clamp's boundary: the gradient is kept);
    unit 2: one sample far from the prior; unit 3: a large logvar."""
    mu = torch.tensor([[0.1, 1.0, 2.0, 0.3], [-0.2, -1.0, 0.5, 0.0]], dtype=F64)
    lv = torch.tensor([[0.05, 0.0, 0.4, 1.5], [-0.1, 0.0, -0.3, 1.0]], dtype=F64)
    return mu, lv, 0.5


def test_free_bits_case_is_as_designed():
    mu, lv, lam = _free_bits_case()
    unit = [sum(_kl_by_hand(mu[i, u].item(), lv[i, u].item()) for i in range(2)) / 2 for u in range(4)]
    assert unit[0] < lam and unit[1] == lam and unit[2] > lam and unit[3] > lam
    assert_close(reference.unit_kl(mu, lv), torch.tensor(unit, dtype=F64), rtol=RTOL, what="unit_kl")


@pytest.mark.parametrize("reduction", ["sum", "mean", "pixel_mean"])
def test_free_bits_value_and_gradient_by_hand(reduction):
    """KL term sum_u max(lambda, KL_u) (times N for "sum"); the loss uses it, return_terms gives the
    true KL, detached; d/dmu and d/dlogvar are zero on the unit under the floor and the plain KL's
    (scaled as the reduction scales it) on the others, the unit exactly at the floor included."""
    mu, lv, lam = _free_bits_case()
    n = mu.shape[0]
    unit = [sum(_kl_by_hand(mu[i, u].item(), lv[i, u].item()) for i in range(n)) / n for u in range(4)]
    true_per_sample = [sum(_kl_by_hand(mu[i, u].item(), lv[i, u].item()) for u in range(4)) for i in range(n)]
    scale = n if reduction == "sum" else 1
    floored = scale * sum(max(lam, k) for k in unit)
    true = sum(true_per_sample) / (1 if reduction == "sum" else n)

    r = torch.tensor([[0.2, 0.7, 0.4], [0.9, 0.1, 0.5]], dtype=F64)
    x = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 0.5]], dtype=F64)
    m, v = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
    loss, rec, kl = reference.elbo_loss(r, x, m, v, recon="bce", beta=0.7, reduction=reduction, free_bits=lam,
                                        return_terms=True)
    assert kl.item() == pytest.approx(true, rel=1e-14)
    assert not kl.requires_grad
    assert loss.item() == pytest.approx(rec.item() + 0.7 * floored, rel=1e-14)
    loss.backward()
    per = 0.7 * scale / n  # d(scale * mean_i KL_iu)/dKL_iu, times beta
    want_mu = per * mu.clone()
    want_lv = per * 0.5 * (torch.exp(lv) - 1)
    want_mu[:, 0] = 0.0
    want_lv[:, 0] = 0.0
    assert_close(m.grad, want_mu, rtol=1e-14, what="grad mu")
    assert_close(v.grad, want_lv, rtol=1e-14, what="grad logvar")
    assert m.grad[:, 0].eq(0).all() and v.grad[:, 0].eq(0).all()
    assert m.grad[:, 1].ne(0).all(), "the unit exactly at the floor keeps its gradient"
    # gaussian_kl gives the floored term itself
    got = reference.gaussian_kl(mu, lv, reduction="mean" if reduction == "pixel_mean" else reduction, free_bits=lam)
    assert got.item() == pytest.approx(floored, rel=1e-14)


def test_free_bits_with_a_broadcast_prior():
    """Free bits with a learned (L,) prior: the floored value from torch.distributions' unit KLs, and
    the prior's gradient zero on units under the floor, the plain KL's elsewhere."""
    mu, lv = _latents((6, 5), seed=14)
    pmu, plv = _prior((5,), seed=15)
    unit = _oracle_kl_elements(mu, lv, pmu, plv).mean(dim=0)
    # two units under the floor, three over: the floor midway between the 2nd and 3rd unit KLs, not
    # on one of them (a floor equal to a computed KL is a tie, decided by the last bit of two
    # computations; test_free_bits_value_and_gradient_by_hand has an exact tie by construction)
    s = unit.sort().values
    lam = ((s[1] + s[2]) / 2).item()
    assert (s[2] - s[1]).item() > 1e-3 * lam
    under = unit < lam
    assert under.sum().item() == 2
    got, g = _grads(lambda a, b, c, d: reference.gaussian_kl(a, b, c, d, reduction="sum", free_bits=lam),
                    (mu, lv, pmu, plv), torch.tensor(1.0, dtype=F64))
    assert_close(got, 6 * unit.clamp(min=lam).sum(), rtol=RTOL, what="floored kl")
    _, g_plain = _grads(lambda a, b, c, d: reference.gaussian_kl(a, b, c, d, reduction="sum"), (mu, lv, pmu, plv),
                        torch.tensor(1.0, dtype=F64))
    for name, a, b in zip(("mu", "logvar", "prior_mu", "prior_logvar"), g, g_plain):
        want = b.clone()
        want[..., under] = 0.0
        assert_close(a, want, rtol=1e-12, atol_rel=1e-14, what=f"grad {name}")


def test_free_bits_all_over_the_floor_is_the_plain_kl():
    """A floor under every unit's KL changes nothing: the same value and gradients as no free bits."""
    mu, lv = _latents((4, 3, 2), seed=16)
    lam = reference.unit_kl(mu, lv).min().item() / 2
    for reduction in ("sum", "mean"):
        up = _upstream(reduction, 4)
        a, ga = _grads(lambda m, v, red=reduction: reference.gaussian_kl(m, v, reduction=red, free_bits=lam),
                       (mu, lv), up)
        b, gb = _grads(lambda m, v, red=reduction: reference.gaussian_kl(m, v, reduction=red), (mu, lv), up)
        assert_close(a, b, rtol=1e-12, what=reduction)
        for x, y in zip(ga, gb):
            assert_close(x, y, rtol=1e-12, atol_rel=1e-14, what=reduction)


@pytest.mark.parametrize("fn", ["elbo_loss", "gaussian_kl"])
def test_free_bits_refused_with_reduction_none(fn):
    mu, lv = _latents((3, 4), seed=17)
    with pytest.raises(ValueError, match=arg_re("free_bits")):
        if fn == "elbo_loss":
            reference.elbo_loss(torch.rand(3, 5, dtype=F64), torch.rand(3, 5, dtype=F64), mu, lv, reduction="none",
                                free_bits=0.1)
        else:
            reference.gaussian_kl(mu, lv, reduction="none", free_bits=0.1)


# --------------------------------------------------------------------------- unit_kl
@pytest.mark.parametrize("prior", [None, "per_sample", "Cx1x1"])
def test_unit_kl(prior):
    """unit_kl: shape mu.shape[1:], each unit's KL averaged over the batch (torch.distributions'),
    the same tensor that return_unit_kl appends, detached, and the true KL under free bits."""
    shape = (5, 3, 4, 2)
    mu, lv = _latents(shape, seed=18)
    pmu = plv = None
    if prior is not None:
        pmu, plv = _prior(shape if prior == "per_sample" else (3, 1, 1), seed=19)
    want = _oracle_kl_elements(mu, lv, *((pmu, plv) if prior else (torch.zeros(()), torch.zeros(())))).mean(dim=0)
    got = reference.unit_kl(mu, lv, pmu, plv)
    assert got.shape == shape[1:]
    assert_close(got, want, rtol=RTOL, what="unit_kl")
    m = mu.clone().requires_grad_(True)
    r = torch.rand(5, 6, dtype=F64)
    lam = want.flatten().sort().values[11:13].mean().item()  # between two units, on none (a tie)
    out = reference.elbo_loss(r, r, m, lv, prior_mu=pmu, prior_logvar=plv, free_bits=lam, return_terms=True,
                              return_unit_kl=True)
    assert len(out) == 4
    assert_close(out[3], want, rtol=RTOL, what="elbo_loss unit_kl (true, not floored)")
    assert not out[3].requires_grad
    assert_close(out[2], want.sum() * 5, rtol=RTOL, what="true kl = N * sum of unit_kl")
    kl, ukl = reference.gaussian_kl(m, lv, pmu, plv, free_bits=lam, return_unit_kl=True)
    assert_close(ukl, want, rtol=RTOL, what="gaussian_kl unit_kl")
    assert not ukl.requires_grad and kl.requires_grad
    only = reference.elbo_loss(r, r, m, lv, prior_mu=pmu, prior_logvar=plv, return_unit_kl=True)
    assert isinstance(only, tuple) and len(only) == 2 and only[1].shape == shape[1:]


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_unit_kl_dtype(dtype):
    """Computed and returned in the loss dtype: float32 for half inputs."""
    mu, lv = (t.to(dtype) for t in _latents((3, 4), seed=20))
    assert reference.unit_kl(mu, lv).dtype == F32
    _, ukl = reference.gaussian_kl(mu, lv, return_unit_kl=True)
    assert ukl.dtype == F32
