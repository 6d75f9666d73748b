"""The DMoL ops as PyTorch sees them: torch.library.opcheck (schema, fake kernel, autograd
registration), torch.compile(fullgraph=True), gradcheck in float64, first derivatives only."""
from __future__ import annotations

import pytest
import torch

import vae_ext

from dmol_originals import dmol_inputs
from helpers import F32, F64, assert_close


def _inputs(c=3, m=3, spatial=(3, 4), dtype=F64, seed=0):
    params, x = dmol_inputs(2, c, spatial, m, seed=seed)
    return params.to(dtype), x.to(dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_opcheck(layout, reduction):
    params, x = _inputs(dtype=F32)
    if layout == "channels_last":
        params = params.contiguous(memory_format=torch.channels_last)
    for grad in (True, False):
        p = params.clone().requires_grad_(grad)
        torch.library.opcheck(torch.ops.vae_ext.dmol_nll.default, (p, x, 8, reduction, -7.0, grad, False))
    torch.library.opcheck(torch.ops.vae_ext.dmol_sample.default, (params, 3, -7.0, None),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("c", [1, 3])
def test_gradcheck(c):
    params, x = _inputs(c=c, m=2, spatial=(2, 3), seed=c)
    p = params.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q: vae_ext.dmol_nll(q, x, reduction="none"), (p,))


def test_compile_fullgraph():
    params, x = _inputs(dtype=F32)
    fn = torch.compile(lambda p, x: vae_ext.dmol_nll(p, x, num_bits=8, reduction="mean"), fullgraph=True)
    p1 = params.clone().requires_grad_(True)
    p2 = params.clone().requires_grad_(True)
    got = fn(p1, x)
    got.backward()
    ref = vae_ext.dmol_nll(p2, x, reduction="mean")
    ref.backward()
    assert_close(got, ref, rtol=1e-6, what="loss")
    assert_close(p1.grad, p2.grad, rtol=1e-6, atol_rel=1e-7, what="gradient")
    sample = torch.compile(lambda p: vae_ext.dmol_sample(p, num_channels=3), fullgraph=True)
    assert sample(params).shape == x.shape


def test_first_derivatives_only():
    params, x = _inputs()
    p = params.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(vae_ext.dmol_nll(p, x), p, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        g.sum().backward()


def test_retain_graph_twice():
    """With retain_graph the saved gradient stays intact: two backwards give twice the gradient."""
    params, x = _inputs(dtype=F32)
    p = params.clone().requires_grad_(True)
    loss = vae_ext.dmol_nll(p, x)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    g1 = p.grad.clone()
    loss.backward(torch.tensor(2.0))
    assert_close(p.grad, 2 * g1, rtol=1e-6, what="accumulated")


def test_exported():
    assert vae_ext.dmol_nll is vae_ext.dmol.dmol_nll and "dmol_sample" in vae_ext.__all__
