"""Bad input to issue 15's options of vae_ext.elbo_loss, gaussian_kl and FusedELBOLoss: a ValueError
or TypeError that names the argument, raised before any kernel runs."""
from __future__ import annotations

import re

import pytest
import torch

import vae_ext

from helpers import F32, F64, arg_re, make_objective_inputs, requires_cuda


def _good(mode="mse", rlv=None):
    """(4, 10) recon, conv latents (4, 3, 2, 2), a per-sample prior."""
    return make_objective_inputs(mode, (4, 10), (4, 3, 2, 2), F32, seed=80, prior_shape=(4, 3, 2, 2), rlv=rlv)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every vae_ext op that returned: the error must come from the argument checks (in
    Python, or the op's own before its kernel), not after an op has run."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "vae_ext":
            self.ops.append(func)
        return out


def _raises_before_any_kernel(exc, name, fn):
    mode = _RecordOps()
    with pytest.raises(exc, match=arg_re(name)) as info:
        with mode:
            fn()
    assert not mode.ops, f"{info.value!r} came after {mode.ops}"
    return info


def _call(mode="mse", rlv=None, **over):
    inputs = _good(mode, rlv)
    kw = dict(recon=mode)
    for k, v in over.items():
        if k in inputs:
            inputs[k] = v
        else:
            kw[k] = v
    return lambda: vae_ext.elbo_loss(inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"],
                                     prior_mu=inputs["prior_mu"], prior_logvar=inputs["prior_logvar"],
                                     recon_logvar=inputs["recon_logvar"], **kw)


BAD = [
    # the prior: both or neither
    ("prior_mu_alone", dict(prior_logvar=None), ValueError, "prior_logvar"),
    ("prior_logvar_alone", dict(prior_mu=None), ValueError, "prior_mu"),
    # prior shapes that do not broadcast to mu (4, 3, 2, 2)
    ("prior_mu_shape", dict(prior_mu=torch.zeros(5)), ValueError, "prior_mu"),
    ("prior_logvar_shape", dict(prior_logvar=torch.zeros(3, 2, 3)), ValueError, "prior_logvar"),
    ("prior_mu_other_batch", dict(prior_mu=torch.zeros(2, 3, 2, 2)), ValueError, "prior_mu"),
    ("prior_logvar_other_batch", dict(prior_logvar=torch.zeros(8, 3, 2, 2)), ValueError, "prior_logvar"),
    # broadcastable with mu, but to a bigger shape than mu's: not "to mu"
    ("prior_mu_more_dims", dict(prior_mu=torch.zeros(2, 4, 3, 2, 2)), ValueError, "prior_mu"),
    ("prior_logvar_more_dims", dict(prior_logvar=torch.zeros(1, 4, 3, 2, 2)), ValueError, "prior_logvar"),
    # dtype and device
    ("prior_mu_f64", dict(prior_mu=torch.zeros(4, 3, 2, 2, dtype=F64)), TypeError, "prior_mu"),
    ("prior_logvar_f16", dict(prior_logvar=torch.zeros(3, 1, 1, dtype=torch.float16)), TypeError, "prior_logvar"),
    ("prior_mu_int", dict(prior_mu=torch.zeros(3, 2, 2, dtype=torch.int64)), TypeError, "prior_mu"),
    ("prior_mu_meta", dict(prior_mu=torch.empty(4, 3, 2, 2, device="meta")), ValueError, "prior_mu"),
    ("prior_logvar_meta", dict(prior_logvar=torch.empty(3, 2, 2, device="meta")), ValueError, "prior_logvar"),
    # not a tensor
    ("prior_mu_float", dict(prior_mu=0.0), TypeError, "prior_mu"),
    ("prior_logvar_list", dict(prior_logvar=[0.0, 0.0, 0.0]), TypeError, "prior_logvar"),
    # free bits
    ("free_bits_negative", dict(free_bits=-0.1), ValueError, "free_bits"),
    ("free_bits_nan", dict(free_bits=float("nan")), ValueError, "free_bits"),
    ("free_bits_inf", dict(free_bits=float("inf")), ValueError, "free_bits"),
    ("free_bits_none_reduction", dict(free_bits=0.5, reduction="none"), ValueError, "free_bits"),
    ("free_bits_str", dict(free_bits="0.5"), TypeError, "free_bits"),
    ("free_bits_none", dict(free_bits=None), TypeError, "free_bits"),
    ("free_bits_complex", dict(free_bits=0.5j), TypeError, "free_bits"),
    ("free_bits_tensor_2", dict(free_bits=torch.tensor([0.1, 0.2])), TypeError, "free_bits"),
    # latents whose batch differs from recon_x's (conv latents)
    ("mu_batch", dict(mu=torch.zeros(5, 3, 2, 2), logvar=torch.zeros(5, 3, 2, 2), prior_mu=None, prior_logvar=None),
     ValueError, "mu"),
]

RLV_BAD = [
    ("gaussian_without_recon_logvar", "gaussian", None, dict(), ValueError, "recon_logvar"),
    ("recon_logvar_with_mse", "mse", "scalar", dict(), ValueError, "recon_logvar"),
    ("recon_logvar_with_bce", "bce", "pixel", dict(), ValueError, "recon_logvar"),
    ("recon_logvar_with_bce_logits", "bce_logits", "scalar", dict(), ValueError, "recon_logvar"),
    ("recon_logvar_with_l1", "l1", "pixel", dict(), ValueError, "recon_logvar"),
    ("recon_logvar_1", "gaussian", None, dict(recon_logvar=torch.zeros(1)), ValueError, "recon_logvar"),
    ("recon_logvar_per_sample", "gaussian", None, dict(recon_logvar=torch.zeros(4)), ValueError, "recon_logvar"),
    ("recon_logvar_1xD", "gaussian", None, dict(recon_logvar=torch.zeros(1, 10)), ValueError, "recon_logvar"),
    ("recon_logvar_Nx1", "gaussian", None, dict(recon_logvar=torch.zeros(4, 1)), ValueError, "recon_logvar"),
    ("recon_logvar_x_shape", "gaussian", None, dict(x=torch.zeros(4, 2, 5), recon_logvar=torch.zeros(4, 2, 5)),
     ValueError, "recon_logvar"),
    ("recon_logvar_transposed", "gaussian", None, dict(recon_logvar=torch.zeros(10, 4)), ValueError, "recon_logvar"),
    ("recon_logvar_f64", "gaussian", None, dict(recon_logvar=torch.zeros((), dtype=F64)), TypeError, "recon_logvar"),
    ("recon_logvar_bf16", "gaussian", None, dict(recon_logvar=torch.zeros(4, 10, dtype=torch.bfloat16)), TypeError,
     "recon_logvar"),
    ("recon_logvar_int", "gaussian", None, dict(recon_logvar=torch.zeros((), dtype=torch.int32)), TypeError,
     "recon_logvar"),
    ("recon_logvar_meta", "gaussian", None, dict(recon_logvar=torch.empty(4, 10, device="meta")), ValueError,
     "recon_logvar"),
    ("recon_logvar_float", "gaussian", None, dict(recon_logvar=0.0), TypeError, "recon_logvar"),
]


@pytest.mark.parametrize("over,exc,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(over, exc, name):
    _raises_before_any_kernel(exc, name, _call(**dict(over)))


@pytest.mark.parametrize("mode,rlv,over,exc,name", [b[1:] for b in RLV_BAD], ids=[b[0] for b in RLV_BAD])
def test_bad_recon_logvar_raises(mode, rlv, over, exc, name):
    _raises_before_any_kernel(exc, name, _call(mode, rlv, **dict(over)))


@pytest.mark.parametrize("over,exc,name", [b[1:] for b in BAD if b[0].startswith(("prior", "free_bits"))],
                         ids=[b[0] for b in BAD if b[0].startswith(("prior", "free_bits"))])
def test_gaussian_kl_bad_input_raises(over, exc, name):
    inputs = _good()
    kw = {}
    for k, v in over.items():
        if k in inputs:
            inputs[k] = v
        else:
            kw[k] = v
    _raises_before_any_kernel(exc, name, lambda: vae_ext.gaussian_kl(inputs["mu"], inputs["logvar"], inputs["prior_mu"],
                                                                     inputs["prior_logvar"], **kw))


def test_messages_say_what_was_expected():
    """The message names the argument, the shape it got and the one it must broadcast to."""
    with pytest.raises(ValueError) as info:
        _call(prior_mu=torch.zeros(5))()
    msg = str(info.value)
    assert re.search(r"prior_mu\b", msg), msg
    assert re.search(r"[(\[]5,?[)\]]", msg) and re.search(r"[(\[]4, 3, 2, 2[)\]]", msg), msg
    with pytest.raises(ValueError) as info:
        _call("gaussian", recon_logvar=torch.zeros(4))()
    msg = str(info.value)
    assert "recon_logvar" in msg and re.search(r"[(\[]4, 10[)\]]", msg), msg


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(free_bits=-1.0), ValueError, "free_bits"),
    (dict(free_bits=float("nan")), ValueError, "free_bits"),
    (dict(free_bits="1"), TypeError, "free_bits"),
    (dict(recon="gaussian2"), ValueError, "recon"),
], ids=["free_bits_neg", "free_bits_nan", "free_bits_str", "recon"])
def test_fused_elbo_loss_module_bad_args(kwargs, exc, name):
    with pytest.raises(exc, match=arg_re(name)):
        vae_ext.FusedELBOLoss(**kwargs)


def test_fused_elbo_loss_module_free_bits_with_none_reduction():
    """Refused when built, or at the latest on the first call, naming free_bits."""
    inputs = _good()
    with pytest.raises(ValueError, match=arg_re("free_bits")):
        loss_fn = vae_ext.FusedELBOLoss(recon="mse", reduction="none", free_bits=0.5)
        loss_fn(inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"])


def test_module_gaussian_without_recon_logvar():
    inputs = _good()
    loss_fn = vae_ext.FusedELBOLoss(recon="gaussian")
    with pytest.raises(ValueError, match=arg_re("recon_logvar")):
        loss_fn(inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"])


@pytest.mark.parametrize("good", ["L", "Cx1x1", "1xCxHxW", "CxHxW", "scalar_prior", "free_bits_int"])
def test_good_variants_are_accepted(good):
    """What the checks must let through: every broadcast prior shape, an int free_bits."""
    inputs = _good()
    pshape = {"L": (2,), "Cx1x1": (3, 1, 1), "1xCxHxW": (1, 3, 2, 2), "CxHxW": (3, 2, 2), "scalar_prior": ()}.get(good)
    kw = {}
    if pshape is not None:
        kw = dict(prior_mu=torch.zeros(pshape), prior_logvar=torch.zeros(pshape))
    else:
        kw = dict(free_bits=1)
    vae_ext.elbo_loss(inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"], recon="mse", **kw)
    vae_ext.gaussian_kl(inputs["mu"], inputs["logvar"], kw.get("prior_mu"), kw.get("prior_logvar"),
                        **({"free_bits": 1} if good == "free_bits_int" else {}))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("which", ["prior_mu", "prior_logvar", "recon_logvar"])
def test_cuda_cpu_mix_raises(which):
    inputs = {k: None if v is None else v.cuda() for k, v in _good("gaussian", "pixel").items()}
    inputs[which] = inputs[which].cpu()
    with pytest.raises(ValueError, match=arg_re(which)):
        vae_ext.elbo_loss(inputs["recon_x"], inputs["x"], inputs["mu"], inputs["logvar"], recon="gaussian",
                          prior_mu=inputs["prior_mu"], prior_logvar=inputs["prior_logvar"],
                          recon_logvar=inputs["recon_logvar"])
