"""vae_ext.gaussian_kl (the KL term alone, any latent shape) against vae_ext.reference.gaussian_kl in
float64: value and both gradients, every dtype and reduction, conv-shaped, channels_last,
non-contiguous and empty latents, grad_output != 1, gradcheck, torch.compile, bad input."""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import DTYPES, F64, REDUCTIONS, TOLS, arg_re, assert_close, dtype_id, out_dtype, upstream_for

SHAPES = {"7x13": (7, 13), "conv3x4x5x7": (3, 4, 5, 7), "1x1": (1, 1), "2x3x2049": (2, 3, 2049)}


def _latents(shape, dtype, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=g, dtype=F64) * 1.5
    lv = torch.randn(shape, generator=g, dtype=F64)
    mu, lv = mu.to(dtype), lv.to(dtype)
    if layout == "channels_last":
        mu, lv = mu.contiguous(memory_format=torch.channels_last), lv.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":  # (N, L) viewed from an (L, N) tensor
        mu, lv = mu.t().contiguous().t(), lv.t().contiguous().t()
    return mu, lv


def _check(mu, lv, reduction, what):
    tol = TOLS[mu.dtype]
    w = upstream_for(reduction, mu.shape[0])
    leaves = [t.detach().requires_grad_(True) for t in (mu, lv)]
    out = vae_ext.gaussian_kl(*leaves, reduction=reduction)
    (out * w.to(out.dtype)).sum().backward()
    ref_leaves = [t.detach().to(F64).requires_grad_(True) for t in (mu, lv)]
    ref = reference.gaussian_kl(*ref_leaves, reduction=reduction)
    (ref * w).sum().backward()
    assert out.dtype == out_dtype(mu.dtype), f"{what}: dtype {out.dtype}"
    assert_close(out, ref, rtol=tol.loss, what=f"{what} kl")
    for name, a, b in (("mu", leaves[0], ref_leaves[0]), ("logvar", leaves[1], ref_leaves[1])):
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, f"{what}: grad {name}"
        assert_close(a.grad, b.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"{what} grad {name}")


@pytest.mark.parametrize("shape_id", list(SHAPES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(dtype, reduction, shape_id):
    mu, lv = _latents(SHAPES[shape_id], dtype, seed=1)
    _check(mu, lv, reduction, f"{dtype_id(dtype)} {reduction} {shape_id}")


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_layouts(layout):
    shape = (3, 4, 5, 7) if layout == "channels_last" else (9, 6)
    mu, lv = _latents(shape, torch.float32, seed=2, layout=layout)
    assert not mu.is_contiguous()
    for reduction in REDUCTIONS:
        _check(mu, lv, reduction, f"{layout} {reduction}")


def test_same_as_the_kl_term_of_elbo_loss():
    mu, lv = _latents((5, 8), torch.float32, seed=3)
    r = torch.rand(5, 10)
    for reduction in REDUCTIONS:
        _, _, kl = vae_ext.elbo_loss(r, r, mu, lv, reduction=reduction, return_terms=True)
        assert torch.equal(vae_ext.gaussian_kl(mu, lv, reduction=reduction), kl)


def test_empty_batch():
    mu = torch.zeros(0, 4, 2, 2, requires_grad=True)
    lv = torch.zeros(0, 4, 2, 2, requires_grad=True)
    assert vae_ext.gaussian_kl(mu, lv).item() == 0.0
    assert torch.isnan(vae_ext.gaussian_kl(mu, lv, reduction="mean"))
    none = vae_ext.gaussian_kl(mu, lv, reduction="none")
    assert none.shape == (0,)
    none.sum().backward()
    assert mu.grad.shape == mu.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_empty_batch_gradients_reach_the_prior(dtype):
    """An empty batch still gives every input an (empty) gradient, the prior's summed to its shape
    (float16 on the CPU takes the backward that recomputes the gradients)."""
    leaves = [torch.zeros(0, 4, dtype=dtype, requires_grad=True) for _ in range(3)]
    leaves.append(torch.zeros(4, dtype=dtype, requires_grad=True))
    grads = torch.autograd.grad(vae_ext.gaussian_kl(*leaves), leaves)
    assert [g.shape for g in grads] == [t.shape for t in leaves]
    assert all(g.dtype == dtype and not g.any() for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(reduction):
    mu, lv = (t.requires_grad_(True) for t in _latents((3, 2, 5), F64, seed=4))
    assert torch.autograd.gradcheck(lambda m, v: vae_ext.gaussian_kl(m, v, reduction=reduction), (mu, lv))


@pytest.mark.parametrize("prior", [False, True], ids=["standard", "prior"])
def test_higher_order_gradients_name_gaussian_kl(prior):
    """gaussian_kl runs the elbo_loss op: differentiating its gradients again raises an error that
    names gaussian_kl and its reference, not elbo_loss alone."""
    leaves = [torch.randn(5, 3, dtype=F64, requires_grad=True) for _ in range(4 if prior else 2)]
    grads = torch.autograd.grad(vae_ext.gaussian_kl(*leaves), leaves, create_graph=True)
    for a, b in zip(grads, torch.autograd.grad(reference.gaussian_kl(*leaves), leaves)):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=r"gaussian_kl support first derivatives only.*"
                                           r"vae_ext\.reference\.gaussian_kl"):
        torch.autograd.grad(grads[0].sum(), leaves[0])


def test_torch_compile_fullgraph():
    mu, lv = _latents((4, 3, 4, 4), torch.float32, seed=5)
    f = torch.compile(lambda m, v: vae_ext.gaussian_kl(m, v, reduction="mean"), backend="aot_eager", fullgraph=True)
    assert_close(f(mu, lv), reference.gaussian_kl(mu.double(), lv.double(), reduction="mean"), rtol=1e-5,
                 what="compiled")


def test_nan_gives_nan():
    mu, lv = _latents((2, 5), torch.float32, seed=6)
    mu[1, 3] = float("nan")
    out = vae_ext.gaussian_kl(mu, lv, reduction="none")
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


@pytest.mark.parametrize("args,kwargs,exc,name", [
    (([1.0], torch.zeros(1, 2)), {}, TypeError, "mu"),
    ((torch.zeros(1, 2), None), {}, TypeError, "logvar"),
    ((torch.zeros(1, 2, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)), {}, TypeError, "mu"),
    ((torch.zeros(1, 2), torch.zeros(1, 2, dtype=F64)), {}, TypeError, "logvar"),
    ((torch.zeros(1, 2), torch.zeros(1, 3)), {}, ValueError, "logvar"),
    ((torch.zeros(()), torch.zeros(())), {}, ValueError, "mu"),
    ((torch.zeros(1, 2), torch.zeros(1, 2)), {"reduction": "avg"}, ValueError, "reduction"),
], ids=["mu_list", "logvar_none", "int_dtype", "dtype_mix", "shape_mix", "zero_d", "reduction"])
def test_bad_input(args, kwargs, exc, name):
    with pytest.raises(exc, match=arg_re(name)):
        vae_ext.gaussian_kl(*args, **kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prior", ["none", "same", "shared"])
def test_float16_cpu_gradients_recomputed_from_the_inputs(reduction, prior):
    """float16 on the CPU: the forward's buffers are float16 (the gradients for grad_output 1), and
    any other grad_output has the backward compute them again in float32 from the inputs
    (csrc/autograd.cpp final_in_half), so the graph keeps the float16 inputs and no float32 tensor
    of mu's size but a broadcast prior's, summed in the backward; each gradient is the float32 value
    times grad_output, rounded once: within an ulp of the exact one."""
    f16, shape = torch.float16, (6, 3, 4, 5)
    mu, lv = _latents(shape, f16, seed=21)
    g = torch.Generator().manual_seed(22)
    pshape = {"none": None, "same": shape, "shared": (3, 1, 1)}[prior]
    pm, pl = ((None, None) if pshape is None else
              ((torch.randn(pshape, generator=g) * 0.5).to(f16), (torch.randn(pshape, generator=g) * 0.5).to(f16)))
    leaves = [t.detach().requires_grad_(True) for t in (mu, lv, pm, pl) if t is not None]
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        kl = vae_ext.gaussian_kl(*leaves, reduction=reduction)
    wide = [t for t in saved if t.dtype == torch.float32 and t.numel() >= mu.numel()]
    assert len(wide) == (2 if prior == "shared" else 0), [t.shape for t in saved]
    assert any(t.data_ptr() == leaves[0].data_ptr() for t in saved)
    up = upstream_for(reduction, shape[0]).to(torch.float32) * 300.0
    grads = torch.autograd.grad((kl * up).sum(), leaves)
    refs = [t.detach().to(F64).requires_grad_(True) for t in leaves]
    want = torch.autograd.grad((reference.gaussian_kl(*refs, reduction=reduction) * up.to(F64)).sum(), refs)
    for name, got, w in zip(("mu", "logvar", "prior_mu", "prior_logvar"), grads, want):
        assert got.dtype == f16 and got.shape == w.shape, name
        fits = w.abs() <= torch.finfo(f16).max  # beyond it (a summed prior's at 300x): inf of its sign
        assert torch.equal(got[~fits].to(F64), w[~fits].sign() * float("inf")), name
        ulp = torch.finfo(f16).eps * w[fits].abs().clamp_min(torch.finfo(f16).tiny)
        assert ((got[fits].to(F64) - w[fits]).abs() <= ulp).all(), f"{name}: more than an ulp off the exact gradient"
