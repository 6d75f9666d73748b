"""Property-based tests (hypothesis): every op and option against vae_ext.reference in float64.

Each example draws a shape (0, 1, primes, sizes around the CPU kernels' kChunk = 2048 and the vector
widths 8/16/32, rows of more than one chunk), a layout per tensor (contiguous, transposed, sliced
with steps, expanded, channels_last), a dtype, the op's options, a random grad_output, and values
that reach the edges: a bulk drawn from a seeded torch generator in one of a few distributions,
plus a handful of edge values (0 and 1 and their neighbours, subnormals, logits to +-1e4, logvar
to +-100, +-inf, NaN) placed at drawn positions, among them a row's last element (a vector tail).

How results are judged, element by element, against the reference evaluated in float64:
  - where the reference is NaN, the op must give NaN (NaN in gives NaN out);
  - where the reference rounded to the result's dtype is +-inf, the op must give that infinity;
  - where it is finite, the op must agree within an error bound: the dtype's tolerance (as
    tests/helpers.py's TOLS) times |reference| plus the same tolerance times the magnitude of the
    terms that cancel in the formula (mu^2 + exp(logvar) + 1 + |logvar| for the KL, |r| + |x| for
    a difference), so a cancellation the float32 arithmetic cannot avoid is not taken for a bug;
  - an infinity is also accepted where the error bound reaches past the dtype's largest number, or
    where plain PyTorch in the same precision (the reference run in the input dtype, which computes
    half types in float32) overflows too: the fused gradients are computed in the forward at
    grad_output 1 and stored in the gradient's dtype, as PyTorch's own float32 arithmetic overflows.
Bad input (a "bce" probability or target outside [0, 1]) must raise ValueError naming it.

Profiles (environment variable VAE_EXT_HYPOTHESIS):
  - unset or "ci": derandomized (the same examples every run), a few hundred examples per op;
  - "long": random, 20x the examples, for a maintainer to run by hand now and then:
        VAE_EXT_HYPOTHESIS=long pytest tests/test_properties.py
    A failure prints the shrunk example; it then becomes a plain regression test.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vae_ext
from vae_ext import reference

from helpers import BF16, DTYPES, F16, F32, F64, HALF, RECON_MODES, REDUCTIONS, TOLS, arg_re, out_dtype

_PROFILE = os.environ.get("VAE_EXT_HYPOTHESIS", "ci")
if _PROFILE not in ("ci", "long"):
    raise ValueError(f"VAE_EXT_HYPOTHESIS: expected 'ci' or 'long', got {_PROFILE!r}")


def profile(examples: int):
    """The settings of one test: `examples` in CI (derandomized: the same every run), 20x in "long"."""
    long = _PROFILE == "long"
    return settings(
        max_examples=examples * 20 if long else examples,
        derandomize=not long,
        deadline=None,  # no timing in tests
        database=None,  # nothing written into the tree; a failure prints its example
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# --------------------------------------------------------------------------- sizes and values
# Sizes of a row: the small ones, primes, the vector widths and their neighbours, kChunk = 2048 and
# its neighbours, and rows of two and three chunks (a partial last chunk).
ROW_SIZES = [1, 2, 3, 5, 7, 8, 9, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 257, 1021, 2039, 2047, 2048,
             2049, 4093, 4096, 4099, 6151]
BATCH_SIZES = [1, 2, 3, 5, 7, 8, 17]
MAX_ELEMENTS = 20000  # per tensor: keeps an example cheap


def sub_min(dtype) -> float:
    """The smallest positive (subnormal) number of dtype."""
    fi = torch.finfo(dtype)
    return fi.smallest_normal * fi.eps


def below_one(dtype) -> float:
    """The largest number of dtype below 1."""
    return 1.0 - torch.finfo(dtype).eps / 2


def edge_values(role: str, mode: str, dtype) -> list:
    """The values worth placing in a tensor: the function's edges, the dtype's, and non-finite.
    `sq` and `lx` bring a term near the largest float of the loss's dtype (a square, an exp), so
    that a few of them overflow the sum though each term is finite."""
    s, b1, inf, nan = sub_min(dtype), below_one(dtype), math.inf, math.nan
    big = torch.finfo(out_dtype(dtype)).max
    sq = float(torch.tensor(0.7 * math.sqrt(big), dtype=F64).to(dtype))  # may round to inf: fine
    lx = float(torch.tensor(math.log(0.7 * big), dtype=F64).to(dtype))
    if role == "recon_x":
        if mode == "bce":
            return [0.0, 1.0, s, torch.finfo(dtype).smallest_normal, b1, 1.0 - b1, 0.5, nan]
        if mode == "bce_logits":
            return [0.0, 1e4, -1e4, inf, -inf, nan, s, -s, 88.0, -88.0, 17.0, -17.0]
        return [0.0, inf, -inf, nan, s, -s, 1e4, -1e4, sq, -sq]
    if role == "x":
        if mode == "bce":
            return [0.0, 1.0, s, b1, 1.0 - b1, 0.5, nan]
        if mode == "bce_logits":
            return [0.0, 1.0, nan, inf, -inf, -0.5, 1.5, s]
        return [0.0, inf, -inf, nan, s, -s, 1e4, -sq]
    if role == "mu":
        return [0.0, -0.0, s, -s, inf, -inf, nan, 1e4, -1e4, sq]
    if role == "logvar":
        return [0.0, 100.0, -100.0, 88.7, 89.0, 22.0, inf, -inf, nan, s, -s, lx]
    raise ValueError(role)


def bulk(kind: str, shape, gen, dtype) -> torch.Tensor:
    """Values of one distribution, drawn in float64 and rounded to dtype (a half tensor is then
    exactly its float64 copy)."""
    if kind == "prob":
        v = torch.rand(shape, generator=gen, dtype=F64)
    elif kind == "prob_tiny":  # log-uniform down past float32's subnormals, and the same next to 1
        t = 10 ** (-torch.rand(shape, generator=gen, dtype=F64) * 46)
        v = torch.where(torch.rand(shape, generator=gen, dtype=F64) < 0.5, t, 1 - t)
    elif kind == "binary":
        v = (torch.rand(shape, generator=gen, dtype=F64) < 0.5).to(F64)
    elif kind == "normal":
        v = torch.randn(shape, generator=gen, dtype=F64)
    elif kind == "wide":  # signs and magnitudes from 1e-4 to 1e4
        v = torch.randn(shape, generator=gen, dtype=F64).sign() * 10 ** (torch.rand(shape, generator=gen,
                                                                                   dtype=F64) * 8 - 4)
    elif kind == "logvar":
        v = torch.rand(shape, generator=gen, dtype=F64) * 200 - 100
    elif kind == "logvar_usual":
        v = torch.randn(shape, generator=gen, dtype=F64) * 0.7
    else:
        raise ValueError(kind)
    return v.to(dtype)


BULK_KINDS = {
    ("recon_x", "bce"): ["prob", "prob_tiny", "binary"],
    ("recon_x", "bce_logits"): ["normal", "wide"],
    ("recon_x", "mse"): ["normal", "wide"],
    ("x", "bce"): ["prob", "binary", "prob_tiny"],
    ("x", "bce_logits"): ["prob", "binary", "normal"],
    ("x", "mse"): ["normal", "wide"],
    ("mu", None): ["normal", "wide"],
    ("logvar", None): ["logvar_usual", "logvar"],
}


@st.composite
def values_for(draw, role, mode, shape, dtype, seed):
    """A tensor of `shape` and dtype: a bulk, then up to four edge values at drawn places (the
    first element, the last, the last of a row, anywhere), each once or in a run of a few."""
    kind = draw(st.sampled_from(BULK_KINDS[(role, mode if role in ("recon_x", "x") else None)]))
    v = bulk(kind, shape, torch.Generator().manual_seed(seed), dtype)
    numel = v.numel()
    if numel:
        flat = v.view(-1)
        row = numel // shape[0] if shape[0] else numel
        for _ in range(draw(st.integers(0, 4))):
            where = draw(st.sampled_from(["first", "last", "row_end", "any"]))
            i = {"first": 0, "last": numel - 1}.get(where)
            if where == "row_end":
                i = draw(st.integers(0, shape[0] - 1)) * row + row - 1
            elif where == "any":
                i = draw(st.integers(0, numel - 1))
            run = draw(st.sampled_from([1, 1, 1, 3, 9]))
            flat[i:i + run] = draw(st.sampled_from(edge_values(role, mode, dtype)))
    return v


# --------------------------------------------------------------------------- layouts
LAYOUTS_2D = ["contiguous", "transposed", "sliced", "expanded"]


def laid_out(v: torch.Tensor, layout: str):
    """(leaf, make): `leaf` holds the values, `make(leaf)` is the op's input in the layout.

    The input has v's values, except "expanded", whose leaf is v's first sample (shape (1, ...))
    broadcast over the batch: the gradient then accumulates into the leaf."""
    if layout == "contiguous":
        return v.clone(), lambda t: t
    if layout == "transposed":  # every dimension reversed in memory
        rev = list(range(v.dim()))[::-1]
        return v.permute(rev).contiguous().permute(rev), lambda t: t
    if layout == "sliced":  # every other sample, every third element of the last dimension
        big = list(v.shape)
        big[0] *= 2
        big[-1] = 3 * big[-1] + 1
        buf = torch.full(big, math.nan, dtype=v.dtype)  # a stray read would show as a NaN
        index = (slice(None, None, 2),) + (slice(None),) * (v.dim() - 2) + (slice(1, None, 3),)
        buf[index] = v
        return buf[index], lambda t: t
    if layout == "expanded":
        shape = v.shape
        return v[:1].clone(), lambda t: t.expand(shape)
    if layout == "channels_last":
        fmt = torch.channels_last if v.dim() == 4 else torch.channels_last_3d
        return v.contiguous(memory_format=fmt), lambda t: t
    raise ValueError(layout)


def leaf_like(leaf: torch.Tensor, dtype) -> torch.Tensor:
    """leaf in another dtype with the same strides (a fresh leaf that requires grad)."""
    out = torch.empty_strided(leaf.shape, leaf.stride(), dtype=dtype)
    out.copy_(leaf)
    return out.requires_grad_(True)


def to_leaf_shape(full: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A per-element quantity of the input, summed over the batch when the leaf was expanded."""
    return full.sum(0, keepdim=True) if full.shape != leaf.shape else full


# --------------------------------------------------------------------------- the judgement
def check(what: str, got: torch.Tensor, ref: torch.Tensor, native: torch.Tensor, bound: torch.Tensor, dtype,
          nan_in=None, may_overflow=None, may_nan=None):
    """Element by element, as the module docstring says. got: the op's result; ref: the float64
    reference; native: the reference in the input's precision; bound: the allowed |got - ref|;
    nan_in: where an input is NaN (the result must be NaN there); may_overflow: where an infinity
    of the reference's sign is a documented limitation; may_nan: where NaN or any infinity is one
    (such an infinity times a scale that is 0 in the kernel's arithmetic; a sum of them)."""
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
    g = got.detach().double()
    r = ref.detach().double()
    nat = native.detach().double()
    b = torch.nan_to_num(bound.double(), nan=math.inf)
    assert r.shape == nat.shape == b.shape, "the test's own shapes disagree"
    expected = r.to(dtype).double()
    big = torch.finfo(dtype).max
    # NaN where the reference is NaN; an infinity is accepted there when no input is NaN, as the limit
    # (bce_logits of logit -inf and target 0.3 is +inf; PyTorch's formula gives inf - inf = NaN)
    nan_in = torch.zeros_like(r, dtype=torch.bool) if nan_in is None else nan_in
    ok_nan = torch.isnan(r) & (torch.isnan(g) | (torch.isinf(g) & ~nan_in))
    ok_inf = torch.isinf(expected) & (g == expected)
    # (also where the reference rounds to +-inf in the dtype but the result, within the bound of it,
    # stays finite: 65525 in float16 is inf, the op's 65504 is 21 off)
    within = torch.isfinite(g) & ((g - r).abs() <= b)
    window = torch.isfinite(expected) & torch.isinf(g) & (r.abs() + b >= big) & ((g > 0) == (r > 0))
    as_pytorch = ~torch.isfinite(g) & ~torch.isfinite(nat)
    # The reference overflows in an intermediate: its KL sums mu^2 over the sample before halving (a
    # sum up to twice the result), so a result within a factor 4 of the largest float may be +-inf
    # there and finite here, which is the true value.
    beyond = torch.isinf(r) & torch.isfinite(g) & (g.abs() >= big / 4) & ((g > 0) == (r > 0))
    if may_overflow is not None:
        as_pytorch |= may_overflow & torch.isinf(g) & ((g > 0) == (r > 0))
        # docs/api.md: that +-inf times a zero scale (or a scale that rounds to 0 in the kernel's
        # arithmetic: beta = 1e-195 in float32, where the reference's gradient is 1e-136)
        as_pytorch |= may_overflow & torch.isnan(g) & (expected == 0)
    if may_nan is not None:
        as_pytorch |= may_nan & ~torch.isfinite(g)
    ok = ok_nan | (~torch.isnan(r) & (ok_inf | within | window | as_pytorch | beyond))
    ok &= ~nan_in | torch.isnan(g)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].tolist()
        lines = [f"  at {tuple(i)}: got {g[tuple(i)].item()!r}, float64 reference {r[tuple(i)].item()!r}, "
                 f"bound {b[tuple(i)].item():.3g}, reference in {native.dtype}: {nat[tuple(i)].item()!r}"
                 for i in bad]
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} elements wrong:\n" + "\n".join(lines))


def abs_floor(dtype) -> float:
    """An absolute error allowed everywhere: a few of the dtype's smallest subnormals."""
    return 4 * sub_min(dtype)


# --------------------------------------------------------------------------- elbo_loss
def reduce_(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"sum": lambda t: t.sum(), "mean": lambda t: t.mean(), "none": lambda t: t}[reduction](per_sample)


def combine(outs, return_terms: bool, ups):
    """The scalar that is differentiated: sum(grad_output * output), over the three outputs with
    return_terms."""
    if not return_terms:
        return (outs * ups[0]).sum()
    return sum((o * u).sum() for o, u in zip(outs, ups))


def elbo_magnitudes(r, x, mu, lv, mode):
    """Per element, in float64: the size of the terms that cancel in the loss and in each gradient,
    and an absolute error of the float64 reference's recon gradient: autograd rounds grad_output *
    (p - x) before the division by max(p (1 - p), 1e-12), which scales a subnormal's rounding by 1e12."""
    r, x, mu, lv = (t.detach().double() for t in (r, x, mu, lv))
    if mode == "bce":  # a sum of non-negative terms: the loss itself
        rec_elem = F.binary_cross_entropy(r.nan_to_num(0.5).clamp(0, 1), x.nan_to_num(0.5).clamp(0, 1),
                                          reduction="none")
        g_rec = (r.abs() + x.abs()) / ((1 - r) * r).clamp_min(1e-12)
    elif mode == "bce_logits":
        rec_elem = r.clamp_min(0) + (r * x).abs() + torch.log1p(torch.exp(-r.abs()))
        g_rec = 1 + x.abs()
    else:
        rec_elem = (r.abs() + x.abs()) ** 2
        g_rec = 2 * (r.abs() + x.abs())
    rec = rec_elem.flatten(1).sum(1)
    ref_abs = 2 * sub_min(F64) / ((1 - r) * r).clamp_min(1e-12) if mode == "bce" else torch.zeros_like(r)
    e = torch.exp(lv)
    kl = (0.5 * (mu * mu + e + 1 + lv.abs())).sum(1)
    return rec, kl, g_rec, mu.abs(), 0.5 * (e + 1), ref_abs


def run_elbo(fn, inputs, makes, dtype, mode, reduction, beta, return_terms, ups):
    """fn on leaves in dtype (same strides as `inputs`), NaN-aware for "bce": outputs and the
    gradients of recon_x, mu, logvar (None where a leaf does not require grad)."""
    r0, x0, mu0, lv0 = inputs
    nan_mask = None
    if fn is reference.elbo_loss and mode == "bce":
        # F.binary_cross_entropy refuses NaN; the op gives NaN where a probability or target is NaN.
        # The reference runs on 0.5 there, and the results are then set to NaN where NaN belongs.
        full_r, full_x = makes[0](r0), makes[1](x0)
        nan_mask = torch.isnan(full_r) | torch.isnan(full_x)
        if nan_mask.any():
            r0 = r0.masked_fill(torch.isnan(r0), 0.5)
            x0 = x0.masked_fill(torch.isnan(x0), 0.5)
        else:
            nan_mask = None
    r, mu, lv = (leaf_like(t, dtype) for t in (r0, mu0, lv0))
    x = leaf_like(x0, dtype).detach()
    outs = fn(makes[0](r), makes[1](x), makes[2](mu), makes[3](lv), recon=mode, reduction=reduction, beta=beta,
              return_terms=return_terms)
    target = combine(outs, return_terms, [u.to(dtype if dtype not in HALF else F32) for u in ups])
    target.backward()
    outs = tuple(o.detach() for o in outs) if return_terms else (outs.detach(),)
    grads = [r.grad, mu.grad, lv.grad]
    if nan_mask is not None:
        rows = nan_mask.reshape(nan_mask.shape[0], -1).any(1)
        fixed = []
        for k, o in enumerate(outs):
            is_kl = return_terms and k == 2
            if is_kl:
                fixed.append(o)
            elif reduction == "none":
                fixed.append(o.masked_fill(rows, math.nan))
            else:
                fixed.append(torch.full_like(o, math.nan) if rows.any() else o)
        outs = tuple(fixed)
        nan_leaf = to_leaf_shape(nan_mask.to(F64), r) > 0
        grads[0] = grads[0].masked_fill(nan_leaf, math.nan)
    return outs, grads


def draw_upstream(draw, reduction, n):
    """A random grad_output: 1, or of either sign and a magnitude from 1e-3 to 1e3 (per sample
    for reduction="none")."""
    scale = draw(st.sampled_from([1.0, 0.37, 2.5, 1e-3, 1e3]))
    sign = draw(st.sampled_from([1.0, -1.0]))
    if reduction != "none":
        return torch.tensor(scale * sign, dtype=F64)
    seed = draw(st.integers(0, 2**31 - 1))
    w = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.5 + 0.5
    return w * scale * sign


@st.composite
def elbo_case(draw, n_min=1):
    dtype = draw(st.sampled_from(DTYPES))
    mode = draw(st.sampled_from(RECON_MODES))
    reduction = draw(st.sampled_from(REDUCTIONS))
    beta = draw(st.sampled_from([1.0, 0.0, 0.5, 4.0]) | st.floats(0.0, 10.0))
    # beta as the loss dtype's arithmetic takes it (float32's, also PyTorch's): 5.6e-67 is 0 there
    beta = float(torch.tensor(beta, dtype=F64).to(out_dtype(dtype)))
    return_terms = draw(st.booleans())
    n = draw(st.sampled_from(BATCH_SIZES)) if n_min > 0 else 0
    four_d = draw(st.booleans())
    if four_d:  # (n, c, h, w): a conv decoder's output, which may be channels_last
        c, h, w = draw(st.sampled_from([1, 3, 4])), draw(st.integers(1, 23)), draw(st.integers(1, 23))
        rshape = (n, c, h, w)
    else:
        rshape = (n, draw(st.sampled_from(ROW_SIZES + [0])))
    if n * math.prod(rshape[1:]) > MAX_ELEMENTS:  # fewer samples of that size
        n = MAX_ELEMENTS // math.prod(rshape[1:])
        rshape = (n,) + rshape[1:]
    lat = draw(st.sampled_from([0, 1, 2, 7, 8, 16, 17, 33, 2049]))
    seed = draw(st.integers(0, 2**31 - 1))
    vals = [draw(values_for(role, mode, shape, dtype, seed + k))
            for k, (role, shape) in enumerate((("recon_x", rshape), ("x", rshape), ("mu", (n, lat)),
                                                ("logvar", (n, lat))))]
    layouts = LAYOUTS_2D + (["channels_last"] if four_d else [])
    pairs = [laid_out(v, draw(st.sampled_from(layouts if k < 2 else LAYOUTS_2D)) if n > 0 else "contiguous")
             for k, v in enumerate(vals)]
    ups = [draw_upstream(draw, reduction, n) for _ in range(3 if return_terms else 1)]
    return dict(dtype=dtype, mode=mode, reduction=reduction, beta=float(beta), return_terms=return_terms,
                leaves=[p[0] for p in pairs], makes=[p[1] for p in pairs], ups=ups)


def check_elbo(case):
    dtype, mode, reduction, beta, return_terms = (case[k] for k in ("dtype", "mode", "reduction", "beta",
                                                                     "return_terms"))
    leaves, makes, ups = case["leaves"], case["makes"], case["ups"]
    kw = dict(mode=mode, reduction=reduction, beta=beta, return_terms=return_terms, ups=ups)
    got, got_grads = run_elbo(vae_ext.elbo_loss, leaves, makes, dtype, **kw)
    ref, ref_grads = run_elbo(reference.elbo_loss, leaves, makes, F64, **kw)
    nat, nat_grads = run_elbo(reference.elbo_loss, leaves, makes, dtype, **kw)

    # error bounds from the magnitudes of the terms, reduced and weighted as the outputs are
    full = [m(t.double()) for m, t in zip(makes, leaves)]
    m_rec, m_kl, g_rec, g_mu, g_lv, ref_abs = elbo_magnitudes(*full, mode)
    tol = TOLS[dtype]
    odt = out_dtype(dtype)
    n = full[0].shape[0]
    # the float64 reference's own error, absolute: PyTorch's bce_logits formula adds and cancels
    # terms of |logit|'s size (at logit -88, target 0: 0, where the op gives the loss, 6.05e-39)
    ref_err = 0.0
    if mode == "bce_logits":
        r64, x64 = full[0].double(), full[1].double()
        ref_err = 4 * 2.0**-53 * (r64.abs() + (r64 * x64).abs() + 1).flatten(1).sum(1)
    ref_errs = [reduce_(ref_err, reduction) if mode == "bce_logits" else 0.0] * 2 + [0.0]
    bounds = [reduce_(m_rec + beta * m_kl, reduction), reduce_(m_rec, reduction), reduce_(m_kl, reduction)]
    names = ["loss", "rec", "kl"] if return_terms else ["loss"]
    nan_r, nan_x, nan_mu, nan_lv = (torch.isnan(t) for t in full)
    rows_rec = (nan_r | nan_x).flatten(1).any(1)
    rows_kl = (nan_mu | nan_lv).any(1)
    nan_rows = [rows_rec | rows_kl, rows_rec, rows_kl]
    for name, o, r, nt, b, e, rows in zip(names, got, ref, nat, bounds, ref_errs, nan_rows):
        nan_in = rows if reduction == "none" else rows.any()
        check(name, o, r, nt, tol.loss * b + e + abs_floor(odt), odt, nan_in)

    # each sample's weight in the differentiated scalar: |grad_output|, 1/n for mean, beta for KL
    s = torch.zeros(n, dtype=F64, requires_grad=True)
    k = torch.zeros(n, dtype=F64, requires_grad=True)
    rec_r, kl_r = reduce_(s, reduction), reduce_(k, reduction)
    outs = (rec_r + beta * kl_r, rec_r, kl_r) if return_terms else rec_r + beta * kl_r
    combine(outs, return_terms, [u.abs() for u in ups]).backward()
    w_rec, w_kl = s.grad, k.grad
    per_elem = [(g_rec, w_rec, ref_abs), (g_mu, w_kl, 0 * g_mu), (g_lv, w_kl, 0 * g_lv)]
    nan_elems = [nan_r | nan_x, nan_mu, nan_lv]
    grad_leaves = (leaves[0], leaves[2], leaves[3])
    for name, leaf, g, rg, ng, (mag, w, extra), nan_e in zip(("recon_x", "mu", "logvar"), grad_leaves, got_grads,
                                                       ref_grads, nat_grads, per_elem, nan_elems):
        assert g is not None, f"grad {name}: None"
        wfull = w.view(-1, *([1] * (mag.dim() - 1)))
        cancel = to_leaf_shape(mag * wfull, leaf)
        up_max = max(1.0, max(u.abs().max().item() for u in ups)) if n else 1.0
        extra = to_leaf_shape(extra * wfull, leaf)
        if name != "recon_x":
            # the scale beta * grad_output, rounded in the kernel's arithmetic: subnormal there for
            # beta = 1.4e-45 in float32 (2.74e-45 is 2.8e-45), off by half its smallest subnormal
            extra = extra + to_leaf_shape(mag * sub_min(F64 if dtype == F64 else F32), leaf)
        # tol.grad on the cancelling terms too: an expanded leaf's gradient is a sum in the dtype.
        # The latent gradients are stored (after the mean's 1/N) before beta scales them: a
        # subnormal's rounding there is multiplied by beta (mu = 1.4e-45 at N = 2 stores 0; times
        # beta = 9 that is 6.3e-45 off)
        floor = abs_floor(dtype) * up_max * (max(1.0, beta) if name != "recon_x" else 1.0)
        floor = to_leaf_shape(torch.full_like(mag, floor), leaf)  # an expanded leaf: one per sample summed
        bound = tol.grad * (rg.abs() + cancel) + floor + extra
        # (the recon_x gradient is stored in float32 for half inputs until grad_output scales it: a
        # local "bce" gradient, at most 1e12, is never beyond its range)
        check(f"grad {name}", g, rg, ng, bound, dtype, to_leaf_shape(nan_e.to(F64), leaf) > 0)


@profile(400)
@given(elbo_case())
def test_elbo_loss_matches_reference(case):
    check_elbo(case)


@profile(60)
@given(elbo_case(n_min=0))
def test_elbo_loss_empty_batch_matches_reference(case):
    """N = 0: sum 0, mean NaN (as Tensor.mean()), none an empty vector; empty gradients."""
    check_elbo(case)


OUTSIDE_0_1 = [-math.inf, -1.0, -0.1, "-subnormal", 1.0 + 2**-7, 1.5, 2.0, math.inf]


@st.composite
def bce_out_of_range(draw, target):
    """A valid "bce" call, then one value outside [0, 1] in recon_x (or x) at a drawn place."""
    dtype = draw(st.sampled_from(DTYPES))
    n, d = draw(st.sampled_from(BATCH_SIZES)), draw(st.sampled_from(ROW_SIZES[:20]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    r = torch.rand(n, d, generator=g, dtype=F64).to(dtype)
    x = torch.rand(n, d, generator=g, dtype=F64).to(dtype)
    bad = x if target else r
    i, j = draw(st.integers(0, n - 1)), draw(st.sampled_from([0, d - 1, draw(st.integers(0, d - 1))]))
    value = draw(st.sampled_from(OUTSIDE_0_1))
    bad[i, j] = -sub_min(dtype) if value == "-subnormal" else value
    assert not (0 <= bad[i, j].item() <= 1)
    leaf_r, make_r = laid_out(r, draw(st.sampled_from(["contiguous", "transposed", "sliced"])))
    mu = torch.randn(n, 3, generator=g, dtype=F64).to(dtype)
    return dict(recon_x=make_r(leaf_r), x=x, mu=mu, logvar=mu.clone(),
                reduction=draw(st.sampled_from(REDUCTIONS)), validate=draw(st.booleans()),
                requires=draw(st.booleans()))


def assert_raises_naming(name, case):
    r = case["recon_x"].detach().requires_grad_(case["requires"])
    with pytest.raises(ValueError, match=arg_re(name)):
        vae_ext.elbo_loss(r, case["x"], case["mu"], case["logvar"], recon="bce", reduction=case["reduction"],
                          validate=case["validate"])


@profile(100)
@given(bce_out_of_range(target=False))
def test_bce_probability_outside_0_1_raises(case):
    assert_raises_naming("recon_x", case)


@profile(100)
@given(bce_out_of_range(target=True))
def test_bce_target_outside_0_1_raises(case):
    """As F.binary_cross_entropy refuses such targets."""
    assert_raises_naming("x", case)


# --------------------------------------------------------------------------- reparameterize
@st.composite
def reparam_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    k = draw(st.sampled_from([None, 1, 2, 3, 5]))
    rank = draw(st.sampled_from([1, 2, 4]))
    if rank == 1:
        shape = (draw(st.sampled_from(ROW_SIZES + [0])),)
    elif rank == 2:
        shape = (draw(st.sampled_from(BATCH_SIZES + [0])), draw(st.sampled_from(ROW_SIZES)))
    else:
        shape = (draw(st.sampled_from(BATCH_SIZES)), draw(st.sampled_from([1, 3, 4])), draw(st.integers(1, 19)),
                 draw(st.integers(1, 19)))
    while math.prod(shape) * (k or 1) > MAX_ELEMENTS:
        shape = (shape[0] // 2,) + shape[1:] if len(shape) > 1 and shape[0] > 1 else shape[:-1] + (shape[-1] // 2,)
    seed = draw(st.integers(0, 2**31 - 1))
    mu = draw(values_for("mu", None, shape, dtype, seed))
    lv = draw(values_for("logvar", None, shape, dtype, seed + 1))
    layouts = ["contiguous"] if rank == 1 or math.prod(shape) == 0 else (
        LAYOUTS_2D + (["channels_last"] if rank == 4 else []))
    mu_pair = laid_out(mu, draw(st.sampled_from(layouts)))
    lv_pair = laid_out(lv, draw(st.sampled_from(layouts)))
    out_shape = shape if k is None else (k, *shape)
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    up = (torch.randn(out_shape, generator=torch.Generator().manual_seed(seed + 2), dtype=F64) * scale).to(dtype)
    return dict(dtype=dtype, k=k, mu=mu_pair, lv=lv_pair, up=up, gen_seed=draw(st.integers(0, 2**63 - 1)))


def draw_reparam(case, dtype):
    """vae_ext.reparameterize on leaves in dtype with the case's layouts and generator seed."""
    (mu0, make_mu), (lv0, make_lv) = case["mu"], case["lv"]
    mu, lv = leaf_like(mu0, dtype), leaf_like(lv0, dtype)
    gen = torch.Generator().manual_seed(case["gen_seed"])
    z, eps = vae_ext.reparameterize(make_mu(mu), make_lv(lv), num_samples=case["k"], generator=gen,
                                    return_eps=True)
    return mu, lv, z, eps


@profile(400)
@given(reparam_case())
def test_reparameterize_matches_reference(case):
    """z against reference.reparameterize_with_eps in float64 on the eps the op returned (for half
    types the float32 draw rounded: z and the backward use that rounded eps); the gradients against
    the formula: grad mu = sum_k g, grad logvar = exp(logvar / 2) / 2 * sum_k g * eps (autograd's sum
    of per-sample terms would turn inf * (mixed signs) into NaN)."""
    dtype, k, up = case["dtype"], case["k"], case["up"]
    mu, lv, z, eps = draw_reparam(case, dtype)
    shape = case["mu"][1](mu).shape
    out_shape = shape if k is None else (k, *shape)
    assert z.shape == eps.shape == out_shape, f"z {tuple(z.shape)}, eps {tuple(eps.shape)}, expected {out_shape}"
    assert z.dtype == eps.dtype == dtype and not eps.requires_grad
    (z * up).sum().backward()

    # eps: Box-Muller in float32 whatever the dtype, rounded to it; finite
    *_, eps32 = draw_reparam(case, F32) if dtype != F32 else (None, None, None, eps)
    assert torch.equal(eps, eps32.to(dtype)), "eps is not the float32 draw rounded to the dtype"
    assert torch.isfinite(eps32).all(), "eps not finite"

    m64 = case["mu"][1](case["mu"][0].double())
    l64 = case["lv"][1](case["lv"][0].double())
    e64, u64 = eps.double(), up.double()
    cdt = F64 if dtype == F64 else F32  # the kernel's arithmetic
    tol, tol32 = TOLS[dtype], TOLS[cdt]
    zr = reference.reparameterize_with_eps(m64, l64, e64)
    zn = reference.reparameterize_with_eps(m64.to(cdt), l64.to(cdt), e64.to(cdt))
    sig_eps = (torch.exp(0.5 * l64) * e64).abs()
    check("z", z, zr, zn, tol.grad * zr.abs() + tol32.grad * (m64.abs() + sig_eps) + abs_floor(dtype), dtype)

    def sum_k(t):
        return t if k is None else t.sum(0)

    gm = sum_k(u64)
    glv = 0.5 * torch.exp(0.5 * l64) * sum_k(u64 * e64)
    glv_n = 0.5 * torch.exp(0.5 * l64.to(cdt)) * sum_k(u64.to(cdt) * e64.to(cdt))
    glv_mag = 0.5 * torch.exp(0.5 * l64) * sum_k((u64 * e64).abs())
    floor = abs_floor(dtype) * max(1.0, u64.abs().max().item() if u64.numel() else 1.0)
    for name, leaf, ref, nat, mag in (("grad mu", mu, gm, gm.to(cdt), sum_k(u64.abs())),
                                      ("grad logvar", lv, glv, glv_n, glv_mag)):
        # plain PyTorch: per-element gradients in the dtype, summed in it by an expanded leaf's backward
        nat = to_leaf_shape(nat.to(dtype), leaf)
        ref, mag = (to_leaf_shape(t, leaf) for t in (ref, mag))
        # mag >= |ref|; in the dtype's precision: an expanded leaf's gradient is a sum in the dtype
        check(name, leaf.grad, ref, nat, tol.grad * mag + floor, dtype)


@profile(100)
@given(st.sampled_from(DTYPES), st.sampled_from([torch.channels_last, torch.channels_last_3d]),
       st.lists(st.sampled_from([1, 2, 3, 5, 8]), min_size=5, max_size=5), st.integers(0, 2**31 - 1))
def test_reparameterize_keeps_mu_layout(dtype, fmt, sizes, seed):
    """z (and eps) come back in mu's memory layout, as torch.empty_like(mu) would be: a channels_last
    encoder output gives a channels_last z."""
    shape = tuple(sizes[:4] if fmt == torch.channels_last else sizes)
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    lv = torch.randn(shape, generator=g).to(dtype).contiguous(memory_format=fmt)
    z, eps = vae_ext.reparameterize(mu, lv, return_eps=True, generator=g)
    want = torch.empty_like(mu).stride()
    assert z.stride() == want and eps.stride() == want, f"z {z.stride()}, eps {eps.stride()}, mu {mu.stride()}"


# --------------------------------------------------------------------------- shrunk counterexamples
def test_float16_recon_gradient_finite_when_the_scaled_gradient_is():
    """Found by test_elbo_loss_matches_reference: "bce" at p = 1.0908e-05, x = 0.8477 has the gradient
    (p - x) / (p (1 - p)) = -77,700 at grad_output 1, past float16's 65,504, but with grad_output 0.37
    it is -28,753, which float16 holds (plain PyTorch, computing in float32, gives -28,752). It was
    +-inf while the recon gradient was stored in float16 before grad_output scaled it."""
    r = torch.tensor([[1.0908e-05]], dtype=F16, requires_grad=True)
    x = torch.tensor([[0.8477]], dtype=F16)
    empty = torch.empty(1, 0, dtype=F16)
    (vae_ext.elbo_loss(r, x, empty, empty, recon="bce") * 0.37).backward()
    rd = r.detach().double()
    ref = 0.37 * (rd - x.double()) / (rd * (1 - rd))
    assert torch.isfinite(r.grad).all(), f"grad recon_x {r.grad.item()}, expected {ref.item()}"
    assert abs(r.grad.double().item() - ref.item()) <= 2e-3 * abs(ref.item())


def test_float16_recon_gradient_times_zero_is_zero():
    """Found by the long profile: "bce" at p = 1, x = 0.0611 has the local gradient 0.94 / 1e-12,
    past float16's range; a loss whose terms cancel (loss - rec) scales it by 0, which plain PyTorch,
    computing in float32, turns into 0; a float16 +-inf stored for it gave NaN."""
    r = torch.tensor([[1.0]], dtype=F16, requires_grad=True)
    x = torch.tensor([[0.0611]], dtype=F16)
    empty = torch.empty(1, 0, dtype=F16)
    loss, rec, _ = vae_ext.elbo_loss(r, x, empty, empty, recon="bce", return_terms=True)
    (loss - rec).backward()
    assert r.grad.item() == 0.0, f"grad recon_x {r.grad.item()}, expected 0"


def test_float64_kl_near_the_largest_float_with_beta_0():
    """Found by the long profile: logvar 709.426 (exp = 1.1e308) twice, beta = 0: the KL is 1.1e308,
    finite, so the loss is 0; the reference halved its sum after overflowing to inf, and 0 * inf
    gave NaN. The reference now halves per element, and the two agree."""
    empty = torch.empty(1, 0, dtype=F64)
    mu = torch.tensor([[0.3923, -0.2236]], dtype=F64)
    lv = torch.full((1, 2), 709.426, dtype=F64)
    got = vae_ext.elbo_loss(empty, empty, mu, lv, beta=0.0)
    want = reference.elbo_loss(empty, empty, mu, lv, beta=0.0)
    assert got.item() == 0.0 and want.item() == 0.0, (got, want)


def test_float16_logvar_gradient_with_beta_0_is_0():
    """Found by test_elbo_loss_matches_reference: with beta = 0 the KL gradient is 0, also where
    0.5 (exp(logvar) - 1) overflows float16 (logvar = 28.4: 1.1e12); it was 0 * inf = NaN (plain
    PyTorch, computing in float32, gives 0)."""
    r = torch.full((1, 1), 0.5, dtype=F16)
    mu = torch.zeros(1, 1, dtype=F16, requires_grad=True)
    lv = torch.full((1, 1), 28.40625, dtype=F16, requires_grad=True)
    vae_ext.elbo_loss(r, r, mu, lv, beta=0.0).backward()
    assert lv.grad.item() == 0.0 and mu.grad.item() == 0.0, f"grad logvar {lv.grad.item()}, grad mu {mu.grad.item()}"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_whose_sum_overflows_float32_is_inf(dtype, reduction):
    """Found by test_elbo_loss_matches_reference: three KL terms of 1.2e38 each (logvar 88.4) are
    finite in float32 but their sum, 3.7e38, is not: the float32 loss is inf, as the float64
    reference rounded to float32 (it raised RuntimeError: value cannot be converted to type float
    without overflow)."""
    r = torch.full((1, 1), 0.5, dtype=dtype)
    mu = torch.zeros(1, 3, dtype=dtype)
    lv = torch.full((1, 3), 88.4, dtype=dtype)
    ref = reference.elbo_loss(r.double(), r.double(), mu.double(), lv.double(), reduction=reduction)
    assert math.isfinite(ref.item()) and math.isinf(ref.float().item())
    loss, rec, kl = vae_ext.elbo_loss(r, r, mu, lv, reduction=reduction, return_terms=True)
    assert loss.item() == math.inf and kl.item() == math.inf and math.isfinite(rec.item())
    assert vae_ext.elbo_loss(r, r, mu, lv, reduction=reduction).item() == math.inf
