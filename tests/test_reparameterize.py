"""vae_ext.reparameterize: z = mu + exp(0.5*logvar) * eps, eps from a Philox4x32-10 stream (Box-Muller).

Statistics use fixed seeds, so they are deterministic; bounds are 5 standard errors of the statistic.
Gradients are compared with vae_ext.reference.reparameterize_with_eps evaluated in float64 on the eps
the op returned (or, for half types, the exact float32 eps recomputed with philox_normal).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import vae_ext
from vae_ext import reference

from helpers import (
    BF16,
    CUDA_OK,
    DEVICES,
    DTYPES,
    F16,
    F32,
    F64,
    HALF,
    TOLS,
    arg_re,
    assert_close,
    capture_cuda_graph,
    dtype_id,
    num_threads,
    rng_state_kept,
    skip_unless_cuda_free,
)

REP_OP = torch.ops.vae_ext.reparameterize.default
PHILOX = torch.ops.vae_ext.philox_normal.default
REP_BWD = torch.ops.vae_ext.reparameterize_backward.default

requires_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a CUDA device and vae_ext built with CUDA kernels")


def draw(mu, logvar, k=0, return_eps=True, generator=None):
    """The low-level op: (z, eps, (seed, offset))."""
    z, eps, state = REP_OP(mu, logvar, k, return_eps, generator)
    assert state.dtype == torch.int64 and state.numel() == 2
    s = state.cpu()
    return z, eps, (int(s[0]), int(s[1]))


def standard(n, dtype=F32, device="cpu"):
    return torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device)


def bits(t):
    """float32 values as int64 bit patterns (numpy), for exact set operations."""
    return t.detach().float().contiguous().view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF


def pair_codes(t):
    b = bits(t.flatten())
    return (b[:-1] << 32) | b[1:]


# --------------------------------------------------------------------------- statistics
@pytest.fixture(scope="module")
def million():
    """10^6 draws of eps (mu = 0, logvar = 0: z == eps) with a fixed seed."""
    with rng_state_kept():
        torch.manual_seed(20240611)
        mu, lv = standard(1000)
        z, eps = vae_ext.reparameterize(mu, lv, num_samples=1000, return_eps=True)
    assert z.shape == eps.shape == (1000, 1000)
    assert torch.equal(z, eps), "with mu = 0 and logvar = 0, z must equal eps"
    return eps.double().flatten().numpy()


def test_eps_moments(million):
    e = million
    n = e.size
    assert np.isfinite(e).all()
    mean, var = e.mean(), e.var()
    skew, exkurt = stats.skew(e), stats.kurtosis(e)
    assert abs(mean) < 5 / math.sqrt(n), f"mean {mean:.3g}"
    assert abs(var - 1) < 5 * math.sqrt(2 / n), f"variance {var:.6f}"
    assert abs(skew) < 5 * math.sqrt(6 / n), f"skewness {skew:.3g}"
    assert abs(exkurt) < 5 * math.sqrt(24 / n), f"excess kurtosis {exkurt:.3g}"


def test_eps_tails(million):
    e = np.abs(million)
    n = e.size
    for c in (1.0, 2.0, 3.0, 4.0):
        p = math.erfc(c / math.sqrt(2))
        count = int((e > c).sum())
        sd = math.sqrt(n * p * (1 - p))
        assert abs(count - n * p) < 5 * sd + 1, f"|eps| > {c}: {count} draws, expected {n * p:.1f} +- {sd:.1f}"


def test_eps_kolmogorov_smirnov(million):
    res = stats.kstest(million, "norm")
    assert res.pvalue > 1e-3, f"KS statistic {res.statistic:.3g}, p-value {res.pvalue:.3g}"


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8, 1000])
def test_eps_no_autocorrelation(million, lag):
    """Neighbours (lag 1..8, inside one Philox block and across blocks) and successive samples
    (lag 1000 = one mu-sized row of num_samples) are uncorrelated, in value and in square."""
    e = million
    n = e.size - lag
    r = float(np.mean(e[:-lag] * e[lag:]))
    assert abs(r) < 5 / math.sqrt(n), f"lag-{lag} autocorrelation {r:.3g}"
    s = e * e - 1.0  # dependence beyond linear (e.g. a Box-Muller pair sharing its radius wrongly)
    r2 = float(np.mean(s[:-lag] * s[lag:]) / np.mean(s * s))
    assert abs(r2) < 5 / math.sqrt(n), f"lag-{lag} correlation of squares {r2:.3g}"


def test_eps_pairs_never_repeat_within_a_call(million):
    codes = pair_codes(torch.from_numpy(million).float())
    dup = codes.size - np.unique(codes).size
    assert dup == 0, f"{dup} repeated consecutive pairs of eps within one call: stream reused"


def test_z_distribution_per_element():
    """z ~ N(mu, exp(logvar)) element-wise (catches exp(logvar) in place of exp(0.5*logvar), swapped args)."""
    mu = torch.tensor([-2.0, 0.0, 3.0, 0.5, 100.0])
    lv = torch.tensor([math.log(0.25), 0.0, math.log(4.0), -10.0, 2.0])
    k = 20000
    with rng_state_kept():
        torch.manual_seed(99)
        z = vae_ext.reparameterize(mu, lv, num_samples=k).double()
    sigma = torch.exp(0.5 * lv.double())
    mean_err = (z.mean(0) - mu.double()).abs()
    assert (mean_err < 5 * sigma / math.sqrt(k)).all(), f"mean errors {mean_err.tolist()}"
    sd_ratio = z.std(0) / sigma
    assert ((sd_ratio - 1).abs() < 5 / math.sqrt(2 * k)).all(), f"std / sigma {sd_ratio.tolist()}"


# --------------------------------------------------------------------------- every element written
SIZES = [1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 33, 1001, 4099]


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_every_element_written(dtype, k):
    """Poison the allocator with NaNs first; every element must then be a finite non-zero draw equal to
    the Philox stream's value at its index, for sizes that end in every kind of vector/block tail."""
    for n in SIZES:
        poison = torch.full((8 * n * max(k, 1) + 64,), float("nan"), dtype=dtype)
        del poison
        mu, lv = standard(n, dtype)
        z, eps, (seed, offset) = draw(mu, lv, k)
        shape = (k, n) if k else (n,)
        assert z.shape == eps.shape == shape and z.dtype == eps.dtype == dtype
        assert torch.isfinite(eps).all(), f"n={n}: non-finite eps at {torch.nonzero(~torch.isfinite(eps)).tolist()[:5]}"
        expect = PHILOX(eps, seed, offset)
        assert expect.dtype == F32 and expect.shape == eps.shape
        # the stream has exact zeros of its own (an angle uniform on a quarter turn, 4 pairs in 2^24,
        # makes one of the pair's sine and cosine exactly 0), so a zero is wrong only where the
        # stream's value is not
        zeros = (eps == 0) & (expect != 0)
        assert not zeros.any(), f"n={n}: exact zeros at {torch.nonzero(zeros).tolist()[:5]}"
        assert torch.equal(eps, expect.to(dtype)), f"n={n}, k={k}: eps differs from philox_normal at its index"


def test_values_mostly_distinct():
    with rng_state_kept():
        torch.manual_seed(7)
        mu, lv = standard(4099)
        z = vae_ext.reparameterize(mu, lv, num_samples=3)
    n = z.numel()
    dup = n - torch.unique(z).numel()
    assert dup <= 0.002 * n, f"{dup} repeated values out of {n}"


def test_eps_depends_only_on_index_not_on_shape():
    """Same (seed, offset): a small call's eps is the prefix of a large call's, whatever the shapes."""
    with rng_state_kept():
        torch.manual_seed(3)
        _, small, st_small = draw(*standard(5))
        torch.manual_seed(3)
        _, big, st_big = draw(torch.zeros(7, 11, 53), torch.zeros(7, 11, 53), 2)
    assert st_small == st_big, f"rng states {st_small} vs {st_big} right after the same manual_seed"
    assert torch.equal(big.flatten()[:5], small)
    seed, offset = st_big
    a = PHILOX(torch.empty(3, 5), seed, offset)
    b = PHILOX(torch.empty(15, dtype=F64), seed, offset)
    assert a.shape == (3, 5) and b.dtype == F32
    assert torch.equal(a.flatten(), b)
    assert torch.equal(b, big.flatten()[:15])
    assert not torch.equal(PHILOX(torch.empty(15), seed, offset + 4), b), "offset ignored"
    assert not torch.equal(PHILOX(torch.empty(15), seed + 1, offset), b), "seed ignored"


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_eps_computed_in_float32_for_every_dtype(dtype):
    """eps of a float64/half call is the float32 Philox draw converted to that dtype."""
    with rng_state_kept():
        torch.manual_seed(12)
        mu, lv = standard(777, dtype)
        _, eps, (seed, offset) = draw(mu, lv, 2)
    assert torch.equal(eps, PHILOX(eps, seed, offset).to(dtype))


# --------------------------------------------------------------------------- reproducibility
def test_manual_seed_reproducible_and_successive_calls_fresh():
    mu, lv = torch.randn(50, 17), torch.randn(50, 17) * 0.5
    with rng_state_kept():
        torch.manual_seed(1)
        z1 = vae_ext.reparameterize(mu, lv)
        z2 = vae_ext.reparameterize(mu, lv)
        torch.manual_seed(1)
        z1b = vae_ext.reparameterize(mu, lv)
        z2b = vae_ext.reparameterize(mu, lv)
        torch.manual_seed(2)
        z3 = vae_ext.reparameterize(mu, lv)
    assert torch.equal(z1, z1b) and torch.equal(z2, z2b), "torch.manual_seed does not make runs reproducible"
    for a, b, what in ((z1, z2, "successive calls"), (z1, z3, "seeds 1 and 2")):
        same = (a == b).float().mean().item()
        assert same < 0.01, f"{what}: {same:.1%} of the elements are equal"


@pytest.mark.parametrize("k", [0, 4])
def test_successive_calls_do_not_overlap(k):
    """Each call gets a new (seed, offset) and its stream does not overlap the previous calls': no
    consecutive pair of eps of one call appears in the next calls (an overlap at any shift would), and
    the draws are uncorrelated."""
    n = 25013
    with rng_state_kept():
        torch.manual_seed(11)
        calls = [draw(*standard(n), k) for _ in range(3)]
    states = [c[2] for c in calls]
    assert len(set(states)) == 3, f"successive calls used the same (seed, offset): {states}"
    first = pair_codes(calls[0][1])
    for i in (1, 2):
        later = pair_codes(calls[i][1])
        common = np.intersect1d(first, later).size
        assert common == 0, f"call {i} repeats {common} consecutive pairs of call 0 (overlapping streams)"
        e0, ei = calls[0][1].double().flatten(), calls[i][1].double().flatten()
        r = (e0 * ei).mean().item()
        assert abs(r) < 5 / math.sqrt(e0.numel()), f"call 0 vs call {i}: correlation {r:.3g}"


def test_generator_argument():
    mu, lv = torch.randn(40, 9), torch.randn(40, 9)
    with rng_state_kept():
        torch.manual_seed(5)
        before = torch.get_rng_state()
        g1 = torch.Generator().manual_seed(123)
        g2 = torch.Generator().manual_seed(123)
        g3 = torch.Generator().manual_seed(124)
        a1 = vae_ext.reparameterize(mu, lv, generator=g1)
        a2 = vae_ext.reparameterize(mu, lv, generator=g1)
        b1 = vae_ext.reparameterize(mu, lv, generator=g2)
        b2 = vae_ext.reparameterize(mu, lv, generator=g2, num_samples=2)
        c1 = vae_ext.reparameterize(mu, lv, generator=g3)
        assert torch.equal(torch.get_rng_state(), before), "a call with an explicit generator advanced the default one"
        d = vae_ext.reparameterize(mu, lv)  # the default generator is still at seed 5, offset 0
        torch.manual_seed(5)
        d2 = vae_ext.reparameterize(mu, lv)
    assert torch.equal(a1, b1), "same generator seed, different z"
    assert torch.equal(d, d2)
    assert (a1 != a2).float().mean() > 0.99, "the generator is not advanced between calls"
    assert (a1 != c1).float().mean() > 0.99, "generator seed ignored"
    # g2 has made one call, as g1 had before a2: same (seed, offset), and eps depends only on the index
    assert torch.equal(b2[0], a2), "same generator history, different draws"
    assert b2.shape == (2, 40, 9)


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=dtype_id)
def test_bitwise_same_for_1_and_2_threads(dtype):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(200003, generator=g).to(dtype)
    lv = (torch.randn(200003, generator=g) * 0.5).to(dtype)
    up = torch.randn(3, 200003, generator=g).to(dtype)
    res = []
    for nt in (1, 2):
        with num_threads(nt), rng_state_kept():
            torch.manual_seed(77)
            m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
            z, eps = vae_ext.reparameterize(m, l, num_samples=3, return_eps=True)
            (z * up).sum().backward()
            res.append((z.detach(), eps, m.grad, l.grad))
    for what, a, b in zip(("z", "eps", "grad mu", "grad logvar"), *res):
        diff = (a.double() - b.double()).abs().max()
        assert torch.equal(a, b), f"{what}: 1 vs 2 threads differ (max diff {diff:.3g})"


# --------------------------------------------------------------------------- gradients
REP_SHAPES = {"37x13": (37, 13), "2x3x5": (2, 3, 5), "scalar": (), "1": (1,), "empty": (0, 4), "odd": (1031,)}


@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("shape_id", list(REP_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_gradients_match_reference(device, dtype, shape_id, k):
    shape = REP_SHAPES[shape_id]
    g = torch.Generator().manual_seed(list(REP_SHAPES).index(shape_id))
    mu = torch.randn(shape, generator=g, dtype=F64).to(dtype).to(device)
    lv = (torch.randn(shape, generator=g, dtype=F64) * 0.8).to(dtype).to(device)
    out_shape = shape if k is None else (k, *shape)
    up = torch.randn(out_shape, generator=g, dtype=F64).to(dtype).to(device)
    tol = TOLS[dtype]
    m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
    with rng_state_kept():
        z, eps = vae_ext.reparameterize(m, l, num_samples=k, return_eps=True)
    assert z.shape == eps.shape == out_shape and z.dtype == eps.dtype == dtype and z.device == mu.device
    assert not eps.requires_grad
    (z * up).sum().backward()
    assert m.grad.dtype == dtype and l.grad.dtype == dtype and m.grad.shape == shape and l.grad.shape == shape

    m64, l64 = (t.detach().to("cpu", F64, copy=True).requires_grad_(True) for t in (mu, lv))
    zr = reference.reparameterize_with_eps(m64, l64, eps.double().cpu())
    (zr * up.double().cpu()).sum().backward()
    # eps is rounded to a half type when returned; the kernel uses the float32 value: allow that rounding
    assert_close(z, zr, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what="z")
    assert_close(m.grad, m64.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what="grad mu")
    assert_close(l.grad, l64.grad, rtol=tol.grad * (2 if dtype in HALF else 1), atol_rel=tol.grad_atol_rel * 4,
                 what="grad logvar")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
def test_half_types_use_the_returned_eps(dtype):
    """For half types eps is the float32 draw (philox_normal) rounded to the dtype, and both z and the
    backward use exactly that returned eps, so z - mu and the gradients agree with it."""
    g = torch.Generator().manual_seed(4)
    mu = torch.randn(513, generator=g).to(dtype)
    lv = (torch.randn(513, generator=g) * 0.8).to(dtype)
    up = torch.randn(2, 513, generator=g).to(dtype)
    m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
    z, eps, (seed, offset) = draw(m, l, 2)
    assert torch.equal(eps, PHILOX(eps, seed, offset).to(dtype))
    (z * up).sum().backward()
    terms = 0.5 * up.double() * torch.exp(0.5 * lv.double()) * eps.double()
    ref = terms.sum(0)
    # one rounding to the half type of a float32 result
    ulp = 2.0 ** (-11 if dtype == F16 else -8)
    err = (l.grad.double() - ref).abs()
    bound = ulp * ref.abs() + 1e-6 * terms.abs().sum(0) + 2.0 ** -24
    assert (err <= bound).all(), f"worst element error {err.max():.3g} (bound {bound[err.argmax()]:.3g})"
    zr = mu.double() + torch.exp(0.5 * lv.double()) * eps.double()
    zerr = (z.detach().double() - zr).abs()
    assert (zerr <= ulp * zr.abs() + 2.0 ** -24).all(), f"z worst error {zerr.max():.3g}"


@pytest.mark.parametrize("k", [None, 4])
@pytest.mark.parametrize("dtype", [F32, F64], ids=dtype_id)
def test_gradient_accuracy_extreme_values(dtype, k):
    """logvar in [-30, 20], |mu| up to 1e3: grad_logvar relative error <= 1e-5 (float32) against the
    float64 formula on the returned eps. sigma*eps recovered as z - mu would fail here (z == mu in float32
    when sigma = exp(-15))."""
    g = torch.Generator().manual_seed(8)
    n = 4096
    mu = ((torch.rand(n, generator=g, dtype=F64) * 2 - 1) * 1e3).to(dtype)
    lv = (torch.rand(n, generator=g, dtype=F64) * 50 - 30).to(dtype)
    lv[:4] = torch.tensor([-30.0, 20.0, -29.5, 19.9], dtype=dtype)
    mu[:4] = torch.tensor([1e3, -1e3, -999.0, 1e3], dtype=dtype)
    out_shape = (n,) if k is None else (k, n)
    up = torch.randn(out_shape, generator=g, dtype=F64).to(dtype)
    m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
    with rng_state_kept():
        torch.manual_seed(8)
        z, eps = vae_ext.reparameterize(m, l, num_samples=k, return_eps=True)
    (z * up).sum().backward()
    sigma = torch.exp(0.5 * lv.double())
    terms = 0.5 * up.double() * sigma * eps.double()
    if k is None:
        ref, scale = terms, terms.abs()
    else:
        ref, scale = terms.sum(0), terms.abs().sum(0)
    rtol = 1e-5 if dtype == F32 else 1e-12
    err = (l.grad.double() - ref).abs()
    bad = err > rtol * scale + 1e-300
    assert not bad.any(), (
        f"{int(bad.sum())} elements of grad_logvar off by more than {rtol} relative; worst: index "
        f"{int((err / scale).argmax())}, mu={mu[(err / scale).argmax()].item()}, "
        f"logvar={lv[(err / scale).argmax()].item()}, rel err {(err / scale).max().item():.3g}")
    gm_ref = up.double() if k is None else up.double().sum(0)
    assert_close(m.grad, gm_ref, rtol=rtol, atol_rel=rtol, what="grad mu")
    zr = mu.double() + sigma * eps.double()
    zerr = (z.double() - zr).abs()
    zscale = mu.double().abs() + (sigma * eps.double()).abs()
    assert (zerr <= (1e-6 if dtype == F32 else 1e-14) * zscale).all(), f"z rel err {(zerr / zscale).max():.3g}"


def test_backward_uses_the_forward_eps_after_generator_moved_on():
    """The backward recomputes eps from the state saved by the forward, not from the generator's
    current state: other draws (or a re-seed) between forward and backward change nothing."""
    mu, lv = torch.randn(300), torch.randn(300)
    up = torch.randn(2, 300)
    with rng_state_kept():
        torch.manual_seed(21)
        m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
        z, eps = vae_ext.reparameterize(m, l, num_samples=2, return_eps=True)
        vae_ext.reparameterize(mu, lv, num_samples=5)  # advances the default generator
        torch.manual_seed(22)
        (z * up).sum().backward()
    ref = (0.5 * up.double() * torch.exp(0.5 * lv.double()) * eps.double()).sum(0)
    assert_close(l.grad, ref, rtol=1e-5, atol_rel=1e-6, what="grad logvar")
    gen = torch.Generator().manual_seed(5)
    m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
    z, eps = vae_ext.reparameterize(m, l, generator=gen, return_eps=True)
    vae_ext.reparameterize(mu, lv, generator=gen)
    gen.manual_seed(6)
    (z * up[0]).sum().backward()
    ref = 0.5 * up[0].double() * torch.exp(0.5 * lv.double()) * eps.double()
    assert_close(l.grad, ref, rtol=1e-5, atol_rel=1e-6, what="grad logvar (explicit generator)")


@pytest.mark.parametrize("k", [None, 1, 2])
def test_gradcheck_with_fixed_generator(k):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    lv = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)

    def f(m, l):
        gen = torch.Generator().manual_seed(1234)  # every evaluation draws the same eps
        return vae_ext.reparameterize(m, l, num_samples=k, generator=gen)

    assert torch.autograd.gradcheck(f, (mu, lv))


@pytest.mark.parametrize("k", [None, 1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_gradgradcheck_with_fixed_generator(device, k):
    """Second derivatives (create_graph=True: the backward in differentiable ops, eps redrawn from
    the forward's rng_state), e.g. d2z/dlogvar2 = 0.25 sigma eps; and the first derivatives it
    gives equal the kernel backward's."""
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(4, 3, generator=g, dtype=F64).to(device).requires_grad_(True)
    lv = torch.randn(4, 3, generator=g, dtype=F64).to(device).requires_grad_(True)

    def f(m, l):
        gen = torch.Generator(device=device).manual_seed(1234)  # every evaluation draws the same eps
        return vae_ext.reparameterize(m, l, num_samples=k, generator=gen)

    assert torch.autograd.gradgradcheck(f, (mu, lv))
    up = torch.randn(f(mu, lv).shape, generator=g, dtype=F64).to(device)
    first = torch.autograd.grad(f(mu, lv), (mu, lv), up)
    again = torch.autograd.grad(f(mu, lv), (mu, lv), up, create_graph=True)
    assert again[1].requires_grad  # d grad_logvar / d logvar != 0 (grad_mu = sum of up: a constant)
    for a, b in zip(again, first):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_mixed_dtypes(device):
    """Under torch.autocast, mu and logvar of different float dtypes are promoted (as autocast's
    promote ops do); each gradient comes back in its own leaf's dtype. Outside autocast: an error."""
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(5, 4, generator=g).to(device, BF16).requires_grad_(True)
    lv = torch.randn(5, 4, generator=g).to(device).requires_grad_(True)
    gen = torch.Generator(device=device).manual_seed(9)
    with torch.autocast(device, dtype=BF16):
        z, eps = vae_ext.reparameterize(mu, lv, generator=gen, return_eps=True)
    assert z.dtype == F32
    z.backward(torch.ones_like(z))
    assert mu.grad.dtype == BF16 and lv.grad.dtype == F32
    torch.testing.assert_close(z, mu.detach().float() + torch.exp(0.5 * lv.detach()) * eps)
    torch.testing.assert_close(lv.grad, 0.5 * torch.exp(0.5 * lv.detach()) * eps)
    with pytest.raises(TypeError, match="logvar: expected the same dtype as mu"):
        vae_ext.reparameterize(mu, lv)


def test_reparameterize_backward_op_directly():
    with rng_state_kept():
        torch.manual_seed(31)
        lv = torch.randn(6, 5)
        z, eps, state = REP_OP(torch.zeros(6, 5), lv, 3, True, None)
    grad_z = torch.randn(3, 6, 5)
    gm, gl = REP_BWD(grad_z, lv, state, 3)
    assert_close(gm, grad_z.sum(0), rtol=1e-6, atol_rel=1e-7, what="grad mu")
    assert_close(gl, (0.5 * grad_z * torch.exp(0.5 * lv) * eps).sum(0), rtol=1e-5, atol_rel=1e-6, what="grad logvar")


# --------------------------------------------------------------------------- opcheck / compile
def _rep_args(dtype, k, return_eps, generator=None, requires_grad=True):
    g = torch.Generator().manual_seed(9)
    mu = torch.randn(5, 7, generator=g).to(dtype).requires_grad_(requires_grad)
    lv = (torch.randn(5, 7, generator=g) * 0.5).to(dtype).requires_grad_(requires_grad)
    return (mu, lv, k, return_eps, generator)


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("k,return_eps", [(0, True), (0, False), (3, True), (2, False)])
def test_opcheck_default_generator(dtype, k, return_eps):
    """All default opcheck utilities: their eager vs AOT comparison re-seeds the default generator
    (torch.manual_seed(42)) before each run, so both runs draw the same eps."""
    with rng_state_kept():
        torch.library.opcheck(REP_OP, _rep_args(dtype, k, return_eps))
        torch.library.opcheck(REP_OP, _rep_args(dtype, k, return_eps, requires_grad=False))


def test_opcheck_explicit_generator():
    """With an explicit torch.Generator the AOT-dispatch utilities would compare two calls that draw
    from the generator at two positions (it advances), so only the checks whose meaning does not
    depend on two calls drawing the same numbers run here: schema, autograd registration, fake tensor."""
    gen = torch.Generator().manual_seed(3)
    torch.library.opcheck(REP_OP, _rep_args(F32, 2, True, generator=gen),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_philox_and_backward_ops():
    torch.library.opcheck(PHILOX, (torch.empty(4, 9), 1234, 8))
    with rng_state_kept():
        torch.manual_seed(0)
        lv = torch.randn(6, 5)
        _, _, state = REP_OP(torch.zeros(6, 5), lv, 2, False, None)
    torch.library.opcheck(REP_BWD, (torch.randn(2, 6, 5), lv, state, 2))


# --------------------------------------------------------------------------- channels_last
# z (each z[k]), eps and the gradients follow a channels_last(_3d) mu, as mu + std * randn_like(mu)
# does, with the eps of each LOGICAL element unchanged: z.contiguous() is bitwise what a contiguous
# mu gives for the same seed (issue 18, item 2).
CL_CASES = {
    "cl_rgb": ((2, 3, 17, 33), torch.channels_last),  # few channels, long spatial runs
    "cl_wide": ((3, 300, 5, 7), torch.channels_last),  # many channels, short spatial runs
    "cl_tiles": ((2, 40, 23, 19), torch.channels_last),  # channel and spatial tiles both partial
    "cl3d": ((2, 5, 3, 4, 6), torch.channels_last_3d),
}


def _cl_inputs(case, dtype, device="cpu"):
    shape, fmt = CL_CASES[case]
    g = torch.Generator().manual_seed(len(shape) * 7 + shape[1])
    mu = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    lv = (torch.randn(shape, generator=g, dtype=F64) * 0.8).to(dtype)
    return mu.to(device), lv.to(device), fmt


def _samples_in_layout(t, k, fmt):
    return all(t[i].is_contiguous(memory_format=fmt) for i in range(k)) if k else t.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("k", [None, 3], ids=["no_k", "k3"])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("case", list(CL_CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_mu_gives_channels_last_z(device, case, dtype, k):
    mu, lv, fmt = _cl_inputs(case, dtype, device)
    mcl, lcl = mu.contiguous(memory_format=fmt), lv.contiguous(memory_format=fmt)
    assert not mcl.is_contiguous()
    out_shape = mu.shape if k is None else (k, *mu.shape)
    up = torch.randn(out_shape, generator=torch.Generator().manual_seed(5), dtype=F64).to(dtype).to(device)
    grads = {}
    for name, (m0, l0) in {"contiguous": (mu, lv), "channels_last": (mcl, lcl)}.items():
        m, l = m0.clone().requires_grad_(True), l0.clone().requires_grad_(True)
        gen = torch.Generator(device=device).manual_seed(11)
        z, eps = vae_ext.reparameterize(m, l, num_samples=k, generator=gen, return_eps=True)
        (z * up).sum().backward()
        grads[name] = (z, eps, m.grad, l.grad)
    zc, ec, gmc, glc = grads["contiguous"]
    z, eps, gm, gl = grads["channels_last"]
    kk = 0 if k is None else k
    assert _samples_in_layout(z, kk, fmt) and _samples_in_layout(eps, kk, fmt), (z.stride(), eps.stride())
    assert gm.is_contiguous(memory_format=fmt) and gl.is_contiguous(memory_format=fmt), (gm.stride(), gl.stride())
    assert torch.equal(z.contiguous(), zc) and torch.equal(eps.contiguous(), ec)
    # the gradients from the same numbers, summed in the same order with the same roundings
    assert torch.equal(gm.contiguous(), gmc) and torch.equal(gl.contiguous(), glc)


def test_channels_last_mu_with_contiguous_logvar():
    """mu's layout decides; a logvar of another layout is copied into it, in the backward too."""
    mu, lv, fmt = _cl_inputs("cl_tiles", F32)
    res = []
    for m0 in (mu, mu.contiguous(memory_format=fmt)):
        m, l = m0.clone().requires_grad_(True), lv.clone().requires_grad_(True)
        z = vae_ext.reparameterize(m, l, num_samples=2, generator=torch.Generator().manual_seed(4))
        (z * torch.arange(z.numel(), dtype=F32).reshape(z.shape).sin()).sum().backward()
        res.append((z, m.grad, l.grad))
    assert res[1][0][0].is_contiguous(memory_format=fmt)
    for a, b in zip(res[0], res[1]):
        assert_close(b, a, rtol=2 * torch.finfo(F32).eps, atol_rel=1e-6, what="mixed layouts")


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("grad_layout", ["channels_last", "contiguous"])
def test_channels_last_backward_takes_grad_z_in_either_layout(grad_layout, k):
    mu, lv, fmt = _cl_inputs("cl_tiles", F32)
    lcl = lv.contiguous(memory_format=fmt)
    with rng_state_kept():
        torch.manual_seed(0)
        _, _, state = REP_OP(mu.contiguous(memory_format=fmt), lcl, k, False, None)
    gz = torch.randn((k, *mu.shape) if k else mu.shape)
    want = REP_BWD(gz, lv, state, k)  # contiguous logvar: the logical order
    gz_in = gz if grad_layout == "contiguous" else _cl_like(gz, k, fmt)
    got = REP_BWD(gz_in, lcl, state, k)
    for a, b in zip(got, want):
        assert a.is_contiguous(memory_format=fmt)
        assert torch.equal(a.contiguous(), b)


def _cl_like(t, k, fmt):
    if not k:
        return t.contiguous(memory_format=fmt)
    flat = t.reshape(-1, *t.shape[2:]).contiguous(memory_format=fmt)
    return flat.view(t.shape)


@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("case", ["cl_rgb", "cl3d"])
def test_opcheck_channels_last(case, k):
    """The fake kernels give z, eps and the gradients the layouts the real ones do."""
    mu, lv, fmt = _cl_inputs(case, F32)
    mu = mu.contiguous(memory_format=fmt).requires_grad_(True)
    lv = lv.contiguous(memory_format=fmt).requires_grad_(True)
    with rng_state_kept():
        torch.library.opcheck(REP_OP, (mu, lv, k, True, None))
        torch.manual_seed(0)
        _, _, state = REP_OP(mu.detach(), lv.detach(), k, False, None)
    gz = torch.randn((k, *mu.shape) if k else mu.shape)
    torch.library.opcheck(REP_BWD, (_cl_like(gz, k, fmt), lv.detach(), state, k))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) (inductor) of a function using reparameterize; the backward runs the
    compiled graph. Checks z and the gradients against the formula on the returned eps, that the draws
    equal eager ones under the same seed, and that successive compiled calls draw fresh samples."""
    torch._dynamo.reset()

    def f(m, l):
        z, eps = vae_ext.reparameterize(m, l, num_samples=3, return_eps=True)
        return z * 2.0 + 1.0, eps

    cf = torch.compile(f, fullgraph=True)
    g = torch.Generator().manual_seed(10)
    mu, lv = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    up = torch.randn(3, 16, 8, generator=g)
    results = []
    with rng_state_kept():
        for fn in (f, cf):
            torch.manual_seed(1)
            m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
            y, eps = fn(m, l)
            (y * up).sum().backward()
            results.append((y.detach(), eps, m.grad, l.grad))
        y2, eps2 = cf(mu, lv)
    (y_e, eps_e, gm_e, gl_e), (y_c, eps_c, gm_c, gl_c) = results
    assert torch.equal(eps_c, eps_e), "compiled and eager calls after the same manual_seed draw different eps"
    sigma = torch.exp(0.5 * lv.double())
    assert_close(y_c, 2.0 * (mu.double() + sigma * eps_c.double()) + 1.0, rtol=1e-5, atol_rel=1e-6, what="z")
    assert_close(gm_c, 2.0 * up.double().sum(0), rtol=1e-5, atol_rel=1e-6, what="grad mu")
    assert_close(gl_c, (2.0 * 0.5 * up.double() * sigma * eps_c.double()).sum(0), rtol=1e-5, atol_rel=1e-6,
                 what="grad logvar")
    assert_close(gl_c, gl_e, rtol=1e-6, atol_rel=1e-7, what="grad logvar compiled vs eager")
    assert (eps2 != eps_c).float().mean() > 0.99, "successive compiled calls reuse the same eps"
    torch._dynamo.reset()


# --------------------------------------------------------------------------- non-finite, bad input
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_nan_stays_in_its_element(dtype, k):
    mu, lv = torch.randn(50, dtype=dtype), torch.randn(50, dtype=dtype)
    mu[7] = float("nan")
    lv[13] = float("nan")
    z, eps = vae_ext.reparameterize(mu, lv, num_samples=k, return_eps=True)
    z = z.reshape(-1, 50)
    assert torch.isfinite(eps).all()
    nan_cols = torch.isnan(z).any(0).nonzero().flatten().tolist()
    assert nan_cols == [7, 13], f"NaN columns {nan_cols}"
    assert torch.isnan(z[:, [7, 13]]).all()
    others = [i for i in range(50) if i not in (7, 13)]
    assert torch.isfinite(z[:, others]).all()


def _mu_lv():
    return torch.zeros(4, 3), torch.zeros(4, 3)


BAD = [
    ("shape", lambda: vae_ext.reparameterize(torch.zeros(4, 3), torch.zeros(3, 4)), ValueError, "logvar"),
    ("shape_broadcastable", lambda: vae_ext.reparameterize(torch.zeros(4, 3), torch.zeros(1, 3)), ValueError, "logvar"),
    ("dtype", lambda: vae_ext.reparameterize(torch.zeros(4, 3), torch.zeros(4, 3, dtype=F64)), TypeError, "logvar"),
    ("device_meta", lambda: vae_ext.reparameterize(torch.zeros(4, 3), torch.zeros(4, 3, device="meta")), ValueError,
     "logvar"),
    ("mu_int", lambda: vae_ext.reparameterize(torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4, 3)), TypeError,
     "mu"),
    ("logvar_bool", lambda: vae_ext.reparameterize(torch.zeros(4, 3), torch.zeros(4, 3, dtype=torch.bool)), TypeError,
     "logvar"),
    ("mu_not_tensor", lambda: vae_ext.reparameterize([0.0, 1.0], torch.zeros(2)), TypeError, "mu"),
    ("logvar_not_tensor", lambda: vae_ext.reparameterize(torch.zeros(2), 0.0), TypeError, "logvar"),
    ("num_samples_0", lambda: vae_ext.reparameterize(*_mu_lv(), num_samples=0), ValueError, "num_samples"),
    ("num_samples_neg", lambda: vae_ext.reparameterize(*_mu_lv(), num_samples=-2), ValueError, "num_samples"),
    ("num_samples_float", lambda: vae_ext.reparameterize(*_mu_lv(), num_samples=2.0), TypeError, "num_samples"),
    ("num_samples_str", lambda: vae_ext.reparameterize(*_mu_lv(), num_samples="2"), TypeError, "num_samples"),
    ("num_samples_bool", lambda: vae_ext.reparameterize(*_mu_lv(), num_samples=True), TypeError, "num_samples"),
    # more draws than one tensor's int64 size in bytes holds, and more than int64 itself
    ("num_samples_too_many", lambda: vae_ext.reparameterize(*_mu_lv(), num_samples=2 ** 62), ValueError,
     "num_samples"),
    ("num_samples_beyond_int64", lambda: vae_ext.reparameterize(*_mu_lv(), num_samples=2 ** 70), ValueError,
     "num_samples"),
    ("op_num_samples_too_many", lambda: REP_OP(*_mu_lv(), 2 ** 62, False, None), ValueError, "num_samples"),
    ("generator_int", lambda: vae_ext.reparameterize(*_mu_lv(), generator=123), TypeError, "generator"),
    ("generator_state_tensor", lambda: vae_ext.reparameterize(*_mu_lv(), generator=torch.get_rng_state()), TypeError,
     "generator"),
    ("generator_other_device", lambda: vae_ext.reparameterize(torch.zeros(4, 3, device="meta"),
                                                              torch.zeros(4, 3, device="meta"),
                                                              generator=torch.Generator()), ValueError, "generator"),
]


@pytest.mark.parametrize("call,exc,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(call, exc, name):
    with pytest.raises(exc, match=arg_re(name)):
        call()


def test_num_samples_numpy_int_accepted():
    z = vae_ext.reparameterize(*_mu_lv(), num_samples=np.int64(2))
    assert z.shape == (2, 4, 3)


def test_return_eps_false_returns_tensor():
    z = vae_ext.reparameterize(*_mu_lv())
    assert isinstance(z, torch.Tensor) and z.shape == (4, 3)
    z, eps, _ = REP_OP(*_mu_lv(), 0, False, None)
    assert eps.numel() == 0


def test_no_grad():
    m, l = torch.zeros(5, 3, requires_grad=True), torch.zeros(5, 3, requires_grad=True)
    with torch.no_grad():
        z = vae_ext.reparameterize(m, l, num_samples=2)
    assert not z.requires_grad


# --------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@requires_cuda
def test_cuda_generator_on_cpu_raises():
    mu, lv = torch.zeros(4, 3, device="cuda"), torch.zeros(4, 3, device="cuda")
    with pytest.raises(ValueError, match=arg_re("generator")):
        vae_ext.reparameterize(mu, lv, generator=torch.Generator())
    with pytest.raises(ValueError, match=arg_re("logvar")):
        vae_ext.reparameterize(mu, lv.cpu())


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("seed,offset", [(0, 0), (1234, 8), (2 ** 40 + 7, 1 << 20)])
def test_cuda_eps_equals_cpu_eps(seed, offset):
    like = torch.empty(10007)
    cpu = PHILOX(like, seed, offset)
    cuda = PHILOX(like.cuda(), seed, offset).cpu()
    assert_close(cuda, cpu, rtol=1e-5, atol=1e-6, what="philox_normal CUDA vs CPU")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    z, eps, (s, o) = draw(*standard(4099, F32, "cuda"), 3, generator=gen)
    assert torch.equal(eps.flatten(), PHILOX(eps, s, o).flatten())
    assert_close(eps.cpu(), PHILOX(torch.empty(3, 4099), s, o), rtol=1e-5, atol=1e-6, what="reparameterize eps")


@pytest.mark.cuda
@requires_cuda
def test_cuda_more_than_2_31_elements():
    """64-bit indexing: 2^31 + 8 bfloat16 elements (4 GiB a tensor). The last eps (past 2^31) are
    the Philox stream's values for their own indices, z is built from them, and the backward
    (which redraws them) gives d/dlogvar = 0.5 * eps there."""
    n = 2**31 + 8
    skip_unless_cuda_free(6 * n * 2 + 4 * 2**30)
    mu = torch.zeros(n, dtype=BF16, device="cuda", requires_grad=True)
    lv = torch.zeros(n, dtype=BF16, device="cuda", requires_grad=True)  # sigma = 1: z = eps
    z, eps, (s, o) = draw(mu, lv, generator=torch.Generator(device="cuda").manual_seed(11))
    tail = range(n - 8, n)
    want = torch.tensor([vae_ext._C._philox_normal_scalar(s, o, e) for e in tail])  # host float math
    got = eps[-8:].cpu()
    torch.testing.assert_close(got.float(), want, rtol=8e-3, atol=1e-3)  # a wrong index: unrelated values
    assert torch.equal(z[-8:].cpu(), got)
    z.backward(torch.ones_like(z))
    del z
    assert torch.equal(lv.grad[-8:].cpu(), (0.5 * got.float()).to(BF16))
    assert torch.equal(mu.grad[-8:].cpu(), torch.ones(8, dtype=BF16))


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_capture_draws_fresh_samples():
    mu, lv = standard(4096, F32, "cuda")
    graph, z = capture_cuda_graph(lambda: vae_ext.reparameterize(mu, lv), warmups=2)
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append(z.clone().cpu())
    for d in draws:
        assert torch.isfinite(d).all() and abs(d.std().item() - 1) < 0.1
    assert (draws[0] != draws[1]).float().mean() > 0.99, "graph replay reuses the captured eps"
    assert (draws[1] != draws[2]).float().mean() > 0.99


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_capture_of_forward_and_backward():
    """reparameterize + backward in one graph: each replay draws anew and its gradients match that draw."""
    mu, lv = (t.requires_grad_() for t in standard(4096, F32, "cuda"))
    grad_z = torch.randn(4096, device="cuda")

    def step():
        mu.grad = lv.grad = None
        z = vae_ext.reparameterize(mu, lv)
        z.backward(grad_z)
        return z

    graph, z = capture_cuda_graph(step, warmups=2)
    previous = None
    for _ in range(2):
        lv.grad.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(mu.grad, grad_z)
        want = 0.5 * grad_z * (z - mu).detach()  # d z / d logvar = 0.5 * sigma * eps = 0.5 * (z - mu)
        assert_close(lv.grad, want, rtol=1e-5, atol=1e-6, what="grad logvar from a graph replay")
        if previous is not None:
            assert (z != previous).float().mean() > 0.99, "graph replay reuses the captured eps"
        previous = z.detach().clone()


def test_philox4x32_10_known_answers():
    """Random123's known-answer vectors for Philox4x32-10 (the scalar code the CUDA kernels run)."""
    assert vae_ext._C._philox4x32_10(0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    ones = 0xFFFFFFFFFFFFFFFF
    assert vae_ext._C._philox4x32_10(ones, ones, ones) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    # key (a4093822, 299f31d0), counter (243f6a88, 85a308d3, 13198a2e, 03707344): the digits of pi
    got = vae_ext._C._philox4x32_10(0x299F31D0A4093822, 0x85A308D3243F6A88, 0x0370734413198A2E)
    assert got == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_cpu_vector_normals_match_the_scalar_definition(capability, tmp_path):
    """The CPU kernels' SIMD Philox + Box-Muller give, element by element, the numbers of the scalar
    philox_normal_at that the CUDA kernels run, to within 4 ulps (csrc/cpu/normals.h: the same
    polynomials, but the vector log and FMA contraction differ; at most 3 ulps measured, about 14% of
    draws differ on AVX2/AVX-512). Not bitwise: bitwise is promised across thread counts
    (tests/test_thread_counts.py)."""
    import os
    import subprocess
    import sys
    # ATen takes ATEN_CPU_CAPABILITY at its word: a capability the CPU lacks dies of SIGILL.
    supported = {"avx2": getattr(torch.cpu, "_is_avx2_supported", lambda: True),
                 "avx512": getattr(torch.cpu, "_is_avx512_supported", lambda: True)}
    if capability in supported and not supported[capability]():
        pytest.skip(f"this CPU has no {capability.upper()}")
    script = (
        "import numpy as np, torch, vae_ext\n"
        "e = torch.ops.vae_ext.philox_normal(torch.empty(70001), 987654321987, 40).numpy()\n"
        "idx = list(range(70001))\n"
        "s = np.array([vae_ext._C._philox_normal_scalar(987654321987, 40, i) for i in idx], dtype=np.float32)\n"
        "d = np.abs(e[idx].astype(np.float64) - s)\n"
        "ulps = d / np.spacing(np.abs(s)).astype(np.float64)\n"
        "assert ulps.max() <= 4, ulps.max()\n"
        "print(vae_ext.cpu_capability())\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    repo_parent = os.path.dirname(os.path.dirname(os.path.abspath(vae_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_parent, env.get("PYTHONPATH")) if p)
    # cwd outside the checkout: `python -c` puts it first on sys.path
    p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]


@pytest.mark.parametrize("op", ["reparameterize_backward", "gaussian_latent_backward"])
def test_backward_ops_skip_the_boxed_autograd_fallback(op):
    """The backward ops, called by backward nodes, pass the Autograd key through (no boxed fallback
    per call, csrc/autograd.cpp); their outputs take no history: a caller in grad mode gets plain
    tensors, not a graph that would differentiate them wrongly."""
    name = f"vae_ext::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Autograd")
    if op == "reparameterize_backward":
        _, _, state = torch.ops.vae_ext.reparameterize(torch.zeros(4, 3), torch.zeros(4, 3), 0, False, None)
        g = torch.randn(4, 3, requires_grad=True)
        outs = torch.ops.vae_ext.reparameterize_backward(g, torch.zeros(4, 3, requires_grad=True), state, 0)
        assert not any(o.requires_grad for o in outs)


def test_backward_op_grad_mu_flag():
    """reparameterize_backward(grad_mu=False) skips d/dmu (the identity without samples) and gives the
    same d/dlogvar; the op passes opcheck both ways."""
    mu, lv = torch.randn(7, 5), torch.randn(7, 5)
    z, eps, state = torch.ops.vae_ext.reparameterize(mu, lv, 3, True, None)
    g = torch.randn_like(z)
    gm, gl = torch.ops.vae_ext.reparameterize_backward(g, lv, state, 3)
    gm0, gl0 = torch.ops.vae_ext.reparameterize_backward(g, lv, state, 3, False)
    assert gm0.numel() == 0 and torch.equal(gl, gl0)
    torch.testing.assert_close(gm, g.sum(0))
    for flag in (True, False):
        torch.library.opcheck(torch.ops.vae_ext.reparameterize_backward.default, (g, lv, state, 3, flag))
