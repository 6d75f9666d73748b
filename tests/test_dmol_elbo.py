"""elbo_loss(recon="dmol") and FusedELBOLoss("dmol"): the fused DMoL beside the fused KL in one call,
against the float64 reference composition ``reference.dmol_nll + beta * reference.gaussian_kl`` (and
``reference.elbo_loss(recon="dmol")``): value, every returned term and every gradient for grad_output != 1,
every reduction, priors, free bits, unit KL; the options that do not apply refused by name;
torch.compile(fullgraph=True).
"""
from __future__ import annotations

import math

import pytest
import torch

import vae_ext
from vae_ext import reference as R

from dmol_originals import dmol_inputs
from helpers import BF16, F32, F64, arg_re, assert_close


def _inputs(c=3, spatial=(4, 5), m=4, *, n=3, num_bits=8, seed=0, latent=(2, 3, 3), prior=False, dtype=F64):
    params, x = dmol_inputs(n, c, spatial, m, num_bits=num_bits, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    mu = torch.randn((n, *latent), generator=g, dtype=F64)
    logvar = torch.randn((n, *latent), generator=g, dtype=F64) * 0.5
    t = {"params": params, "mu": mu, "logvar": logvar}
    if prior:  # one per sample for the mean, a shared broadcast one for the log-variance
        t["prior_mu"] = torch.randn((n, *latent), generator=g, dtype=F64) * 0.3
        t["prior_logvar"] = torch.randn((latent[0], 1, 1), generator=g, dtype=F64) * 0.3
    return {k: v.to(dtype) for k, v in t.items()}, x.to(dtype)


def _run(fn, tensors, x, weights, **kw):
    """(outputs detached, {name: gradient of sum_k w_k * out_k}) for fn(params, x, mu, logvar, ...)."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
    priors = {k: leaves[k] for k in ("prior_mu", "prior_logvar") if k in leaves}
    out = fn(leaves["params"], x, leaves["mu"], leaves["logvar"], **priors, **kw)
    out = out if isinstance(out, tuple) else (out,)
    total = sum((o * w).sum() for o, w in zip(out, weights) if o.requires_grad)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return [o.detach() for o in out], dict(zip(leaves, grads))


def _composition(params, x, mu, logvar, prior_mu=None, prior_logvar=None, *, beta=1.0, reduction="sum",
                 return_terms=False, free_bits=0.0, return_unit_kl=False, num_bits=8, log_scale_min=-7.0):
    """What elbo_loss(recon="dmol") must equal, composed from the reference's two parts."""
    rec = R.dmol_nll(params, x, num_bits=num_bits, reduction=reduction, log_scale_min=log_scale_min)
    kl = R.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=reduction, free_bits=free_bits)
    out = (rec + beta * kl,)
    if return_terms:
        # with free bits the true KL, detached (for logging), else the KL term itself
        true_kl = R.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction=reduction).detach() if free_bits else kl
        out += (rec, true_kl)
    if return_unit_kl:
        out += (R.unit_kl(mu, logvar, prior_mu, prior_logvar).detach(),)
    return out if len(out) > 1 else out[0]


def _weights(outs, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(o.shape, generator=g, dtype=F64) * 2 + 0.25 for o in outs]


def _check(tensors, x, *, tol=1e-10, seed=0, **kw):
    ref_out, _ = _run(_composition, tensors, x, [1.0] * 4, **kw)
    w = _weights(ref_out, seed)
    ref_out, ref_g = _run(_composition, tensors, x, w, **kw)
    dt = next(iter(tensors.values())).dtype
    got_out, got_g = _run(vae_ext.elbo_loss, tensors, x, [v.to(dt) for v in w], recon="dmol", **kw)
    also_out, also_g = _run(R.elbo_loss, tensors, x, w, recon="dmol", **kw)
    assert len(got_out) == len(ref_out) == len(also_out)
    for i, (got, ref, also) in enumerate(zip(got_out, ref_out, also_out)):
        assert_close(got, ref, rtol=tol, atol_rel=tol, what=f"output {i}")
        assert_close(also, ref, rtol=1e-12, atol_rel=1e-12, what=f"reference.elbo_loss output {i}")
    for k in ref_g:
        assert got_g[k].dtype == tensors[k].dtype
        assert_close(got_g[k], ref_g[k], rtol=tol * 30, atol_rel=tol * 3, what=f"gradient of {k}")
        assert_close(also_g[k], ref_g[k], rtol=1e-12, atol_rel=1e-12, what=f"reference.elbo_loss gradient of {k}")
    return got_out, got_g


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("beta", [1.0, 0.3])
@pytest.mark.parametrize("return_terms", [False, True])
def test_f64_value_terms_and_gradients(reduction, beta, return_terms):
    tensors, x = _inputs(seed=1)
    out, g = _check(tensors, x, reduction=reduction, beta=beta, return_terms=return_terms, seed=2)
    assert out[0].shape == ((3,) if reduction == "none" else ())
    assert all(v.abs().sum() > 0 for v in g.values())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_prior_free_bits_and_unit_kl(reduction):
    """A learned prior (one broadcast), free bits that floor some units and not others, the true KL as
    the term and the unit KL appended."""
    tensors, x = _inputs(seed=3, prior=True)
    units = R.unit_kl(tensors["mu"], tensors["logvar"], tensors["prior_mu"], tensors["prior_logvar"])
    free_bits = float(units.flatten().sort().values[units.numel() // 2 - 1:units.numel() // 2 + 1].mean())
    assert (units < free_bits).any() and (units > free_bits).any()
    assert (units - free_bits).abs().min() > 1e-6
    out, g = _check(tensors, x, reduction=reduction, beta=0.7, free_bits=free_bits, return_terms=True,
                    return_unit_kl=True, seed=4)
    assert out[3].shape == tensors["mu"].shape[1:]
    assert g["prior_logvar"].shape == tensors["prior_logvar"].shape


@pytest.mark.parametrize("c,bits,spatial", [(1, 16, (50,)), (1, 8, ()), (3, 5, (3, 3))])
def test_channels_bits_and_shapes(c, bits, spatial):
    tensors, x = _inputs(c, spatial, 3, num_bits=bits, seed=5, latent=(6,))
    _check(tensors, x, num_bits=bits, reduction="none", return_unit_kl=True, seed=6)


def test_log_scale_min_reaches_the_dmol_term():
    tensors, x = _inputs(seed=7)
    _check(tensors, x, log_scale_min=-5.0, return_terms=True, seed=8)
    a = vae_ext.elbo_loss(tensors["params"], x, tensors["mu"], tensors["logvar"], recon="dmol", log_scale_min=-5.0)
    b = vae_ext.elbo_loss(tensors["params"], x, tensors["mu"], tensors["logvar"], recon="dmol")
    assert a != b


def test_float32_channels_last_and_mixed_dtypes():
    """float32 params read channels_last, against float64; a bfloat16 decoder beside float32 latents
    (each op keeps its own dtype, the loss is float32)."""
    tensors, x = _inputs(spatial=(6, 7), seed=9)
    ref = _composition(**tensors, x=x, reduction="mean")
    p32 = tensors["params"].to(F32).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    mu, lv = tensors["mu"].to(F32), tensors["logvar"].to(F32)
    got = vae_ext.elbo_loss(p32, x.to(F32), mu, lv, recon="dmol", reduction="mean")
    assert got.dtype == F32
    assert_close(got, ref, rtol=2e-5, atol_rel=2e-5, what="float32 loss")
    got.backward()
    assert p32.grad.stride() == p32.stride()
    bf = vae_ext.elbo_loss(tensors["params"].to(BF16), x.to(BF16), mu, lv, recon="dmol", reduction="mean")
    assert bf.dtype == F32


def test_module_matches_function():
    tensors, x = _inputs(c=1, spatial=(40,), num_bits=16, seed=10, latent=(5,))
    loss_fn = vae_ext.FusedELBOLoss("dmol", beta=0.5, reduction="mean", num_bits=16, log_scale_min=-9.0)
    assert "num_bits=16" in repr(loss_fn) and "log_scale_min=-9.0" in repr(loss_fn)
    args = (tensors["params"], x, tensors["mu"], tensors["logvar"])
    got = loss_fn(*args, return_terms=True)
    ref = _composition(*args, beta=0.5, reduction="mean", return_terms=True, num_bits=16, log_scale_min=-9.0)
    for a, b in zip(got, ref):
        assert_close(a, b, rtol=1e-10, atol_rel=1e-10, what="FusedELBOLoss('dmol')")
    assert "num_bits" not in repr(vae_ext.FusedELBOLoss())
    assert vae_ext.FusedELBOLoss("dmol").num_bits == 8


def test_no_grad_and_grad_to_params_only():
    tensors, x = _inputs(seed=11)
    with torch.no_grad():
        a = vae_ext.elbo_loss(tensors["params"], x, tensors["mu"], tensors["logvar"], recon="dmol")
    p = tensors["params"].clone().requires_grad_(True)
    b = vae_ext.elbo_loss(p, x, tensors["mu"], tensors["logvar"], recon="dmol")
    assert_close(a, b.detach(), rtol=1e-14, what="no_grad")
    b.backward()
    assert p.grad.abs().sum() > 0


def test_torch_compile_fullgraph():
    tensors, x = _inputs(seed=12, prior=True)
    tensors = {k: v.to(F32) for k, v in tensors.items()}
    x = x.to(F32)

    def step(params, x, mu, logvar, prior_mu, prior_logvar, beta):
        loss, rec, kl, units = vae_ext.elbo_loss(params, x, mu, logvar, recon="dmol", beta=beta, reduction="mean",
                                                 prior_mu=prior_mu, prior_logvar=prior_logvar, free_bits=0.1,
                                                 return_terms=True, return_unit_kl=True, num_bits=8)
        return loss * 1.5, rec, kl, units

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results = []
    for fn in (step, compiled):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}
        out = fn(leaves["params"], x, leaves["mu"], leaves["logvar"], leaves["prior_mu"], leaves["prior_logvar"], 0.4)
        grads = torch.autograd.grad(out[0], list(leaves.values()))
        results.append(([o.detach() for o in out], grads))
    (eo, eg), (co, cg) = results
    for a, b in zip(co, eo):
        assert_close(a, b, rtol=1e-6, atol_rel=1e-6, what="compiled output")
    for a, b in zip(cg, eg):
        assert_close(a, b, rtol=1e-5, atol_rel=1e-6, what="compiled gradient")


def _bad(**kw):
    tensors, x = _inputs(seed=13)
    args = dict(recon="dmol")
    args.update(kw)
    params = args.pop("params", tensors["params"])
    x = args.pop("x", x)
    mu = args.pop("mu", tensors["mu"])
    return lambda: vae_ext.elbo_loss(params, x, mu, tensors["logvar"], **args)


@pytest.mark.parametrize("kw,err,name", [
    (dict(recon_logvar=torch.zeros(())), ValueError, "recon_logvar"),
    (dict(reduction="pixel_mean"), ValueError, "reduction"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(recon="bce", num_bits=8), ValueError, "num_bits"),
    (dict(recon="mse", log_scale_min=-7.0), ValueError, "log_scale_min"),
    (dict(num_bits=0), ValueError, "num_bits"),
    (dict(num_bits=17), ValueError, "num_bits"),
    (dict(num_bits=8.0), TypeError, "num_bits"),
    (dict(log_scale_min=math.inf), ValueError, "log_scale_min"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(free_bits=0.5, reduction="none"), ValueError, "free_bits"),
    (dict(free_bits=-0.5), ValueError, "free_bits"),
    (dict(mu=torch.zeros(2, 2, 3, 3, dtype=F64)), ValueError, "mu"),
    (dict(x=torch.zeros(3, 3, 4, 5, dtype=F64, requires_grad=True)), ValueError, "x"),
    (dict(x=torch.full((3, 3, 4, 5), 1.5, dtype=F64)), ValueError, "x"),
    (dict(params=torch.zeros(3, 11, 4, 5, dtype=F64)), ValueError, "params"),
    (dict(params=[0.0]), TypeError, "params"),
])
def test_refused_by_name(kw, err, name):
    with pytest.raises(err, match=arg_re(name)):
        _bad(**kw)()


@pytest.mark.parametrize("kw,name", [
    (dict(recon="bce", num_bits=8), "num_bits"),
    (dict(recon="gaussian", log_scale_min=-7.0), "log_scale_min"),
    (dict(recon="dmol", reduction="pixel_mean"), "reduction"),
    (dict(recon="dmol", num_bits=20), "num_bits"),
])
def test_module_refuses_at_construction(kw, name):
    with pytest.raises(ValueError, match=arg_re(name)):
        vae_ext.FusedELBOLoss(**kw)


def test_pixel_mean_error_says_what_to_use():
    with pytest.raises(ValueError, match=r"x\[0\]\.numel\(\)"):
        _bad(reduction="pixel_mean")()
