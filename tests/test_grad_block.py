"""The latent gradients of one call in one CPU block (csrc/grad_block.h, docs/design.md "Page faults
under glibc's defaults"): each gradient still right against the float64 reference and a tensor of its
own (its own storage: opcheck's no-alias rule), alive as long as any of them is, a broadcast prior's
gradients outside the block, and the bounds on the block's size; gaussian_latent's backward likewise,
its gradients in mu's memory format."""
from __future__ import annotations

import gc

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import F32, F64, assert_close, make_objective_inputs, upstream_for

ELBO_OP = torch.ops.vae_ext.elbo_loss.default
LATENT = (64, 4, 8, 8)  # 64 KiB per float32 gradient: 2 or 4 of them reach the block's 128 KiB minimum
NAMES = ("mu", "logvar", "prior_mu", "prior_logvar")


def _kl_grads(prior_shape, dtype=F32, reduction="mean", latent=LATENT):
    """gaussian_kl forward + backward (grad_output != 1) on leaves; returns (leaves, their reference
    gradients in float64)."""
    inputs = make_objective_inputs("mse", (latent[0], 1), latent, dtype, seed=70, prior_shape=prior_shape)
    names = NAMES if prior_shape is not None else NAMES[:2]
    leaves = {k: inputs[k].detach().requires_grad_(True) for k in names}
    w = upstream_for(reduction, latent[0])
    out = vae_ext.gaussian_kl(*leaves.values(), reduction=reduction)
    (out * w.to(out.dtype)).sum().backward()
    refs = {k: t.detach().to(F64).requires_grad_(True) for k, t in leaves.items()}
    (reference.gaussian_kl(*refs.values(), reduction=reduction) * w).sum().backward()
    return leaves, {k: t.grad for k, t in refs.items()}


def _one_block(grads):
    """True when the gradients lie one after the other in memory, each with a storage of its own."""
    ptrs = [g.data_ptr() for g in grads]
    each = grads[0].untyped_storage().nbytes()
    return (all(g.untyped_storage().nbytes() == each and g.untyped_storage().data_ptr() == g.data_ptr()
                for g in grads)
            and ptrs == [ptrs[0] + i * each for i in range(len(grads))])


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
@pytest.mark.parametrize("prior", ["whole", "none"])
def test_grads_in_one_block_match_reference(prior, reduction):
    leaves, refs = _kl_grads(LATENT if prior == "whole" else None, reduction=reduction)
    assert _one_block([t.grad for t in leaves.values()]), prior
    for k, t in leaves.items():
        assert_close(t.grad, refs[k], rtol=1e-5, atol_rel=1e-6, what=f"{prior} {reduction}: grad {k}")


def test_broadcast_prior_grads_stay_outside():
    """A broadcast prior's gradients are summed in the backward: mu's and logvar's block holds
    neither of the per-element buffers they come from."""
    leaves, refs = _kl_grads((4, 1, 1))
    assert _one_block([leaves["mu"].grad, leaves["logvar"].grad])
    for k, t in leaves.items():
        assert_close(t.grad, refs[k], rtol=1e-5, atol_rel=1e-6, what=f"grad {k}")


@pytest.mark.parametrize("dtype", [F64, torch.float16, torch.bfloat16])
def test_other_dtypes(dtype):
    """float64 gradients in the block; a half input's float32 buffers scaled and rounded into tensors
    of its dtype."""
    leaves, refs = _kl_grads(LATENT, dtype=dtype)
    tol = 1e-12 if dtype == F64 else 1e-2
    for k, t in leaves.items():
        assert t.grad.dtype == dtype, k
        assert_close(t.grad, refs[k], rtol=tol, atol_rel=tol, what=f"{dtype} grad {k}")
    if dtype == F64:
        assert _one_block([t.grad for t in leaves.values()])


def test_each_gradient_outlives_the_others():
    """The block is freed with the last of its tensors: one gradient kept after the others are
    dropped keeps its values through new allocations."""
    leaves, _ = _kl_grads(LATENT)
    kept = leaves["prior_logvar"].grad
    want = kept.clone()
    for k in NAMES[:3]:
        leaves[k].grad = None
    gc.collect()
    junk = [torch.full((LATENT[0] * 256,), 7.0) for _ in range(8)]  # the freed bytes' next users
    assert torch.equal(kept, want)
    del junk
    kept.mul_(2.0)  # writable, and its neighbours' bytes are no longer read by anyone
    assert torch.equal(kept, want * 2)


def test_backward_twice_with_retain_graph():
    """With the graph kept the buffers are not scaled in place: a second backward adds the same."""
    inputs = make_objective_inputs("mse", (LATENT[0], 1), LATENT, F32, seed=74, prior_shape=LATENT)
    leaves = [inputs[k].detach().requires_grad_(True) for k in NAMES]
    loss = vae_ext.gaussian_kl(*leaves) * 3.7
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for name, t, g in zip(NAMES, leaves, first):
        assert_close(t.grad, 2 * g, rtol=1e-6, what=f"grad {name} after two")


def test_direct_op_outputs_are_separate_storages():
    """Called with grad mode off, the op returns the buffers themselves: four tensors, four storages."""
    inputs = make_objective_inputs("mse", (LATENT[0], 1), LATENT, F32, seed=71, prior_shape=LATENT)
    empty = inputs["mu"].new_empty(LATENT[0], 0)
    with torch.no_grad():
        out = ELBO_OP(empty, empty, inputs["mu"], inputs["logvar"], "mse", "sum", False, True, False, True,
                      inputs["prior_mu"], inputs["prior_logvar"], None, 0.0, False)
    grads = out[4:8]
    assert _one_block(grads)
    assert len({g.untyped_storage()._cdata for g in grads}) == 4  # four StorageImpls
    refs = [t.to(F64).requires_grad_(True) for t in (inputs[k] for k in NAMES)]
    want = torch.autograd.grad(reference.gaussian_kl(*refs, reduction="sum"), refs)
    for name, g, r in zip(NAMES, grads, want):
        assert_close(g, r, rtol=1e-5, atol_rel=1e-6, what=f"op output: grad {name}")


@pytest.mark.parametrize("case", ["whole_prior", "no_prior", "whole_prior_f16", "no_grads"])
def test_opcheck(case):
    """The outputs alias neither each other nor the inputs (schema), and the fake kernel agrees."""
    dtype = torch.float16 if case.endswith("f16") else F32
    prior = None if case == "no_prior" else LATENT
    inputs = make_objective_inputs("mse", (LATENT[0], 3), LATENT, dtype, seed=72, prior_shape=prior)
    grads = case != "no_grads"
    for k in NAMES:
        if inputs[k] is not None:
            inputs[k].requires_grad_(grads)
    torch.library.opcheck(ELBO_OP, (inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"], "mse", "mean",
                                    False, grads, False, False, inputs["prior_mu"], inputs["prior_logvar"], None,
                                    0.0, False))


def test_torch_compile_fullgraph():
    inputs = make_objective_inputs("mse", (LATENT[0], 1), LATENT, F32, seed=73, prior_shape=LATENT)
    leaves = [inputs[k].detach().requires_grad_(True) for k in NAMES]
    fn = torch.compile(lambda *t: vae_ext.gaussian_kl(*t, reduction="mean") * 3.7, fullgraph=True)
    torch.autograd.grad(fn(*leaves), leaves)  # compiled; the second call runs the compiled graph
    got = torch.autograd.grad(fn(*leaves), leaves)
    refs = [t.detach().to(F64).requires_grad_(True) for t in leaves]
    want = torch.autograd.grad(reference.gaussian_kl(*refs, reduction="mean") * 3.7, refs)
    for name, g, r in zip(NAMES, got, want):
        assert_close(g, r, rtol=1e-5, atol_rel=1e-6, what=f"compiled: grad {name}")


@pytest.mark.parametrize("latent", [(4, 8), (2, 2, 1 << 19)], ids=["below_128KiB", "above_32MiB"])
def test_outside_the_bounds_separate_blocks(latent):
    """Below glibc's first mmap threshold the heap serves the buffers whatever their number; above
    its largest one block would be mmapped on every call, where separate ones may be reused."""
    leaves, refs = _kl_grads(latent, latent=latent, reduction="sum")
    assert not _one_block([t.grad for t in leaves.values()])
    for k, t in leaves.items():
        assert_close(t.grad, refs[k], rtol=1e-5, atol_rel=1e-6, what=f"{latent}: grad {k}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_recon_and_pixel_logvar_grads(layout):
    """recon="gaussian" with a per-element log-variance: recon_x's and its gradients, each recon_x's
    size and freed together, share a block when contiguous (a channels_last recon_x's keep their
    layout in blocks of their own)."""
    inputs = make_objective_inputs("gaussian", (16, 2, 32, 32), (16, 3), F32, seed=75, rlv="pixel")
    if layout == "channels_last":
        for k in ("recon_x", "x", "recon_logvar"):
            inputs[k] = inputs[k].contiguous(memory_format=torch.channels_last)
    names = ("recon_x", "mu", "logvar", "recon_logvar")
    leaves = {k: inputs[k].detach().requires_grad_(True) for k in names}
    w = upstream_for("none", 16)
    out = vae_ext.elbo_loss(leaves["recon_x"], inputs["x"], leaves["mu"], leaves["logvar"], recon="gaussian",
                            reduction="none", recon_logvar=leaves["recon_logvar"])
    (out * w.to(out.dtype)).sum().backward()
    refs = {k: t.detach().to(F64).requires_grad_(True) for k, t in leaves.items()}
    ref = reference.elbo_loss(refs["recon_x"], inputs["x"].to(F64), refs["mu"], refs["logvar"], recon="gaussian",
                              reduction="none", recon_logvar=refs["recon_logvar"])
    (ref * w).sum().backward()
    pair = [leaves["recon_x"].grad, leaves["recon_logvar"].grad]
    assert _one_block(pair) == (layout == "contiguous")
    if layout == "channels_last":
        assert all(g.is_contiguous(memory_format=torch.channels_last) for g in pair)
    for k, t in leaves.items():
        assert_close(t.grad, refs[k].grad, rtol=1e-5, atol_rel=1e-6, what=f"{layout}: grad {k}")


def test_opcheck_recon_pair():
    inputs = make_objective_inputs("gaussian", (16, 2, 32, 32), (16, 3), F32, seed=76, rlv="pixel")
    for k in ("recon_x", "mu", "logvar", "recon_logvar"):
        inputs[k].requires_grad_(True)
    torch.library.opcheck(ELBO_OP, (inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"], "gaussian",
                                    "sum", True, True, False, False, None, None, inputs["recon_logvar"], 0.0, False))


def _latent_grads(layout, prior="same", dtype=F32, latent=LATENT):
    """gaussian_latent forward + backward (grad_output != 1 on z and kl) on LATENT inputs laid out as
    `layout` ("contiguous", "channels_last", or "slice_nhwc": mu, logscale = out.chunk(2, dim=1) of a
    channels_last conv output); returns (inputs, their gradients, the float64 reference's)."""
    g = torch.Generator().manual_seed(75)
    n, c, h, w = latent

    def pair():
        if layout == "slice_nhwc":
            out = torch.randn(n, 2 * c, h, w, generator=g, dtype=F64).to(memory_format=torch.channels_last)
            return [t.to(dtype) for t in out.chunk(2, dim=1)]
        a, b = (torch.randn(latent, generator=g, dtype=F64).to(dtype) for _ in range(2))
        if layout == "channels_last":
            return [t.contiguous(memory_format=torch.channels_last) for t in (a, b)]
        return [a, b]

    inputs = pair()
    if prior == "same":
        inputs += pair()
    elif prior == "shared":
        inputs += [torch.randn(c, 1, 1, generator=g, dtype=F64).to(dtype) for _ in range(2)]
    wz, wk = torch.randn(latent, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64) + 0.5
    _, eps = vae_ext.reparameterize(inputs[0], inputs[0], generator=torch.Generator().manual_seed(9), return_eps=True)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    z, kl = vae_ext.gaussian_latent(*leaves, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((z, kl), leaves, (wz.to(dtype), wk.to(kl.dtype)))
    refs = [t.detach().to(F64).requires_grad_(True) for t in inputs]
    rz, rkl = reference.gaussian_latent(*refs, eps=eps.to(F64))
    want = torch.autograd.grad((rz, rkl), refs, (wz, wk))
    return inputs, grads, want


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice_nhwc"])
def test_latent_grads_in_one_block(layout):
    """mu's, logscale's and a per-sample prior's gradients: one block, each in mu's memory format."""
    inputs, grads, want = _latent_grads(layout)
    assert _one_block(grads), layout
    fmt = torch.contiguous_format if layout == "contiguous" else torch.channels_last
    for name, t, gr, w in zip(NAMES, inputs, grads, want):
        want_fmt = fmt if name in NAMES[:2] else torch.contiguous_format  # the prior's: (N, C, S) per element
        assert gr.shape == t.shape and gr.is_contiguous(memory_format=want_fmt), name
        assert_close(gr, w, rtol=1e-5, atol_rel=1e-6, what=f"{layout}: grad {name}")


@pytest.mark.parametrize("prior,dtype", [("shared", F32), ("shared", torch.float16), (None, F32),
                                         ("same", torch.bfloat16), ("same", torch.float16)])
def test_latent_half_and_broadcast_priors(prior, dtype):
    """A broadcast prior's per-element gradients are summed in the backward: mu's and logscale's
    block holds neither. A half prior of mu's shape gets its gradients in its dtype on the CPU, handed
    on as they are: in the block."""
    # 128 KiB for the two half gradients: the block's minimum
    inputs, grads, want = _latent_grads("contiguous", prior, dtype, (128, 4, 8, 8) if dtype != F32 else LATENT)
    assert _one_block(grads[:2])
    if prior is not None:
        assert _one_block(grads) == (prior == "same"), prior
    tol = 1e-5 if dtype == F32 else 1e-2
    for name, gr, w in zip(NAMES, grads, want):
        assert gr.dtype == dtype
        assert_close(gr, w, rtol=tol, atol_rel=tol, what=f"{prior} {dtype}: grad {name}")
