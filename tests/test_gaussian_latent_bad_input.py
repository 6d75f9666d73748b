"""Each bad input of vae_ext.gaussian_latent (and of the op called directly) raises a TypeError or
ValueError that names the argument, before any kernel runs."""
from __future__ import annotations

import pytest
import torch

import vae_ext

from helpers import F64, arg_re

OP = torch.ops.vae_ext.gaussian_latent.default


def z43(**kw):
    return torch.zeros(4, 3, **kw)


def gl(*args, **kw):
    return vae_ext.gaussian_latent(*args, **kw)


BAD = [
    ("mu_not_tensor", lambda: gl([0.0], z43()), TypeError, "mu"),
    ("logscale_not_tensor", lambda: gl(z43(), 0.0), TypeError, "logscale"),
    ("mu_int", lambda: gl(torch.zeros(4, 3, dtype=torch.int64), z43()), TypeError, "mu"),
    ("logscale_dtype", lambda: gl(z43(), z43(dtype=F64)), TypeError, "logscale"),
    ("logscale_shape", lambda: gl(z43(), torch.zeros(3, 4)), ValueError, "logscale"),
    ("logscale_broadcastable", lambda: gl(z43(), torch.zeros(1, 3)), ValueError, "logscale"),
    ("mu_0d", lambda: gl(torch.zeros(()), torch.zeros(())), ValueError, "mu"),
    ("logscale_device", lambda: gl(z43(), z43(device="meta")), ValueError, "logscale"),
    ("prior_mu_alone", lambda: gl(z43(), z43(), z43()), ValueError, "prior_logscale"),
    ("prior_logscale_alone", lambda: gl(z43(), z43(), None, z43()), ValueError, "prior_mu"),
    ("prior_mu_not_tensor", lambda: gl(z43(), z43(), 0.0, z43()), TypeError, "prior_mu"),
    ("prior_mu_shape", lambda: gl(z43(), z43(), torch.zeros(4, 2), z43()), ValueError, "prior_mu"),
    ("prior_logscale_shape", lambda: gl(z43(), z43(), z43(), torch.zeros(5, 4, 3)), ValueError, "prior_logscale"),
    ("prior_mu_dtype", lambda: gl(z43(), z43(), z43(dtype=F64), z43()), TypeError, "prior_mu"),
    ("prior_logscale_device", lambda: gl(z43(), z43(), z43(), z43(device="meta")), ValueError, "prior_logscale"),
    ("scale", lambda: gl(z43(), z43(), scale="log_sigma"), ValueError, "scale"),
    ("scale_not_str", lambda: gl(z43(), z43(), scale=None), ValueError, "scale"),
    ("kl", lambda: gl(z43(), z43(), kl="mc"), ValueError, "kl"),
    ("reduction", lambda: gl(z43(), z43(), reduction="batchmean"), ValueError, "reduction"),
    ("free_bits_negative", lambda: gl(z43(), z43(), reduction="sum", free_bits=-0.1), ValueError, "free_bits"),
    ("free_bits_inf", lambda: gl(z43(), z43(), reduction="sum", free_bits=float("inf")), ValueError, "free_bits"),
    ("free_bits_nan", lambda: gl(z43(), z43(), reduction="sum", free_bits=float("nan")), ValueError, "free_bits"),
    ("free_bits_none_reduction", lambda: gl(z43(), z43(), free_bits=0.5), ValueError, "free_bits"),
    ("free_bits_str", lambda: gl(z43(), z43(), reduction="sum", free_bits="1"), TypeError, "free_bits"),
    ("num_samples_0", lambda: gl(z43(), z43(), num_samples=0), ValueError, "num_samples"),
    ("num_samples_float", lambda: gl(z43(), z43(), num_samples=2.0), TypeError, "num_samples"),
    ("num_samples_bool", lambda: gl(z43(), z43(), num_samples=True), TypeError, "num_samples"),
    ("num_samples_too_many", lambda: gl(z43(), z43(), num_samples=2 ** 62), ValueError, "num_samples"),
    ("num_samples_beyond_int64", lambda: gl(z43(), z43(), num_samples=2 ** 70), ValueError, "num_samples"),
    ("generator_int", lambda: gl(z43(), z43(), generator=3), TypeError, "generator"),
    ("generator_device", lambda: gl(z43(device="meta"), z43(device="meta"), generator=torch.Generator()),
     ValueError, "generator"),
]


@pytest.mark.parametrize("call,err,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(call, err, name):
    with pytest.raises(err, match=arg_re(name)):
        call()


OP_BAD = [
    ("scale", dict(scale="sigma"), ValueError, "scale"),
    ("kl", dict(kl="exact"), ValueError, "kl"),
    ("reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("free_bits", dict(free_bits=-1.0), ValueError, "free_bits"),
    ("num_samples", dict(num_samples=-1), ValueError, "num_samples"),
    ("num_samples_too_many", dict(num_samples=2 ** 62), ValueError, "num_samples"),
]


@pytest.mark.parametrize("kw,err,name", [b[1:] for b in OP_BAD], ids=[b[0] for b in OP_BAD])
def test_bad_input_to_the_op(kw, err, name):
    """The op checks its own arguments too (a direct torch.ops call skips the Python ones)."""
    args = dict(scale="logvar", kl="analytic", reduction="sum", free_bits=0.0, num_samples=0)
    args.update(kw)
    with pytest.raises(err, match=arg_re(name)):
        OP(z43(), z43(), None, None, args["scale"], args["kl"], args["reduction"], args["free_bits"],
           args["num_samples"])


def test_bad_grad_z_to_the_backward():
    z, _, state, unit_w = OP(z43(), z43(), None, None, "logvar", "analytic", "none", 0.0, 0)
    with pytest.raises(ValueError, match=arg_re("grad_z")):
        torch.ops.vae_ext.gaussian_latent_backward(torch.zeros(3, 4), None, z43(), z43(), None, None, state, unit_w,
                                                   "logvar", "analytic", 0, False)
