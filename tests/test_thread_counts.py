"""Every op, with every option, gives bitwise the same outputs and gradients on 1 and 2 threads
(README: "bitwise the same for any torch.get_num_threads()"), at sizes past the parallel grain
(32768 elements): a wide batch (a few samples of more than 32768 pixels and latent units) and a
tall one (more than 32768 samples of a few). Any sum left to PyTorch's threaded reductions (which
split a long sum by thread count) shows up here.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import vae_ext

import helpers as h

# (N, recon elements per sample, latent shape per sample (C, S))
SHAPES = {"wide": (2, 33000, (3, 11000)), "tall": (33000, 2, (2, 1))}
MODES = ("bce", "bce_logits", "mse", "l1", "gaussian_scalar", "gaussian_pixel")
# prior shape from (N, C, S): none, mu's own, broadcast per sample, shared by every sample per unit,
# per channel, one value
PRIORS = {
    "none": None,
    "full": lambda n, c, s: (n, c, s),
    "per_sample": lambda n, c, s: (n, 1, 1),
    "shared": lambda n, c, s: (c, s),
    "channel": lambda n, c, s: (c, 1),
    "scalar": lambda n, c, s: (1,),
    "0-d": lambda n, c, s: (),
}


def _inputs(shape_name, mode, prior, dtype=h.F32, seed=3):
    n, d, (c, s) = SHAPES[shape_name]
    g = torch.Generator().manual_seed(seed)
    if mode == "bce":
        r, x = torch.rand(n, d, generator=g) * 0.96 + 0.02, torch.rand(n, d, generator=g)
    elif mode == "bce_logits":
        r, x = torch.randn(n, d, generator=g) * 3, torch.rand(n, d, generator=g)
    else:
        r, x = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    out = dict(recon_x=r, x=x, mu=torch.randn(n, c, s, generator=g), logvar=torch.randn(n, c, s, generator=g) * 0.7,
               prior_mu=None, prior_logvar=None, recon_logvar=None)
    if PRIORS[prior] is not None:
        ps = PRIORS[prior](n, c, s)
        out["prior_mu"] = torch.randn(ps, generator=g) * 0.5
        out["prior_logvar"] = torch.rand(ps, generator=g) - 0.5
    if mode == "gaussian_scalar":
        out["recon_logvar"] = torch.tensor(-0.3)
    elif mode == "gaussian_pixel":
        out["recon_logvar"] = torch.rand(n, d, generator=g) - 0.5
    return {k: None if t is None else t.to(dtype) for k, t in out.items()}


def _run_both(fn, *args):
    """fn(*args) on 1 thread and on 2: two lists of tensors."""
    with h.num_threads(1):
        a = fn(*args)
    with h.num_threads(2):
        b = fn(*args)
    return a, b


def _assert_same(a, b, what):
    assert len(a) == len(b), what
    for i, (ta, tb) in enumerate(zip(a, b)):
        if ta is None or tb is None:
            assert ta is None and tb is None, f"{what}: item {i}"
            continue
        assert torch.equal(ta, tb), (
            f"{what}: item {i} differs between 1 and 2 threads, max abs diff "
            f"{(ta.double() - tb.double()).abs().max().item():.3g}")


def _recon(mode):
    return "gaussian" if mode.startswith("gaussian") else mode


def _elbo_all(inputs, mode, reduction, free_bits, upstream):
    """Every output of elbo_loss (terms, unit KL) and every gradient."""
    out, grads = h.objective_run(vae_ext.elbo_loss, inputs, upstream=upstream, combo=lambda o: o[0],
                                 recon=_recon(mode), reduction=reduction, beta=0.7, free_bits=free_bits,
                                 return_terms=True, return_unit_kl=True)
    return list(out) + [grads.get(k) for k in h.OBJ_GRAD_NAMES]


def _elbo_plain(inputs, mode, reduction):
    """The plain call (the kernel's own total, no terms), grad_output ones."""
    out, grads = h.objective_run(vae_ext.elbo_loss, inputs, recon=_recon(mode), reduction=reduction)
    return [out] + [grads.get(k) for k in h.OBJ_GRAD_NAMES]


def _kl_all(inputs, reduction, free_bits, upstream):
    out, grads = h.objective_run(h.kl_as_elbo(vae_ext.gaussian_kl), inputs, upstream=upstream, combo=lambda o: o[0],
                                 requires=("mu", "logvar", "prior_mu", "prior_logvar"), reduction=reduction,
                                 free_bits=free_bits, return_unit_kl=True)
    return list(out) + [grads.get(k) for k in ("mu", "logvar", "prior_mu", "prior_logvar")]


def _reparam_all(mu, lv, k, w, create_graph):
    m, v = mu.detach().requires_grad_(True), lv.detach().requires_grad_(True)
    z, eps = vae_ext.reparameterize(m, v, num_samples=k, return_eps=True, generator=torch.Generator().manual_seed(11))
    gm, gv = torch.autograd.grad((z * w).sum(), (m, v), create_graph=create_graph)
    return [z.detach(), eps, gm.detach(), gv.detach()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_elbo_loss_bitwise_for_1_and_2_threads(shape_name, mode):
    n = SHAPES[shape_name][0]
    for prior, reduction in itertools.product(("none", "shared"), ("sum", "mean", "pixel_mean", "none")):
        inputs = _inputs(shape_name, mode, prior)
        upstream = h.upstream_for(reduction, n).float()
        for free_bits in (0.0, 0.9) if reduction != "none" else (0.0,):
            a, b = _run_both(_elbo_all, inputs, mode, reduction, free_bits, upstream)
            _assert_same(a, b, f"{shape_name} {mode} {reduction} prior={prior} free_bits={free_bits}")
        if reduction != "pixel_mean":
            a, b = _run_both(_elbo_plain, inputs, mode, reduction)
            _assert_same(a, b, f"{shape_name} {mode} {reduction} prior={prior} plain")


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_elbo_loss_every_prior_bitwise_for_1_and_2_threads(shape_name):
    n = SHAPES[shape_name][0]
    for prior, reduction in itertools.product(PRIORS, ("sum", "mean", "none")):
        inputs = _inputs(shape_name, "mse", prior)
        upstream = h.upstream_for(reduction, n).float()
        for free_bits in (0.0, 0.9) if reduction != "none" else (0.0,):
            a, b = _run_both(_elbo_all, inputs, "mse", reduction, free_bits, upstream)
            _assert_same(a, b, f"{shape_name} {reduction} prior={prior} free_bits={free_bits}")


@pytest.mark.parametrize("dtype", [h.F64, h.F16, h.BF16], ids=h.dtype_id)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_elbo_loss_other_dtypes_bitwise_for_1_and_2_threads(shape_name, dtype):
    n = SHAPES[shape_name][0]
    for mode, prior, reduction in itertools.product(("bce", "gaussian_scalar", "gaussian_pixel"),
                                                    ("none", "scalar"), ("sum", "none")):
        inputs = _inputs(shape_name, mode, prior, dtype)
        upstream = h.upstream_for(reduction, n).float()
        for free_bits in (0.0, 0.9) if reduction != "none" else (0.0,):
            a, b = _run_both(_elbo_all, inputs, mode, reduction, free_bits, upstream)
            _assert_same(a, b, f"{dtype} {shape_name} {mode} {reduction} prior={prior} free_bits={free_bits}")


@pytest.mark.parametrize("dtype", [h.F32, h.F64], ids=h.dtype_id)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_gaussian_kl_bitwise_for_1_and_2_threads(shape_name, dtype):
    n = SHAPES[shape_name][0]
    for prior, reduction in itertools.product(PRIORS, ("sum", "mean", "none")):
        inputs = _inputs(shape_name, "mse", prior, dtype)
        upstream = h.upstream_for(reduction, n).float()
        for free_bits in (0.0, 0.9) if reduction != "none" else (0.0,):
            a, b = _run_both(_kl_all, inputs, reduction, free_bits, upstream)
            _assert_same(a, b, f"{shape_name} {reduction} prior={prior} free_bits={free_bits}")


@pytest.mark.parametrize("dtype", [h.F32, h.BF16], ids=h.dtype_id)
@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_reparameterize_bitwise_for_1_and_2_threads(shape_name, create_graph, dtype):
    inputs = _inputs(shape_name, "mse", "none", dtype)
    mu, lv = inputs["mu"], inputs["logvar"]
    for k in (None, 3):
        w = torch.randn((k or 1,) + tuple(mu.shape), generator=torch.Generator().manual_seed(5)).to(dtype)
        w = w if k else w[0]
        a, b = _run_both(_reparam_all, mu, lv, k, w, create_graph)
        _assert_same(a, b, f"{shape_name} num_samples={k}")


def test_philox_normal_bitwise_for_1_and_2_threads():
    """The normals themselves (every thread runs the same capability's code): bitwise, for any
    split of the elements."""
    a, b = _run_both(lambda: [torch.ops.vae_ext.philox_normal(torch.empty(100003), 12345, 8)])
    _assert_same(a, b, "philox_normal")


@pytest.mark.parametrize("create_graph", [False, True], ids=["plain", "create_graph"])
def test_reparameterize_many_samples_bitwise_for_1_and_2_threads(create_graph):
    """One element, 40000 samples: the sums over the samples in the backward."""
    mu, lv = torch.tensor([0.3]), torch.tensor([-0.2])
    w = torch.randn(40000, 1, generator=torch.Generator().manual_seed(5))
    a, b = _run_both(_reparam_all, mu, lv, 40000, w, create_graph)
    _assert_same(a, b, "one element, 40000 samples")
