"""A dynamic batch under torch.compile(dynamic=True) and torch.export: one graph for every batch
size, priors of mu's shape included (their shapes were once read as ints by the C++ autograd,
which specialized the batch size: a recompilation per batch size, and export refused the dynamic
dimension), with the eager op's numbers."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import vae_ext

from helpers import assert_close

BATCHES = (4, 5, 8)  # >= 2: dynamo specializes sizes 0 and 1


# name -> (fn of the leaves returning one tensor, leaves for a batch size)
CASES = {
    "gaussian_kl_prior_of_mu_shape": (lambda m, lv, pm, pl: vae_ext.gaussian_kl(m, lv, pm, pl, reduction="none"),
                                      lambda b: [torch.randn(b, 3) for _ in range(4)]),
    "gaussian_kl_shared_prior": (lambda m, lv, pm, pl: vae_ext.gaussian_kl(m, lv, pm, pl, reduction="mean"),
                                 lambda b: [torch.randn(b, 3), torch.randn(b, 3), torch.randn(3), torch.randn(3)]),
    "elbo_loss_prior_of_mu_shape": (
        lambda r, m, lv, pm, pl: vae_ext.elbo_loss(torch.sigmoid(r), torch.sigmoid(r).detach(), m, lv, prior_mu=pm,
                                                   prior_logvar=pl, reduction="none"),
        lambda b: [torch.randn(b, 7)] + [torch.randn(b, 3) for _ in range(4)]),
    "gaussian_latent_prior_of_mu_shape": (
        lambda m, ls, pm, pl: sum(t.sum() for t in vae_ext.gaussian_latent(m, ls, pm, pl)),
        lambda b: [torch.randn(b, 2, 3, 3) for _ in range(4)]),
    "gaussian_latent_channel_prior_k2": (
        lambda m, ls, pm, pl: vae_ext.gaussian_latent(m, ls, pm, pl, num_samples=2, reduction="mean")[1],
        lambda b: [torch.randn(b, 2, 3, 3), torch.randn(b, 2, 3, 3), torch.randn(2, 1, 1), torch.randn(2, 1, 1)]),
    "reparameterize": (lambda m, lv: vae_ext.reparameterize(m, lv), lambda b: [torch.randn(b, 3), torch.randn(b, 3)]),
    "dmol_nll": (lambda p, x: vae_ext.dmol_nll(p, x.detach().clamp(-1, 1), reduction="none"),
                 lambda b: [torch.randn(b, 10 * 2, 3, 3), torch.randn(b, 3, 3, 3)]),
}


@pytest.mark.parametrize("case", CASES)
def test_compile_dynamic_batch_compiles_once(case):
    """Compiled for the first batch size, reused for the others (no recompilation)."""
    fn, make = CASES[case]
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # AOTAutograd traces the backward too
    compiled = torch.compile(fn, dynamic=True, backend=counter)
    frames = []
    for b in BATCHES:
        torch.manual_seed(b)
        leaves = make(b)
        outs = []
        for f in (fn, compiled):
            torch.manual_seed(100 + b)  # the same draws for the random ops
            args = [t.detach().clone().requires_grad_() for t in leaves]
            out = f(*args)
            weights = torch.linspace(0.5, 1.5, out.numel()).view(out.shape)
            grads = torch.autograd.grad((out * weights).sum(), args, allow_unused=True)  # dmol's x: none
            outs.append([out.detach()] + [g for g in grads if g is not None])
        assert len(outs[1]) == len(outs[0])
        for got, want in zip(outs[1], outs[0]):
            assert_close(got, want, rtol=1e-5, atol_rel=1e-6, what=f"{case} batch {b}")
        frames.append(counter.frame_count)
    assert frames == frames[:1] * len(BATCHES), f"{case}: frames compiled after each of {BATCHES}: {frames}"
    torch._dynamo.reset()


class _Layer(torch.nn.Module):
    """A hierarchical VAE's latent layer with a learned prior of mu's shape, as VDVAE's DecBlock."""

    def forward(self, q, p):
        mu, logscale = q.chunk(2, dim=1)
        pmu, plogscale = p.chunk(2, dim=1)
        z, kl = vae_ext.gaussian_latent(mu, logscale, pmu, plogscale, scale="logsigma")
        return z, kl


def test_export_with_a_dynamic_batch():
    q, p = torch.randn(4, 4, 3, 3), torch.randn(4, 4, 3, 3)
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(_Layer(), (q, p), dynamic_shapes=({0: batch}, {0: batch}))
    for b in (3, 6):
        q, p = torch.randn(b, 4, 3, 3), torch.randn(b, 4, 3, 3)
        torch.manual_seed(7)
        want = _Layer()(q, p)
        torch.manual_seed(7)
        got = ep.module()(q, p)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert_close(g, w, rtol=1e-6, atol_rel=1e-7, what=f"exported, batch {b}")
