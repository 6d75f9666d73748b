"""Free bits at a tie: a unit whose KL equals the floor exactly.

`max(lambda, KL_u)` has two sides at KL_u == lambda, and which one a computation lands on is
decided by the last bit of KL_u wherever KL_u is rounded: a test whose floor is a computed KL
depends on that bit (the other tests keep their floors away from every unit). Here the tie is
exact by construction, so the fused op and the reference must decide it the same way: clamp's
rule, documented in the README (free bits) and docs/design.md: the value is lambda, and the
unit keeps its KL gradient (csrc/kl_terms.cpp keeps `unit >= floor`; the reference's
`clamp(min=floor)` passes the gradient where `unit >= floor`).

The values are exact in every dtype and in any order of summation: logvar 0 and a prior of
logvar 0 give each element the KL `0.5 * (mu - prior_mu)^2` with `exp(0) == 1`, and the
differences below are small multiples of 1/4. Floor 1.25: unit 0 is under it (0.5 in both
samples), unit 1 on it (the batch mean of 0.5 and 2.0), unit 2 over it (2.0 in both).
"""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import DEVICES, DTYPES, F64, check_objective, dtype_id, kl_as_elbo

FLOOR = 1.25
DIFF = ((1.0, 1.0, 2.0), (-1.0, 2.0, -2.0))  # mu - prior_mu, (N=2, L=3)
PRIORS = {"no_prior": None, "prior_per_sample": (2, 3), "prior_L": (3,)}


def _tie_inputs(dtype, device, prior):
    pshape = PRIORS[prior]
    pmu = 0.0 if pshape is None else 0.25
    mu = torch.tensor(DIFF, dtype=F64) + pmu
    inputs = {"recon_x": torch.full((2, 5), 0.5, dtype=dtype, device=device),
              "x": torch.full((2, 5), 0.25, dtype=dtype, device=device),
              "mu": mu.to(device, dtype), "logvar": torch.zeros(2, 3, dtype=dtype, device=device),
              "prior_mu": None, "prior_logvar": None, "recon_logvar": None}
    if pshape is not None:
        inputs["prior_mu"] = torch.full(pshape, pmu, dtype=dtype, device=device)
        inputs["prior_logvar"] = torch.zeros(pshape, dtype=dtype, device=device)
    return inputs


def test_the_tie_is_exact():
    """The reference computes unit 1's KL as the floor itself, no rounding on either side."""
    for prior in PRIORS:
        inp = _tie_inputs(F64, "cpu", prior)
        ukl = reference.unit_kl(inp["mu"], inp["logvar"], inp["prior_mu"], inp["prior_logvar"])
        assert ukl.tolist() == [0.5, FLOOR, 2.0], prior


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_decides_the_tie_as_the_reference(device, dtype, prior, reduction):
    """elbo_loss and gaussian_kl: the floored value and every gradient as the reference's; the unit
    on the floor keeps its gradient (the one under it gets none) in both."""
    inputs = _tie_inputs(dtype, device, prior)
    up = torch.tensor(-1.5, dtype=F64)
    latents = ("mu", "logvar") + (() if PRIORS[prior] is None else ("prior_mu", "prior_logvar"))
    for what, fused, ref in (("elbo_loss", None, None),
                             ("gaussian_kl", kl_as_elbo(vae_ext.gaussian_kl), kl_as_elbo(reference.gaussian_kl))):
        out, grads = check_objective(inputs, fused=fused, ref=ref, upstream=up, reduction=reduction,
                                     free_bits=FLOOR, requires=("recon_x",) + latents if fused is None else latents,
                                     what=f"{what} {prior}/{reduction}")
        n = 2 if reduction == "sum" else 1
        g = grads["mu"].double()
        assert g[:, 0].eq(0).all(), f"{what}: the unit under the floor has a gradient"
        assert g[:, 1].ne(0).all() and g[:, 2].ne(0).all(), f"{what}: a unit on or over the floor lost its gradient"
        if fused is not None:  # gaussian_kl: the floored KL itself, exactly
            assert out.double().item() == n * (FLOOR + FLOOR + 2.0), f"{what}: {out.item()}"
