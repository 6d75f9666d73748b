"""vae_ext.elbo_loss on CUDA only: device checks, validate=True, CUDA-graph capture and 64-bit
indexing. (The CPU and CUDA parametrizations of the other loss tests run there too.)
"""
from __future__ import annotations

import pytest
import torch

import vae_ext

from helpers import (
    BF16,
    F32,
    RECON_MODES,
    arg_re,
    assert_close,
    capture_cuda_graph,
    make_elbo_inputs,
    requires_cuda,
    skip_unless_cuda_free,
)


@pytest.mark.cuda
@requires_cuda
def test_bce_validate_on_cuda():
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs("bce", (5, 37), 3, F32, seed=81))
    r = r.clone()
    r[4, 36] = 1.5
    with pytest.raises(ValueError) as info:
        vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=True)
    assert "recon_x" in str(info.value) and "[0, 1]" in str(info.value)
    out = vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=False)
    assert not torch.isfinite(out).item(), "an out-of-range probability without validate must give NaN"


@pytest.mark.cuda
@requires_cuda
def test_bce_target_validate_on_cuda():
    """validate=True checks the targets x too; without it a target outside [0, 1] gives the
    formula's finite value (README), which is what the CPU kernels would compute unchecked."""
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs("bce", (5, 37), 3, F32, seed=81))
    x = x.clone()
    x[4, 36] = 255.0
    with pytest.raises(ValueError) as info:
        vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=True)
    assert str(info.value).startswith("x:") and "[0, 1]" in str(info.value)
    out = vae_ext.elbo_loss(r, x, mu, lv, recon="bce", validate=False)
    assert torch.isfinite(out).item()


@pytest.mark.cuda
@requires_cuda
def test_direct_op_cpu_recon_beside_cuda_tensors_names_the_argument():
    """The op's CUDA kernel runs when any tensor is on CUDA. A CPU recon_x beside CUDA x, mu and
    logvar (a direct torch.ops call: vae_ext.elbo_loss checks devices in Python) must get the
    ValueError naming x, not the device guard's error for a CPU device."""
    r, x, mu, lv = make_elbo_inputs("bce", (3, 5), 2, F32, seed=85)
    with pytest.raises(ValueError, match=arg_re("x")):
        torch.ops.vae_ext.elbo_loss(r, x.cuda(), mu.cuda(), lv.cuda(), "bce", "sum", False, False, False)
    with pytest.raises(ValueError, match=arg_re("prior_mu")):  # only an optional tensor on CUDA
        torch.ops.vae_ext.elbo_loss(r, x, mu, lv, "bce", "sum", False, False, False, False, mu.cuda(), lv)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("mode", RECON_MODES)
def test_cuda_graph_capture_of_forward_and_backward(mode):
    """Loss + backward captured in a CUDA graph: replays on new input values give the eager results."""
    r, x, mu, lv = (t.cuda() for t in make_elbo_inputs(mode, (37, 1271), 13, F32, seed=83))
    leaves = [t.requires_grad_() for t in (r, mu, lv)]

    def step():
        for t in leaves:
            t.grad = None
        loss = vae_ext.elbo_loss(r, x, mu, lv, recon=mode, beta=0.5)
        loss.backward()
        return loss

    graph, loss = capture_cuda_graph(step, warmups=2)
    grads = [t.grad for t in leaves]
    new = [t.cuda() for t in make_elbo_inputs(mode, (37, 1271), 13, F32, seed=84)]
    with torch.no_grad():
        for dst, src in zip((r, x, mu, lv), new):
            dst.copy_(src)
    loss_cap = torch.full_like(loss, float("nan"))
    for g in grads:
        g.fill_(float("nan"))  # every element must be rewritten by the replay
    graph.replay()
    torch.cuda.synchronize()
    loss_cap.copy_(loss)
    want = [t.detach().clone().requires_grad_() for t in (r, mu, lv)]
    ref = vae_ext.elbo_loss(want[0], x, want[1], want[2], recon=mode, beta=0.5)
    ref.backward()
    assert_close(loss_cap, ref, rtol=1e-6, atol=0, what=f"{mode} loss from a graph replay")
    for g, w, name in zip(grads, want, ("recon_x", "mu", "logvar")):
        assert_close(g, w.grad, rtol=1e-6, atol=0, what=f"{mode} grad {name} from a graph replay")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_more_than_2_31_elements(reduction):
    """64-bit indexing: recon_x and x of 2^31 + 3072 bfloat16 elements (4 GiB each), equal everywhere
    but in the last three elements (past 2^31), so the loss is exactly 12 and the gradient 4 there
    and 0 elsewhere: an index that wrapped at 32 bits would read or write the wrong elements."""
    per_row = 2**30 + 1536
    skip_unless_cuda_free(3 * 2 * per_row * 2 + 4 * 2**30)
    r = torch.ones(2, per_row, dtype=BF16, device="cuda")
    r[1, -3:] = 3.0  # (3 - 1)^2 = 4 each
    x = torch.ones_like(r)
    mu = torch.zeros(2, 1, dtype=BF16, device="cuda", requires_grad=True)
    lv = torch.zeros(2, 1, dtype=BF16, device="cuda", requires_grad=True)  # KL = 0
    r.requires_grad_(True)
    loss = vae_ext.elbo_loss(r, x, mu, lv, recon="mse", reduction=reduction)
    want = torch.tensor(12.0) if reduction == "sum" else torch.tensor([0.0, 12.0])
    assert torch.equal(loss.cpu(), want), loss
    loss.sum().backward()
    g = r.grad
    del r, x
    assert torch.equal(g[1, -3:].float().cpu(), torch.full((3,), 4.0))
    assert g.count_nonzero().item() == 3
