"""vae_ext.reference.dmol_nll / dmol_sample, the oracle of the fused DMoL op, against the originals.

The likelihood against float64 transcriptions (tests/dmol_originals.py) of VDVAE's loss (8-bit and its
5-bit ``low_bit``), PixelCNN++'s, NVAE's (on data its 0.99 right edge reads as ours) and a WaveNet
vocoder's 1-D loss (8- and 16-bit): value and the gradient of every parameter, on inputs that take
every branch and stay clear of the 1e-5 and clamp ties. The sampler against the mixture's own CDF
(Kolmogorov-Smirnov), its component frequencies (chi-squared), its clamp and its RGB coupling.
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from vae_ext import reference as R

from dmol_originals import (
    branch_counts,
    dmol_inputs,
    nvae_reconstruction_loss,
    pixelcnn_dmol_loss,
    vdvae_dmol_loss,
    wavenet_dmol_loss,
)
from helpers import F32, F64, arg_re, assert_close

# float64. The originals' arithmetic is not exact: their plain sigmoid difference is off by ~1e-16 / 1e-5
# relative, and torch's softplus, which they use, is y itself above 20 (its gradient 1, not sigmoid(y)),
# a relative error of up to 4e-9 (the centre branch) and an absolute one of up to 2e-9 exp(-s) (an edge
# term's gradient, exactly 0 for them); the reference has neither.
RTOL = ATOL_REL = 1e-8


def _value_and_grad(fn, params, seed=7):
    """fn(params) and the gradient of sum(w * fn(params)) for random weights w (grad_output != 1)."""
    p = params.detach().clone().requires_grad_(True)
    out = fn(p)
    w = torch.rand(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype) + 0.5
    (g,) = torch.autograd.grad((out * w).sum(), p)
    return out.detach(), g


def _compare(original, ported, params, what):
    ref, ref_g = _value_and_grad(original, params)
    got, got_g = _value_and_grad(ported, params)
    assert_close(got, ref, rtol=RTOL, atol_rel=ATOL_REL, what=f"{what} value")
    assert_close(got_g, ref_g, rtol=RTOL, atol_rel=ATOL_REL, what=f"{what} gradient")


def _assert_every_branch(params, x, *, num_bits, log_scale_min=-7.0):
    counts, margin = branch_counts(params, x, num_bits=num_bits, log_scale_min=log_scale_min)
    assert min(counts.values()) > 0, f"the inputs miss a branch: {counts}"
    assert margin > 1e-8, f"the inputs sit on a tie (relative margin {margin:g})"


def _channels_last(params, x):
    return params.permute(0, 2, 3, 1).contiguous(), x.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------- the likelihood
@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("low_bit", [False, True], ids=["8bit", "5bit"])
def test_vdvae(m, low_bit):
    bits = 5 if low_bit else 8
    params, x = dmol_inputs(3, 3, (6, 5), m, num_bits=bits, seed=m + 10 * low_bit)
    _assert_every_branch(params, x, num_bits=bits)
    l_nhwc, x_nhwc = _channels_last(params, x)
    _compare(lambda l: vdvae_dmol_loss(x_nhwc, l, low_bit=low_bit),
             lambda l: R.dmol_nll(l.permute(0, 3, 1, 2), x_nhwc.permute(0, 3, 1, 2), num_bits=bits,
                                  reduction="none") / x_nhwc[0].numel(),
             l_nhwc, f"VDVAE {bits}-bit M={m}")


@pytest.mark.parametrize("sum_all", [True, False])
def test_pixelcnn(sum_all):
    params, x = dmol_inputs(2, 3, (7, 4), 10, seed=3)
    _assert_every_branch(params, x, num_bits=8)
    l_nhwc, x_nhwc = _channels_last(params, x)
    _compare(lambda l: pixelcnn_dmol_loss(x_nhwc, l, sum_all=sum_all),
             lambda l: R.dmol_nll(l.permute(0, 3, 1, 2), x_nhwc.permute(0, 3, 1, 2),
                                  reduction="sum" if sum_all else "none"),
             l_nhwc, f"PixelCNN++ sum_all={sum_all}")


@pytest.mark.parametrize("bits", [8, 5])
def test_nvae(bits):
    """NVAE's right edge is ``> 0.99``: at 8 bits level 254 (0.992) is an edge for NVAE and an inner
    bin for everyone else, so the 8-bit data leave it out (at 7 bits or fewer no level lies between)."""
    params, x = dmol_inputs(3, 3, (5, 6), 4, num_bits=bits, seed=bits, exclude_levels=(254,) if bits == 8 else ())
    _assert_every_branch(params, x, num_bits=bits)
    x01 = (x + 1) / 2
    _compare(lambda p: nvae_reconstruction_loss(p, x01, 4, bits),
             lambda p: R.dmol_nll(p, 2 * x01 - 1, num_bits=bits, reduction="none"), params, f"NVAE {bits}-bit")


def test_nvae_differs_only_at_level_254():
    """The exclusion above is needed, and is the only difference: with level 254 present the two
    disagree, and agree again once those pixels' terms are taken out."""
    params, x = dmol_inputs(2, 3, (6, 6), 3, seed=5, exclude_levels=(254,))
    k = torch.zeros_like(x, dtype=torch.bool)
    k[:, 1, 2, 3] = True
    x = torch.where(k, torch.full_like(x, 254 / 127.5 - 1), x)
    x01 = (x + 1) / 2
    nvae = nvae_reconstruction_loss(params, x01, 3)
    ours = R.dmol_nll(params, x, reduction="none")
    assert ((nvae - ours).abs() > 1e-6).all()
    # the pixel (2, 3) alone: its own log-probability under each definition accounts for the difference
    px = (slice(None), slice(None), slice(2, 3), slice(3, 4))
    diff_px = nvae_reconstruction_loss(params[px], x01[px], 3) - R.dmol_nll(params[px], x[px], reduction="none")
    assert_close(nvae - ours, diff_px, rtol=1e-8, atol=1e-8, what="NVAE - ours")


@pytest.mark.parametrize(("bits", "log_scale_min"), [(16, -7.0), (16, math.log(1e-14)), (8, -7.0)])
def test_wavenet(bits, log_scale_min):
    params, x = dmol_inputs(2, 1, (400,), 5, num_bits=bits, seed=bits, edge_frac=0.02)
    if log_scale_min < -8:  # reach its clamp too
        params[:, 10:15] = params[:, 10:15] * 4.5 - 1.0
    _assert_every_branch(params, x, num_bits=bits, log_scale_min=log_scale_min)
    y = x.transpose(1, 2).contiguous()  # (B, T, 1)
    _compare(lambda p: wavenet_dmol_loss(p, y, num_classes=2 ** bits, log_scale_min=log_scale_min),
             lambda p: R.dmol_nll(p, y.transpose(1, 2), num_bits=bits, log_scale_min=log_scale_min),
             params, f"WaveNet {bits}-bit")


@pytest.mark.parametrize("c", [1, 3])
def test_any_spatial_shape(c):
    """(N, C, H, W), (N, C, H*W) and one (N*H*W, C) call per pixel give the same per-sample sums."""
    params, x = dmol_inputs(2, c, (3, 4), 3, seed=c)
    want = R.dmol_nll(params, x, reduction="none")
    flat = R.dmol_nll(params.flatten(2), x.flatten(2), reduction="none")
    per_px = R.dmol_nll(params.permute(0, 2, 3, 1).reshape(24, -1), x.permute(0, 2, 3, 1).reshape(24, c),
                        reduction="none")
    assert_close(flat, want, rtol=1e-14, what="(N, C, H*W)")
    assert_close(per_px.reshape(2, 12).sum(1), want, rtol=1e-13, what="0-d spatial")


def test_reductions():
    params, x = dmol_inputs(4, 3, (3, 3), 2, seed=1)
    none = R.dmol_nll(params, x, reduction="none")
    assert none.shape == (4,)
    assert_close(R.dmol_nll(params, x), none.sum(), rtol=1e-14, what="sum")
    assert_close(R.dmol_nll(params, x, reduction="mean"), none.mean(), rtol=1e-14, what="mean")
    assert R.dmol_nll(params[:0], x[:0], reduction="none").shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_computed_in_float32(dtype):
    params, x = dmol_inputs(2, 3, (4, 4), 3, seed=2)
    p, xx = params.to(dtype), x.to(dtype)
    got = R.dmol_nll(p, xx, reduction="none")
    assert got.dtype == F32
    assert torch.equal(got, R.dmol_nll(p.float(), xx.float(), reduction="none"))


def test_nan_in_nan_out():
    params, x = dmol_inputs(3, 3, (4, 4), 3, seed=4)
    bad = params.clone()
    bad[1, 7, 2, 2] = float("nan")
    want = R.dmol_nll(params, x, reduction="none")
    got = R.dmol_nll(bad, x, reduction="none")
    assert torch.isnan(got[1]) and torch.equal(got[[0, 2]], want[[0, 2]])
    xb = x.clone()
    xb[2, 0, 1, 1] = float("nan")
    assert torch.isnan(R.dmol_nll(params, xb, reduction="none")[2])


@pytest.mark.parametrize("dtype", [F32, F64])
def test_unselected_branches_leak_nothing(dtype):
    """Scales so wide that exp(-s) underflows (the mid branch's d = 2 h exp(-s) is 0), means far
    away, log-scales under the clamp, pixels on both edges: the gradient is finite everywhere, and
    exactly 0 for log-scales the clamp holds."""
    params, x = dmol_inputs(2, 3, (4, 4), 3, seed=6)
    params = params.to(dtype)
    rest = params[:, 3:].reshape(2, 3, 3, 3, 4, 4)
    rest[:, :, 1, 0] = 800.0 if dtype == F64 else 120.0      # exp(-s) == 0
    rest[:, :, 0, 1] = 1e6                                   # means far off the data
    rest[:, :, 1, 2] = -30.0                                 # under the clamp
    p = params.requires_grad_(True)
    loss = R.dmol_nll(p, x.to(dtype))
    (g,) = torch.autograd.grad(loss, p)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    assert (g[:, 3:].reshape(2, 3, 3, 3, 4, 4)[:, :, 1, 2] == 0).all()


def test_gradcheck():
    params, x = dmol_inputs(1, 3, (2, 3), 2, seed=8, edge_frac=0.25)
    _assert_every_branch(params, x, num_bits=8)
    params = params.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: R.dmol_nll(p, x, reduction="none"), (params,))


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"params": torch.zeros(2, 31, 3)}, "params"),            # P not 10 M
    ({"x": torch.zeros(2, 2, 3)}, "x"),                       # C = 2
    ({"params": torch.zeros(2, 30, 4)}, "params"),            # spatial mismatch
    ({"num_bits": 0}, "num_bits"), ({"num_bits": 17}, "num_bits"),
    ({"reduction": "pixel_mean"}, "reduction"), ({"log_scale_min": float("nan")}, "log_scale_min"),
])
def test_bad_arguments(kwargs, name):
    args = {"params": torch.zeros(2, 30, 3), "x": torch.zeros(2, 3, 3)} | kwargs
    params, x = args.pop("params"), args.pop("x")
    with pytest.raises((ValueError, TypeError), match=arg_re(name)):
        R.dmol_nll(params, x, **args)


# --------------------------------------------------------------------------- the sampler
def _constant_params(blocks, t):
    """(1, P, t) params repeating one pixel's P values over t pixels."""
    col = torch.tensor([v for b in blocks for v in b], dtype=F64)
    return col[None, :, None].expand(1, col.numel(), t).contiguous()


_LOGITS, _MEANS, _LOG_SCALES = [0.5, -0.3, 1.0], [-0.4, 0.1, 0.5], [-3.0, -2.5, -3.5]


def _mixture_cdf(logits, means, log_scales):
    w = torch.softmax(torch.tensor(logits, dtype=F64), 0).tolist()

    def cdf(y):
        return sum(wi * stats.logistic.cdf(y, mi, math.exp(si)) for wi, mi, si in zip(w, means, log_scales))
    return cdf


def test_sample_ks_against_the_mixture_cdf():
    p = _constant_params([_LOGITS, _MEANS, _LOG_SCALES], 100_000)
    y = R.dmol_sample(p, num_channels=1, generator=torch.Generator().manual_seed(0)).flatten().numpy()
    assert stats.kstest(y, _mixture_cdf(_LOGITS, _MEANS, _LOG_SCALES)).pvalue > 1e-3
    # the test has power: the same components with the weights permuted are rejected
    wrong = _mixture_cdf([_LOGITS[2], _LOGITS[0], _LOGITS[1]], _MEANS, _LOG_SCALES)
    assert stats.kstest(y, wrong).pvalue < 1e-6


def test_sample_component_frequencies():
    """Gumbel-max picks component m with probability softmax(logits)_m (chi-squared on well-separated
    components)."""
    logits, means = [1.0, -0.5, 0.2, 0.0], [-0.75, -0.25, 0.25, 0.75]
    p = _constant_params([logits, means, [-6.0] * 4], 50_000)
    y = R.dmol_sample(p, num_channels=1, generator=torch.Generator().manual_seed(1)).flatten()
    k = torch.bucketize(y, torch.tensor([-0.5, 0.0, 0.5], dtype=F64))
    counts = torch.bincount(k, minlength=4).double()
    expected = torch.softmax(torch.tensor(logits, dtype=F64), 0) * y.numel()
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3


def test_sample_clamped_to_the_interval():
    """A component centred beyond +1 puts its mass past 1 on exactly 1.0 (clamped, not rounded)."""
    p = _constant_params([[0.0], [1.2], [math.log(0.2)]], 40_000)
    y = R.dmol_sample(p, num_channels=1, generator=torch.Generator().manual_seed(2)).flatten()
    assert y.min() >= -1 and y.max() <= 1
    frac, want = (y == 1.0).double().mean().item(), 1 / (1 + math.exp(-(1.2 - 1) / 0.2))  # P(y > 1)
    assert abs(frac - want) < 5 * math.sqrt(want * (1 - want) / y.numel())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sample_rgb_coupling(sign):
    """M = 1, zero means, equal scales: G = y_G + alpha_0 R, so corr(R, G) = alpha_0 / sqrt(1 + alpha_0^2)
    and G - alpha_0 R is independent of R; alpha_1 = 0 and alpha_2 = -alpha_0 couple B to G alone."""
    a_raw = sign * 1.0
    s = math.log(0.1)
    blocks = [[0.0], [0.0], [s], [a_raw], [0.0], [s], [0.0], [0.0], [s], [-a_raw]]
    p = _constant_params(blocks, 60_000)
    r, g, b = R.dmol_sample(p, num_channels=3, generator=torch.Generator().manual_seed(3))[0]
    a = math.tanh(a_raw)

    def corr(u, v):
        return torch.corrcoef(torch.stack([u, v]))[0, 1].item()
    assert abs(corr(r, g) - a / math.sqrt(1 + a * a)) < 0.02
    assert math.copysign(1, corr(r, g)) == sign and math.copysign(1, corr(g, b)) == -sign
    assert abs(corr(g - a * r, r)) < 0.02
    assert abs(corr(b + a * g, r)) < 0.02


def test_sample_shapes_dtypes_and_generator():
    params, _ = dmol_inputs(2, 3, (4, 5), 3, seed=9)
    a = R.dmol_sample(params, num_channels=3, generator=torch.Generator().manual_seed(5))
    b = R.dmol_sample(params, num_channels=3, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 3, 4, 5) and a.dtype == F64 and torch.equal(a, b)
    assert a.abs().max() <= 1
    assert R.dmol_sample(params.half(), num_channels=3).dtype == torch.float16
    audio, _ = dmol_inputs(2, 1, (7,), 4, seed=9)
    assert R.dmol_sample(audio, num_channels=1).shape == (2, 1, 7)
    with pytest.raises(ValueError, match=arg_re("params")):
        R.dmol_sample(audio, num_channels=3)
    with pytest.raises(ValueError, match=arg_re("num_channels")):
        R.dmol_sample(params, num_channels=2)
