"""vae_ext.gaussian_latent against vae_ext.reference.gaussian_latent in float64: z, the KL and every
gradient through both outputs at once (grad_output != 1 on each), for every dtype, scale, KL kind,
prior (none, per sample, broadcast), reduction and number of draws; odd, conv and empty shapes;
channel slices of NCHW and channels_last tensors read in place; free bits; z bitwise the z of
reparameterize at the same generator state; 1 and 2 threads bitwise; gradcheck.

The reference is given the fused op's eps: that of vae_ext.reparameterize(return_eps=True) at the
same generator state (the two draw the same numbers, which test_z_is_reparameterize_z checks).
"""
from __future__ import annotations

import math

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import BF16, DEVICES, DTYPES, F16, F32, F64, HALF, TOLS, assert_close, dtype_id, num_threads

SEED = 1234
SCALES = ("logvar", "logsigma")
KLS = ("analytic", "sample")
LAYOUTS = ("contiguous", "channels_last", "slice_nchw", "slice_nhwc")


def gen(seed=SEED, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def make(shape, dtype=F32, prior="same", layout="contiguous", device="cpu", seed=0):
    """(mu, logscale, prior_mu, prior_logscale), drawn in float64 then cast (a half input is exactly
    its float64 copy). prior: None, "same" (mu's shape) or "shared" (mu.shape[1:2] + 1s, e.g. (C, 1, 1)).
    layout "slice_*": mu, logscale = out.chunk(2, dim=1) of one (N, 2C, ...) tensor, NCHW or
    channels_last, and the prior's likewise: views with the channel stride of a real layer."""
    g = torch.Generator().manual_seed(seed)

    def pair(scale_ls):
        if layout.startswith("slice"):
            out = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g, dtype=F64)
            out[:, shape[1]:] = out[:, shape[1]:] * scale_ls - 0.3
            out = out.to(dtype).to(device)
            if layout == "slice_nhwc":
                out = out.contiguous(memory_format=torch.channels_last)
            return out.chunk(2, dim=1)
        a = torch.randn(shape, generator=g, dtype=F64)
        b = torch.randn(shape, generator=g, dtype=F64) * scale_ls - 0.3
        a, b = (t.to(dtype).to(device) for t in (a, b))
        if layout == "channels_last":
            a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
        return a, b

    mu, ls = pair(0.6)
    if prior is None:
        return mu, ls, None, None
    if prior == "same":
        pmu, pls = pair(0.4)
    else:
        pshape = (shape[1],) + (1,) * (len(shape) - 2)
        pmu = (torch.randn(pshape, generator=g, dtype=F64) * 0.5).to(dtype).to(device)
        pls = (torch.randn(pshape, generator=g, dtype=F64) * 0.4).to(dtype).to(device)
    return mu, ls, pmu, pls


def eps_for(mu, k, seed=SEED):
    """The eps gaussian_latent draws from gen(seed): reparameterize's at that generator state."""
    m = mu.detach()
    _, eps = vae_ext.reparameterize(m, m, num_samples=k, generator=gen(seed, m.device), return_eps=True)
    return eps


def weights(z_shape, kl_shape, seed=7):
    """grad_output != 1 for z and kl at once (a negative weight among them)."""
    g = torch.Generator().manual_seed(seed)
    wz = torch.randn(z_shape, generator=g, dtype=F64)
    wk = torch.rand(kl_shape, generator=g, dtype=F64) * 2 + 0.25 if kl_shape else torch.tensor(3.7, dtype=F64)
    if wk.dim() and wk.numel() > 1:
        wk.view(-1)[1] *= -1
    return wz, wk


def run(fn, inputs, wz, wk, **kw):
    """fn(*leaves, **kw) -> (z, kl); backward of sum(z wz) + sum(kl wk); (z, kl, grads of the leaves)."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in inputs]
    z, kl = fn(*leaves, **kw)
    loss = (z.double() * wz.to(z.device)).sum() + (kl.double() * wk.to(kl.device)).sum()
    loss.backward()
    return z.detach(), kl.detach(), [None if t is None else t.grad for t in leaves]


def fused(*t, seed=SEED, **kw):
    return vae_ext.gaussian_latent(*t, generator=gen(seed, t[0].device), **kw)


def check(inputs, *, dtype, num_samples=None, tol_kl=None, **kw):
    """The fused op against the float64 reference on the fused op's eps: z, kl, every gradient."""
    k = num_samples
    eps = eps_for(inputs[0], k)
    n = inputs[0].shape[0]
    kl_shape = ((k, n) if k else (n,)) if kw.get("reduction", "none") == "none" else ()
    wz, wk = weights(eps.shape, kl_shape)
    z, kl, grads = run(fused, inputs, wz, wk, num_samples=k, **kw)
    ref_in = [None if t is None else t.detach().to("cpu", F64) for t in inputs]
    rz, rkl, rgrads = run(lambda *t, **a: reference.gaussian_latent(*t, eps=eps.to("cpu", F64), **a), ref_in,
                          wz, wk, num_samples=k, **kw)
    tol = TOLS[dtype]
    assert z.dtype == dtype and kl.dtype == (F32 if dtype in HALF else dtype)
    assert z.shape == eps.shape
    assert_close(z, rz, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what="z")
    assert_close(kl, rkl, rtol=tol_kl or tol.loss, atol_rel=tol_kl or tol.loss, what="kl")
    for name, g, rg, t in zip(("mu", "logscale", "prior_mu", "prior_logscale"), grads, rgrads, inputs):
        if t is None:
            continue
        assert g is not None and g.shape == t.shape and g.dtype == dtype, name
        assert_close(g, rg, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name}")
    return z, kl, grads


# --------------------------------------------------------------------------- against the reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("prior", [None, "same", "shared"], ids=str)
@pytest.mark.parametrize("reduction,k", [("none", None), ("sum", None), ("mean", 3), ("none", 2)])
def test_against_reference(device, dtype, scale, kl, prior, reduction, k):
    inputs = make((3, 5, 4, 3), dtype, prior, device=device)
    check(inputs, dtype=dtype, num_samples=k, scale=scale, kl=kl, reduction=reduction)


SHAPES = {
    "1d": (7,),
    "2d_odd": (5, 13),
    "3d": (3, 5, 7),
    "5d": (2, 3, 2, 3, 5),
    "chunks": (3, 6, 33, 35),  # rows of 6930: several 2048-element partial sums, 512-element eps tiles
    "wide_s1": (4, 700, 1, 1),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_shapes(shape, kl, dtype):
    prior = "same" if len(shape) < 3 else "shared"
    check(make(shape, dtype, prior), dtype=dtype, kl=kl, scale="logsigma", reduction="none", num_samples=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
@pytest.mark.parametrize("k", [None, 2], ids=["k0", "k2"])
def test_layouts(device, layout, kl, dtype, k):
    """A real layer's inputs: channel slices of one conv output, read where they lie. z and the
    gradients come back in mu's layout (channels_last for a slice of a channels_last tensor)."""
    inputs = make((2, 3, 5, 6), dtype, "same", layout=layout, device=device)
    mu = inputs[0]
    if layout.startswith("slice"):
        assert not mu.is_contiguous() and not mu.is_contiguous(memory_format=torch.channels_last)
    z, _, _ = check(inputs, dtype=dtype, num_samples=k, kl=kl, scale="logsigma", reduction="sum")
    # the gradients as the op hands them on (a leaf's .grad takes AccumulateGrad's layout instead)
    leaves = [t.detach().requires_grad_(True) for t in inputs[:2]]
    zz, kk = fused(*leaves, *inputs[2:], kl=kl, num_samples=k)
    grads = torch.autograd.grad(zz.sum() + kk.sum(), leaves)
    fmt = torch.channels_last if layout in ("channels_last", "slice_nhwc") else torch.contiguous_format
    for t in ([z] if k is None else list(z)) + list(grads):
        assert t.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", ["slice_nchw", "slice_nhwc"])
def test_slices_are_not_copied(layout):
    """The slices' data is read in place: no copy of mu's size runs, forward or backward (the one
    copy is the per-sample KL's, N elements, from the double sums)."""
    inputs = [t.detach().requires_grad_(True) for t in make((8, 16, 16, 16), F32, "same", layout=layout)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        z, kl = fused(*inputs)
        torch.autograd.grad(z.sum() + kl.sum(), inputs)
    big = [e for e in prof.events() if e.name in ("aten::copy_", "aten::contiguous", "aten::clone")
           and any(math.prod(s) > 8 for s in e.input_shapes if s)]
    assert not big, [(e.name, e.input_shapes) for e in big]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kl", KLS)
def test_prior_slices_saved_compact(layout, kl):
    """VDVAE's prior mean and log-scale are channel slices of the prior network's output, whose other
    channels (the state update) are freed after the forward: the op saves compact copies of the two
    slices, not views that would keep that whole output alive. q's chunk(2), the whole of its
    storage, is saved as it is. The gradients are the reference's either way."""
    g = torch.Generator().manual_seed(3)
    n, c, width, fmt = 3, 2, 12, getattr(torch, layout if layout == "channels_last" else "contiguous_format")
    q = torch.randn(n, 2 * c, 4, 5, generator=g, dtype=F64).contiguous(memory_format=fmt).requires_grad_(True)
    feats = torch.randn(n, 2 * c + width, 4, 5, generator=g, dtype=F64).contiguous(memory_format=fmt)
    feats.requires_grad_(True)

    def layer(fn, **kw):
        mu, ls = q.chunk(2, dim=1)
        return fn(mu, ls, feats[:, :c], feats[:, c:2 * c], scale="logsigma", kl=kl, **kw)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z, kl_n = layer(fused)
    ptrs = [t.untyped_storage().data_ptr() for t in saved]
    assert feats.untyped_storage().data_ptr() not in ptrs
    assert q.untyped_storage().data_ptr() in ptrs
    wz, wk = weights(z.shape, kl_n.shape)
    got = torch.autograd.grad((z, kl_n), (q, feats), (wz, wk))
    eps = eps_for(q[:, :c], None)
    rz, rkl = layer(reference.gaussian_latent, eps=eps)
    want = torch.autograd.grad((rz, rkl), (q, feats), (wz, wk))
    for a, b, what in zip(got, want, ("q", "feats")):
        assert_close(a, b, rtol=TOLS[F64].grad, atol_rel=TOLS[F64].grad_atol_rel, what=what)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("k", [None, 2], ids=["k0", "k2"])
def test_free_bits(reduction, kl, k):
    inputs = make((6, 4, 3), F64, "shared")
    floor = _median_unit_kl(inputs, kl, k)  # some units floored, some not
    check(inputs, dtype=F64, num_samples=k, kl=kl, reduction=reduction, free_bits=floor)


def _median_unit_kl(inputs, kl, k):
    mu, ls, pmu, pls = (t.double() for t in inputs)
    eps = eps_for(inputs[0], k).double()
    h, ph = 0.5 * ls, 0.5 * pls
    z = mu + torch.exp(h) * eps
    el = reference.latent_kl_elements(z, eps, mu, h, pmu, ph, kl).expand(z.shape)
    units = el.reshape(-1, math.prod(mu.shape[1:])).mean(0)
    lo, hi = units.min().item(), units.max().item()
    floor = units.median().item() + 1e-3 * (hi - lo)
    assert lo < floor < hi and not torch.any(units == floor)
    return floor


@pytest.mark.parametrize("which", ["z", "kl"])
@pytest.mark.parametrize("kl", KLS)
def test_one_output_differentiated(which, kl):
    """Only z, or only kl, reaches the loss: the gradients are those of that output alone."""
    inputs = make((3, 4, 5), F64, "same")
    eps = eps_for(inputs[0], None)
    out = []
    for fn in (fused, lambda *t, **a: reference.gaussian_latent(*t, eps=eps, **a)):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        z, k = fn(*leaves, kl=kl)
        ((z * 1.3).sum() if which == "z" else (k * 0.7).sum()).backward()
        out.append([t.grad for t in leaves])
    for g, rg in zip(*out):
        if rg is None:
            assert g is None or not g.any()
        else:
            assert_close(g, rg, rtol=1e-10, atol_rel=1e-12, what=which)


def test_empty_batch():
    mu = torch.zeros(0, 3, 2)
    z, kl = vae_ext.gaussian_latent(mu, mu)
    assert z.shape == (0, 3, 2) and kl.shape == (0,)
    assert vae_ext.gaussian_latent(mu, mu, reduction="sum")[1].item() == 0.0
    assert math.isnan(vae_ext.gaussian_latent(mu, mu, reduction="mean")[1].item())


EMPTY_VIEWS = {
    # a size-0 spatial dimension between two others: no stride merges them, even when contiguous
    "zero_spatial": lambda: torch.zeros(2, 3, 2, 0, 2),
    # an empty batch viewed channels-last, and with H and W swapped
    "empty_nhwc": lambda: torch.zeros(0, 2, 3, 5).permute(0, 2, 3, 1),
    "empty_transposed": lambda: torch.zeros(0, 2, 3, 5).transpose(2, 3),
}


@pytest.mark.parametrize("view", EMPTY_VIEWS)
@pytest.mark.parametrize("k", [None, 3], ids=["k0", "k3"])
@pytest.mark.parametrize("prior", [None, "channel"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_empty_latents_of_any_strides(view, k, prior, reduction):
    """An empty latent whatever its strides (they once failed an internal assert): the reference's
    shapes and values (a KL of 0 per sample), and a zero gradient of each input's shape."""
    leaves = [EMPTY_VIEWS[view]().requires_grad_() for _ in range(2)]
    if prior == "channel":  # (C, 1, ...): non-empty, broadcast over the empty batch or spatial dims
        leaves += [torch.randn(leaves[0].shape[1], *[1] * (leaves[0].dim() - 2)).requires_grad_() for _ in range(2)]
    z, kl = vae_ext.gaussian_latent(*leaves, num_samples=k, reduction=reduction)
    zr, klr = reference.gaussian_latent(*leaves, num_samples=k, reduction=reduction)
    assert z.shape == zr.shape and z.numel() == 0
    assert kl.shape == klr.shape and torch.equal(kl, klr) and not kl.any()
    grads = torch.autograd.grad(z.sum() + kl.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert not any(g.any() for g in grads)


@pytest.mark.parametrize("dtype", [F32, F16], ids=dtype_id)
def test_empty_batch_gradients_reach_the_prior(dtype):
    """An empty batch still gives every input an (empty) gradient, the prior's summed to its shape."""
    leaves = [torch.zeros(0, 3, 2, dtype=dtype, requires_grad=True) for _ in range(3)]
    leaves.append(torch.zeros(3, 1, dtype=dtype, requires_grad=True))
    z, kl = vae_ext.gaussian_latent(*leaves)
    grads = torch.autograd.grad(z.sum() + kl.sum(), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all(g.dtype == dtype and not g.any() for g in grads)


def test_nan_in_nan_out():
    mu, ls, pmu, pls = make((2, 3, 4), F32, "same")
    mu[1, 2, 3] = float("nan")
    z, kl = fused(mu, ls, pmu, pls)
    assert torch.isnan(z[1, 2, 3]) and torch.isnan(kl[1]) and not torch.isnan(kl[0])


# --------------------------------------------------------------------------- the draws
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [None, 3], ids=["k0", "k3"])
@pytest.mark.parametrize("kl", KLS)
def test_z_is_reparameterize_z(dtype, layout, k, kl):
    """scale="logvar": z is bitwise reparameterize's z at the same generator state (its eps, its
    element -> counter mapping, its arithmetic), whatever the layout and the prior."""
    mu, ls, pmu, pls = make((2, 3, 5, 7), dtype, "shared", layout=layout)
    z, _ = vae_ext.gaussian_latent(mu, ls, pmu, pls, kl=kl, num_samples=k, generator=gen(21))
    zr = vae_ext.reparameterize(mu, ls, num_samples=k, generator=gen(21))
    assert torch.equal(z, zr)


def test_default_generator_advances_as_reparameterize():
    mu, ls, _, _ = make((4, 9), F32, None)
    torch.manual_seed(3)
    z1, _ = vae_ext.gaussian_latent(mu, ls)
    z2, _ = vae_ext.gaussian_latent(mu, ls)
    torch.manual_seed(3)
    assert torch.equal(z1, vae_ext.reparameterize(mu, ls)) and torch.equal(z2, vae_ext.reparameterize(mu, ls))
    assert not torch.equal(z1, z2)


def test_sample_kl_is_unbiased():
    """The single-sample KL averages to the analytic one (K = 4000 draws; 5 standard errors)."""
    mu, ls, pmu, pls = make((2, 6), F64, "same")
    _, ks = vae_ext.gaussian_latent(mu, ls, pmu, pls, kl="sample", num_samples=4000, generator=gen(8))
    _, ka = vae_ext.gaussian_latent(mu, ls, pmu, pls, kl="analytic")
    se = ks.std(0) / math.sqrt(ks.shape[0])
    assert torch.all((ks.mean(0) - ka).abs() < 5 * se), (ks.mean(0), ka, se)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_threads_bitwise(layout, kl, dtype):
    """z, kl and every gradient are bitwise the same on 1 and 2 threads (fixed summation orders)."""
    inputs = make((6, 8, 40, 40), dtype, "shared", layout=layout)
    wz, wk = weights((2, *inputs[0].shape), ())
    outs = []
    for threads in (1, 2):
        with num_threads(threads):
            outs.append(run(fused, inputs, wz, wk, kl=kl, num_samples=2, reduction="sum"))
    (z1, k1, g1), (z2, k2, g2) = outs
    assert torch.equal(z1, z2) and torch.equal(k1, k2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("prior", [None, "same", "shared"], ids=str)
@pytest.mark.parametrize("k", [None, 2], ids=["k0", "k2"])
def test_gradcheck(scale, kl, prior, k):
    inputs = [t for t in make((2, 3, 2, 2), F64, prior) if t is not None]
    leaves = tuple(t.detach().requires_grad_(True) for t in inputs)
    red = "mean" if k else "none"

    def fn(*t):
        full = list(t) + [None] * (4 - len(t))
        return vae_ext.gaussian_latent(*full, scale=scale, kl=kl, num_samples=k, reduction=red, generator=gen(5))

    assert torch.autograd.gradcheck(fn, leaves)
