"""Bad input to vae_ext.elbo_loss and FusedELBOLoss: a ValueError or TypeError that names the
argument and what was expected, before any kernel runs.
"""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import (
    BF16,
    F32,
    F64,
    REDUCTIONS,
    arg_re,
    dtype_id,
    make_elbo_inputs,
    requires_cuda,
)


# --------------------------------------------------------------------------- bad input
def _good():
    return make_elbo_inputs("bce", (4, 10), 3, F32, seed=80)


def _call_with(**over):
    r, x, mu, lv = _good()
    args = dict(recon_x=r, x=x, mu=mu, logvar=lv)
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return vae_ext.elbo_loss(args["recon_x"], args["x"], args["mu"], args["logvar"], **kw)


BAD_INPUTS = [
    # non-tensors
    ("recon_x_list", dict(recon_x=[[0.5] * 10] * 4), TypeError, "recon_x"),
    ("x_numpy", dict(x=_good()[1].numpy()), TypeError, "x"),
    ("mu_float", dict(mu=1.0), TypeError, "mu"),
    ("logvar_none", dict(logvar=None), TypeError, "logvar"),
    # non-floating dtypes
    ("recon_x_int", dict(recon_x=torch.ones(4, 10, dtype=torch.int64)), TypeError, "recon_x"),
    ("x_bool", dict(x=torch.ones(4, 10, dtype=torch.bool)), TypeError, "x"),
    ("mu_int32", dict(mu=torch.zeros(4, 3, dtype=torch.int32)), TypeError, "mu"),
    ("logvar_complex", dict(logvar=torch.zeros(4, 3, dtype=torch.complex64)), TypeError, "logvar"),
    # dtypes differing
    ("x_f64", dict(x=_good()[1].double()), TypeError, "x"),
    ("mu_f16", dict(mu=_good()[2].half()), TypeError, "mu"),
    ("logvar_bf16", dict(logvar=_good()[3].bfloat16()), TypeError, "logvar"),
    ("recon_x_f64", dict(recon_x=_good()[0].double()), TypeError, "x|mu|logvar|recon_x"),
    # devices differing (meta is a device on every machine)
    ("x_meta", dict(x=torch.empty(4, 10, device="meta")), ValueError, "x"),
    ("mu_meta", dict(mu=torch.empty(4, 3, device="meta")), ValueError, "mu"),
    ("logvar_meta", dict(logvar=torch.empty(4, 3, device="meta")), ValueError, "logvar"),
    # shapes
    ("x_other_numel", dict(x=torch.rand(4, 11)), ValueError, "x"),
    ("x_other_batch_same_numel", dict(x=torch.rand(10, 4)), ValueError, "x"),
    ("recon_x_0d", dict(recon_x=torch.tensor(0.5), x=torch.tensor(0.5)), ValueError, "recon_x"),
    ("mu_batch", dict(mu=torch.zeros(5, 3), logvar=torch.zeros(5, 3)), ValueError, "mu"),
    # latents of any shape (N, ...) are accepted (issue 15); a 0-d mu has no batch dimension
    ("mu_0d", dict(mu=torch.tensor(0.0), logvar=torch.tensor(0.0)), ValueError, "mu"),
    ("mu_batch_conv", dict(mu=torch.zeros(5, 3, 2, 2), logvar=torch.zeros(5, 3, 2, 2)), ValueError, "mu"),
    ("logvar_shape", dict(logvar=torch.zeros(4, 2)), ValueError, "logvar"),
    ("logvar_transposed_shape", dict(mu=torch.zeros(4, 4), logvar=torch.zeros(4, 3)), ValueError, "logvar"),
    # options
    ("recon_unknown", dict(recon="bernoulli"), ValueError, "recon"),
    ("recon_none", dict(recon=None), ValueError, "recon"),
    ("reduction_unknown", dict(reduction="avg"), ValueError, "reduction"),
    ("reduction_batchmean", dict(reduction="batchmean"), ValueError, "reduction"),
    ("beta_negative", dict(beta=-0.1), ValueError, "beta"),
    ("beta_nan", dict(beta=float("nan")), ValueError, "beta"),
    ("beta_inf", dict(beta=float("inf")), ValueError, "beta"),
    ("beta_str", dict(beta="1.0"), TypeError, "beta"),
    ("beta_bool", dict(beta=True), TypeError, "beta"),
    ("beta_none", dict(beta=None), TypeError, "beta"),
    ("beta_complex", dict(beta=1j), TypeError, "beta"),
    # numbers beyond float's range (an int beta was read as a 64-bit int by beta * kl: 10**30 overflowed it)
    ("beta_huge_int", dict(beta=10**400), ValueError, "beta"),
    ("free_bits_huge_int", dict(free_bits=10**400), ValueError, "free_bits"),
    # an empty batch of another size per sample (binary_cross_entropy refuses it too)
    ("x_empty_batch_other_size", dict(recon_x=torch.rand(0, 4), x=torch.rand(0, 5), mu=torch.zeros(0, 3),
                                      logvar=torch.zeros(0, 3)), ValueError, "x"),
]


def test_int_beta_beyond_int64_is_a_float():
    """beta = 10**30 (an int past 64 bits, within float's range) weights the KL as 1e30 does."""
    r, x, mu, lv = _good()
    a = vae_ext.elbo_loss(r, x, mu, lv, beta=10**30, reduction="none")
    torch.testing.assert_close(a, vae_ext.elbo_loss(r, x, mu, lv, beta=1e30, reduction="none"), rtol=0, atol=0)


@pytest.mark.parametrize("over,exc,name", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises(over, exc, name):
    with pytest.raises(exc, match=arg_re(name) if "|" not in name else name):
        _call_with(**dict(over))


def test_x_requiring_grad_raises():
    r, x, mu, lv = _good()
    with pytest.raises(ValueError, match=arg_re("x")):
        vae_ext.elbo_loss(r.requires_grad_(True), x.clone().requires_grad_(True), mu, lv)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("which", ["x", "mu", "logvar"])
def test_cuda_cpu_mix_raises(which):
    r, x, mu, lv = (t.cuda() for t in _good())
    args = dict(recon_x=r, x=x, mu=mu, logvar=lv)
    args[which] = args[which].cpu()
    with pytest.raises(ValueError, match=arg_re(which)):
        vae_ext.elbo_loss(args["recon_x"], args["x"], args["mu"], args["logvar"])


OUT_OF_RANGE = [1.5, -0.1, 1.0 + 2 ** -23, -1e-30, 2.0]


def _with_value_at(t, position, value):
    """A copy of a (5, 37) input with `value`, which lies outside [0, 1], at its first element, in
    the middle or at the very last (the tail of a vector loop)."""
    idx = {"first": (0, 0), "middle": (2, 17), "last": (4, 36)}[position]
    t = t.clone()
    if t.dtype == BF16 and value == 1.0 + 2 ** -23:
        value = 1.0078125  # the next bfloat16 above 1
    t[idx] = value
    assert (t[idx].item() > 1.0) or (t[idx].item() < 0.0)
    return t


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("value", OUT_OF_RANGE, ids=[repr(v) for v in OUT_OF_RANGE])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
def test_bce_recon_outside_0_1_raises_on_cpu(dtype, value, position):
    """Checked on CPU whatever `validate` says, wherever the bad value sits; the message names recon_x
    and [0, 1]."""
    r, x, mu, lv = make_elbo_inputs("bce", (5, 37), 3, dtype, seed=81)
    r = _with_value_at(r, position, value)
    for validate in (False, True):
        for reduction in REDUCTIONS:
            with pytest.raises(ValueError) as info:
                vae_ext.elbo_loss(r, x, mu, lv, recon="bce", reduction=reduction, validate=validate)
            msg = str(info.value)
            assert "recon_x" in msg and "[0, 1]" in msg, f"message does not name recon_x and [0, 1]: {msg!r}"


X_OUT_OF_RANGE = [255.0, 1.5, -0.1, 1.0 + 2 ** -23, -1e-30, float("inf")]


@pytest.mark.parametrize("position", ["first", "middle", "last"])
@pytest.mark.parametrize("value", X_OUT_OF_RANGE, ids=[repr(v) for v in X_OUT_OF_RANGE])
@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=dtype_id)
@pytest.mark.parametrize("targets", ["binary", "real"])
def test_bce_target_outside_0_1_raises_on_cpu(targets, dtype, value, position):
    """A bce target x outside [0, 1] (data not divided by 255) raises as binary_cross_entropy does,
    checked in the kernel's pass on CPU whatever `validate` says, also among binary targets (whose
    vectors take the one-logarithm path)."""
    r, x, mu, lv = make_elbo_inputs("bce", (5, 37), 3, dtype, seed=83)
    if targets == "binary":
        x = (x > 0.5).to(dtype)
    x = _with_value_at(x, position, value)
    with pytest.raises(RuntimeError, match="target"):  # as PyTorch's own loss refuses it
        torch.nn.functional.binary_cross_entropy(r.float(), x.float())
    for validate in (False, True):
        for reduction in REDUCTIONS:
            with pytest.raises(ValueError) as info:
                vae_ext.elbo_loss(r, x, mu, lv, recon="bce", reduction=reduction, validate=validate)
            msg = str(info.value)
            assert msg.startswith("x:") and "[0, 1]" in msg, f"message does not name x and [0, 1]: {msg!r}"


def test_bce_logits_accepts_any_target():
    """bce_logits keeps accepting any target, as binary_cross_entropy_with_logits does."""
    r, x, mu, lv = make_elbo_inputs("bce_logits", (3, 8), 2, F32, seed=84)
    x = x * 255.0 - 3.0
    got = vae_ext.elbo_loss(r, x, mu, lv, recon="bce_logits")
    want = reference.elbo_loss(r, x, mu, lv, recon="bce_logits")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("mode", ["bce_logits", "mse"])
def test_no_range_check_outside_bce(mode):
    r, x, mu, lv = make_elbo_inputs(mode, (3, 8), 2, F32, seed=82)
    r = r.clone()
    r[0, 0], r[1, 1] = 5.0, -5.0
    vae_ext.elbo_loss(r, x, mu, lv, recon=mode)  # no exception


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(recon="huber"), ValueError, "recon"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(beta="0.5"), TypeError, "beta"),
    (dict(beta=False), TypeError, "beta"),
    (dict(beta=10**400), ValueError, "beta"),
    (dict(free_bits=10**400), ValueError, "free_bits"),
], ids=["recon", "reduction", "beta_neg", "beta_nan", "beta_str", "beta_bool", "beta_huge", "free_bits_huge"])
def test_fused_elbo_loss_module_bad_args(kwargs, exc, name):
    with pytest.raises(exc, match=arg_re(name)):
        vae_ext.FusedELBOLoss(**kwargs)


@pytest.mark.parametrize("dtype,hint", [(torch.uint8, "x.to(recon_x.dtype) / 255"),
                                        (torch.int64, "x.to(recon_x.dtype)"), (torch.bool, "x.to(recon_x.dtype)")],
                         ids=str)
def test_integer_target_says_how_to_convert(dtype, hint):
    """Pixels as an image loader returns them (uint8, 0..255): the error says to convert and scale."""
    r, x, mu, lv = _good()
    for call in (vae_ext.elbo_loss, vae_ext.FusedELBOLoss()):
        with pytest.raises(TypeError, match=arg_re("x")) as e:
            call(r, (x * 255).to(dtype), mu, lv)
        msg = str(e.value)
        assert "recon_x (torch.float32)" in msg and str(dtype) in msg and hint in msg, msg
        assert ("/ 255" in msg) == (dtype == torch.uint8), msg


def test_shapes_print_as_torch_prints_sizes():
    """Every shape in a message is written [4, 10], as torch.Size prints (csrc/checks.cpp's and the
    Python checks' alike), never (4, 10)."""
    r, x, mu, lv = _good()
    cases = [(lambda: vae_ext.elbo_loss(r, torch.rand(4, 11), mu, lv), "[4, 10]", "[4, 11]"),  # Python
             (lambda: vae_ext.elbo_loss(r, x, mu, lv[:, :2]), "[4, 3]", "[4, 2]"),  # C++
             (lambda: vae_ext.gaussian_kl(mu, lv[:, :2]), "[4, 3]", "[4, 2]"),
             (lambda: vae_ext.elbo_loss(r, x, mu, lv, prior_mu=mu[:, :2], prior_logvar=lv[:, :2]), "[4, 3]", "[4, 2]"),
             (lambda: vae_ext.MLPVAE(input_shape=(1, 2, 5), latent_size=2, hidden_sizes=(4,)).elbo(x[:, :9]),
              "[4, 9]", None)]
    for call, *shapes in cases:
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert all(s in msg for s in shapes if s), msg
        assert "(4, " not in msg, msg
