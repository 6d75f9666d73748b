"""The discretized mixture of logistics (DMoL) as four codebases write it, transcribed to float64 torch,
and inputs that reach every branch of it: the independent oracles of tests/test_dmol_reference.py and
tests/test_porting.py.

Each function keeps its original's layout, constants and order of operations; only the framework
(PixelCNN++ is TensorFlow) and the device handling differ. Read at these commits:

- openai/vdvae ``vae_helpers.py`` ``discretized_mix_logistic_loss`` at 43312d8583a3f798ef674323c56b881fa168b927:
  x (N, H, W, 3), l (N, H, W, 10 M) channels-last; per-dimension loss, shape (N,); ``low_bit`` (FFHQ-256)
  is 5-bit data (1/31, log 15.5).
- openai/pixel-cnn ``pixel_cnn_pp/nn.py`` ``discretized_mix_logistic_loss`` at 0ff8ab51a9685bdb47ea7823ffeaee1c4f2009c6:
  the same layout, TF (``tf.select`` is ``torch.where``); ``sum_all`` the total, else per-sample sums.
- NVlabs/NVAE ``distributions.py`` ``DiscMixLogistic`` at 6934115dfffae0245f551a878b1f7f641df4f5ea, with
  ``utils.reconstruction_loss`` (``-sum(log_prob, dim=[1, 2])``): param (N, 10 M, H, W) channels-first,
  samples in [0, 1] (its log_prob maps them to 2 x - 1), right edge at ``> 0.99`` (not 0.999).
- r9y9/wavenet_vocoder ``wavenet_vocoder/mixture.py`` ``discretized_mix_logistic_loss`` at
  4ae0a5047742de55e395d78ffe6761cb7824f50e: y_hat (B, 3 M, T), y (B, T, 1), ``num_classes`` levels
  (65536 for 16-bit audio), blends branches by multiplying with 0/1 masks.

All four read the parameters after the logits as, per channel c, [M means, M log-scales, M coefficients]
(``reshape(l[..., M:], xs + [3 M])`` / ``view(B, 3, 3 M, H, W)``), the coefficient in channel c's block
being ``coeffs[..., c, :]``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

F64 = torch.float64


# --------------------------------------------------------------------------- openai/vdvae
def _vdvae_log_prob_from_logits(x):
    axis = len(x.shape) - 1
    m = x.max(dim=axis, keepdim=True)[0]
    return x - m - torch.log(torch.exp(x - m).sum(dim=axis, keepdim=True))


def _const_max(t, constant):
    return torch.max(t, torch.ones_like(t) * constant)


def vdvae_dmol_loss(x, l, low_bit=False):
    xs = list(x.shape)
    ls = list(l.shape)
    nr_mix = int(ls[-1] / 10)
    logit_probs = l[:, :, :, :nr_mix]
    l = torch.reshape(l[:, :, :, nr_mix:], xs + [nr_mix * 3])
    means = l[:, :, :, :, :nr_mix]
    log_scales = _const_max(l[:, :, :, :, nr_mix:2 * nr_mix], -7.)
    coeffs = torch.tanh(l[:, :, :, :, 2 * nr_mix:3 * nr_mix])
    x = torch.reshape(x, xs + [1]) + torch.zeros(xs + [nr_mix], dtype=x.dtype)
    m2 = torch.reshape(means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :],
                       [xs[0], xs[1], xs[2], 1, nr_mix])
    m3 = torch.reshape(means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :]
                       + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :], [xs[0], xs[1], xs[2], 1, nr_mix])
    means = torch.cat([torch.reshape(means[:, :, :, 0, :], [xs[0], xs[1], xs[2], 1, nr_mix]), m2, m3], dim=3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    half = 1. / 31. if low_bit else 1. / 255.
    plus_in = inv_stdv * (centered_x + half)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - half)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2. * F.softplus(mid_in)
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.where(cdf_delta > 1e-5, torch.log(_const_max(cdf_delta, 1e-12)),
                                                    log_pdf_mid - np.log(15.5 if low_bit else 127.5))))
    log_probs = log_probs.sum(dim=3) + _vdvae_log_prob_from_logits(logit_probs)
    mixture_probs = torch.logsumexp(log_probs, -1)
    return -1. * mixture_probs.sum(dim=[1, 2]) / np.prod(xs[1:])


# --------------------------------------------------------------------------- openai/pixel-cnn (TF)
def _tf_log_sum_exp(x):
    axis = len(x.shape) - 1
    m = torch.amax(x, axis)
    m2 = torch.amax(x, axis, keepdim=True)
    return m + torch.log(torch.sum(torch.exp(x - m2), axis))


def _tf_log_prob_from_logits(x):
    axis = len(x.shape) - 1
    m = torch.amax(x, axis, keepdim=True)
    return x - m - torch.log(torch.sum(torch.exp(x - m), axis, keepdim=True))


def pixelcnn_dmol_loss(x, l, sum_all=True):
    xs = list(x.shape)
    ls = list(l.shape)
    nr_mix = int(ls[-1] / 10)
    logit_probs = l[:, :, :, :nr_mix]
    l = torch.reshape(l[:, :, :, nr_mix:], xs + [nr_mix * 3])
    means = l[:, :, :, :, :nr_mix]
    log_scales = torch.maximum(l[:, :, :, :, nr_mix:2 * nr_mix], torch.tensor(-7., dtype=l.dtype))
    coeffs = torch.tanh(l[:, :, :, :, 2 * nr_mix:3 * nr_mix])
    x = torch.reshape(x, xs + [1]) + torch.zeros(xs + [nr_mix], dtype=x.dtype)
    m2 = torch.reshape(means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :],
                       [xs[0], xs[1], xs[2], 1, nr_mix])
    m3 = torch.reshape(means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :]
                       + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :], [xs[0], xs[1], xs[2], 1, nr_mix])
    means = torch.cat([torch.reshape(means[:, :, :, 0, :], [xs[0], xs[1], xs[2], 1, nr_mix]), m2, m3], 3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1. / 255.)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1. / 255.)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2. * F.softplus(mid_in)
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.where(cdf_delta > 1e-5,
                                                    torch.log(torch.maximum(cdf_delta, torch.tensor(1e-12, dtype=F64))),
                                                    log_pdf_mid - np.log(127.5))))
    log_probs = torch.sum(log_probs, 3) + _tf_log_prob_from_logits(logit_probs)
    if sum_all:
        return -torch.sum(_tf_log_sum_exp(log_probs))
    return -torch.sum(_tf_log_sum_exp(log_probs), [1, 2])


# --------------------------------------------------------------------------- NVlabs/NVAE
class NVAEDiscMixLogistic:
    def __init__(self, param, num_mix=10, num_bits=8):
        B, C, H, W = param.size()
        self.num_mix = num_mix
        self.logit_probs = param[:, :num_mix, :, :]
        l = param[:, num_mix:, :, :].view(B, 3, 3 * num_mix, H, W)
        self.means = l[:, :, :num_mix, :, :]
        self.log_scales = torch.clamp(l[:, :, num_mix:2 * num_mix, :, :], min=-7.0)
        self.coeffs = torch.tanh(l[:, :, 2 * num_mix:3 * num_mix, :, :])
        self.max_val = 2. ** num_bits - 1

    def log_prob(self, samples):
        assert torch.max(samples) <= 1.0 and torch.min(samples) >= 0.0
        samples = 2 * samples - 1.0
        B, C, H, W = samples.size()
        assert C == 3
        samples = samples.unsqueeze(4)
        samples = samples.expand(-1, -1, -1, -1, self.num_mix).permute(0, 1, 4, 2, 3)
        mean1 = self.means[:, 0, :, :, :]
        mean2 = self.means[:, 1, :, :, :] + self.coeffs[:, 0, :, :, :] * samples[:, 0, :, :, :]
        mean3 = (self.means[:, 2, :, :, :] + self.coeffs[:, 1, :, :, :] * samples[:, 0, :, :, :]
                 + self.coeffs[:, 2, :, :, :] * samples[:, 1, :, :, :])
        means = torch.cat([mean1.unsqueeze(1), mean2.unsqueeze(1), mean3.unsqueeze(1)], dim=1)
        centered = samples - means
        inv_stdv = torch.exp(- self.log_scales)
        plus_in = inv_stdv * (centered + 1. / self.max_val)
        cdf_plus = torch.sigmoid(plus_in)
        min_in = inv_stdv * (centered - 1. / self.max_val)
        cdf_min = torch.sigmoid(min_in)
        log_cdf_plus = plus_in - F.softplus(plus_in)
        log_one_minus_cdf_min = - F.softplus(min_in)
        cdf_delta = cdf_plus - cdf_min
        mid_in = inv_stdv * centered
        log_pdf_mid = mid_in - self.log_scales - 2. * F.softplus(mid_in)
        log_prob_mid_safe = torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-10)),
                                        log_pdf_mid - np.log(self.max_val / 2))
        log_probs = torch.where(samples < -0.999, log_cdf_plus,
                                torch.where(samples > 0.99, log_one_minus_cdf_min, log_prob_mid_safe))
        log_probs = torch.sum(log_probs, 1) + F.log_softmax(self.logit_probs, dim=1)
        return torch.logsumexp(log_probs, dim=1)


def nvae_reconstruction_loss(param, x01, num_mix, num_bits=8):
    """NVAE's utils.reconstruction_loss for a DiscMixLogistic decoder (no crop): per-sample, (N,)."""
    return -torch.sum(NVAEDiscMixLogistic(param, num_mix, num_bits).log_prob(x01), dim=[1, 2])


# --------------------------------------------------------------------------- r9y9/wavenet_vocoder
def _wavenet_log_sum_exp(x):
    axis = len(x.size()) - 1
    m, _ = torch.max(x, dim=axis)
    m2, _ = torch.max(x, dim=axis, keepdim=True)
    return m + torch.log(torch.sum(torch.exp(x - m2), dim=axis))


def wavenet_dmol_loss(y_hat, y, num_classes=256, log_scale_min=-7.0, reduce=True):
    assert y_hat.dim() == 3
    assert y_hat.size(1) % 3 == 0
    nr_mix = y_hat.size(1) // 3
    y_hat = y_hat.transpose(1, 2)
    logit_probs = y_hat[:, :, :nr_mix]
    means = y_hat[:, :, nr_mix:2 * nr_mix]
    log_scales = torch.clamp(y_hat[:, :, 2 * nr_mix:3 * nr_mix], min=log_scale_min)
    y = y.expand_as(means)
    centered_y = y - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_y + 1. / (num_classes - 1))
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_y - 1. / (num_classes - 1))
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)
    log_one_minus_cdf_min = -F.softplus(min_in)
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_y
    log_pdf_mid = mid_in - log_scales - 2. * F.softplus(mid_in)
    inner_inner_cond = (cdf_delta > 1e-5).to(y_hat.dtype)
    inner_inner_out = inner_inner_cond * torch.log(torch.clamp(cdf_delta, min=1e-12)) + \
        (1. - inner_inner_cond) * (log_pdf_mid - np.log((num_classes - 1) / 2))
    inner_cond = (y > 0.999).to(y_hat.dtype)
    inner_out = inner_cond * log_one_minus_cdf_min + (1. - inner_cond) * inner_inner_out
    cond = (y < -0.999).to(y_hat.dtype)
    log_probs = cond * log_cdf_plus + (1. - cond) * inner_out
    log_probs = log_probs + F.log_softmax(logit_probs, -1)
    if reduce:
        return -torch.sum(_wavenet_log_sum_exp(log_probs))
    return -_wavenet_log_sum_exp(log_probs).unsqueeze(-1)


# --------------------------------------------------------------------------- inputs
def dmol_inputs(n, c, spatial, m, *, num_bits=8, seed=0, edge_frac=0.15, exclude_levels=()):
    """(params (N, P, *S), x (N, C, *S)) in float64, channels-first. x on the ``num_bits`` grid scaled
    to [-1, 1] with about ``edge_frac`` of it at each of -1 and +1 (and no value whose level is in
    ``exclude_levels``); the parameters spread so that every branch is taken: means over [-1.2, 1.2],
    log-scales over [-8, 0.5] (some under the -7 clamp), logits and coefficients ~ N(0, 1.5^2)."""
    g = torch.Generator().manual_seed(seed)
    levels = 2 ** num_bits - 1
    k = torch.randint(0, levels + 1, (n, c, *spatial), generator=g)
    r = torch.rand(k.shape, generator=g)
    k = torch.where(r < edge_frac, torch.zeros_like(k), torch.where(r > 1 - edge_frac, torch.full_like(k, levels), k))
    for bad in exclude_levels:
        k = torch.where(k == bad, torch.full_like(k, bad - 1), k)
    x = k.to(F64) * (2.0 / levels) - 1.0
    per = 3 if c == 3 else 2
    logits = torch.randn((n, m, *spatial), generator=g, dtype=F64) * 1.5
    means = torch.rand((n, c, m, *spatial), generator=g, dtype=F64) * 2.4 - 1.2
    log_scales = torch.rand((n, c, m, *spatial), generator=g, dtype=F64) * 8.5 - 8.0
    blocks = [means, log_scales]
    if per == 3:
        blocks.append(torch.randn((n, c, m, *spatial), generator=g, dtype=F64) * 1.5)
    rest = torch.stack(blocks, dim=2).reshape(n, c * per * m, *spatial)
    return torch.cat([logits, rest], dim=1), x


def branch_counts(params, x, *, num_bits=8, log_scale_min=-7.0):
    """{"left", "right", "mid", "centre": count} of (channel, component, pixel) terms, and the smallest
    relative distance of any sigmoid(A) - sigmoid(B) from the 1e-5 threshold and of any log-scale
    from the clamp (the inputs must stay clear of both ties). Plain float64 math, independent of the
    reference."""
    c = x.shape[1]
    m = params.shape[1] // (10 if c == 3 else 3)
    n, spatial = params.shape[0], params.shape[2:]
    per = 3 if c == 3 else 2
    rest = params[:, m:].reshape(n, c, per, m, *spatial)
    xe = x.unsqueeze(2)
    mu = rest[:, :, 0].clone()
    if c == 3:
        a = torch.tanh(rest[:, :, 2])
        mu[:, 1] = mu[:, 1] + a[:, 0] * xe[:, 0]
        mu[:, 2] = mu[:, 2] + a[:, 1] * xe[:, 0] + a[:, 2] * xe[:, 1]
    s = torch.clamp(rest[:, :, 1], min=log_scale_min)
    h = 1.0 / (2 ** num_bits - 1)
    inv = torch.exp(-s)
    delta = torch.sigmoid(inv * (xe - mu + h)) - torch.sigmoid(inv * (xe - mu - h))
    left = (xe < -0.999).expand_as(mu)
    right = (xe > 0.999).expand_as(mu)
    inner = ~left & ~right
    counts = {"left": int(left.sum()), "right": int(right.sum()),
              "mid": int((inner & (delta > 1e-5)).sum()), "centre": int((inner & (delta <= 1e-5)).sum())}
    margin = float(((delta - 1e-5).abs() / 1e-5).min())
    clamp_margin = float((rest[:, :, 1] - log_scale_min).abs().min())
    return counts, min(margin, clamp_margin)
