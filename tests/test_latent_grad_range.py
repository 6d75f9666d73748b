"""A latent gradient whose local value is past float32's range: the limit docs/api.md states.

Found by the long property run (issue 30): float32, a per-element prior with prior_logvar = -85.36,
beta = 1.4e-45 and grad_output 0.37. The local KL gradient (mu - prior_mu) exp(-prior_logvar) =
-7.6e38 is beyond float32's range when the forward writes it (so is the KL, 2.2e40: the loss is inf),
and beta * grad_output rounds to 0 in float32, so that element's gradient is -inf * 0 = NaN, where
the float64 reference gives -3.76e-7. Keeping such buffers in float64 until scaled would double the
latent buffers of every float32 call for priors 1e-37 wide; the documented limit is kept instead:
+-inf whatever nonzero scale multiplies it, NaN for a zero one, every other element right.
"""
from __future__ import annotations

import math

import pytest
import torch

import vae_ext

BETA_SUB = 1.401298464324817e-45  # float32's smallest subnormal: times 0.37 it rounds to 0


def grads(mod, dt, beta):
    r = torch.tensor([[1.0283], [-0.4345]], dtype=dt)
    x = torch.tensor([[-1.4144], [-1.0992]], dtype=dt)
    mu = torch.tensor([[-0.4066, -0.9533, 0.6083, 1.8823, 3.0853, -0.4919, 0.0577],
                       [1.3770, 1.1054, 1.1566, -0.7639, -0.0487, 0.0387, 1.7524]], dtype=dt).requires_grad_()
    pl = torch.zeros(2, 7, dtype=dt)
    pl[1, 4] = -85.357
    loss = mod.elbo_loss(r, x, mu, torch.zeros(2, 7, dtype=dt), recon="l1", reduction="sum", beta=beta,
                         prior_mu=torch.tensor([[61.7352]], dtype=dt), prior_logvar=pl)
    (loss * 0.37).backward()
    return loss.detach().double(), mu.grad.double()


@pytest.mark.parametrize("beta, limit", [(BETA_SUB, math.nan), (1e-30, -math.inf)], ids=["zero-scale", "tiny-scale"])
def test_local_gradient_past_float32_range(beta, limit):
    loss, got = grads(vae_ext, torch.float32, beta)
    ref_loss, want = grads(vae_ext.reference, torch.float64, beta)
    assert math.isfinite(ref_loss.item()) and loss.item() == math.inf  # the KL, 2.2e40, is past float32
    # the case is what the docstring says: a finite true gradient at (1, 4)
    assert want[1, 4].item() == pytest.approx(-3.764e-7 * beta / BETA_SUB, rel=1e-3)
    g = got[1, 4].item()
    assert math.isnan(g) if math.isnan(limit) else g == limit
    rest = torch.ones_like(got, dtype=torch.bool)
    rest[1, 4] = False
    # (at the zero scale every other gradient is 0 where the reference's are a few dozen float32
    # subnormals: the scale, 5.2e-46, is below float32's range, as in plain PyTorch)
    torch.testing.assert_close(got[rest], want[rest], rtol=1e-5, atol=64 * BETA_SUB if math.isnan(limit) else 0.0)
