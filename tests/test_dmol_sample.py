"""vae_ext.dmol_sample: the same samples on 1 and 2 threads and for the same generator seed, the
distribution of the mixture (a KS test against its own CDF, the reference sampler agreeing), the
clamp to [-1, 1] and the RGB coupling."""
from __future__ import annotations

import math

import torch
from scipy import stats

import vae_ext
from vae_ext import reference as R

from helpers import F32, F64


def _mixture_1d(n, m=3, seed=0):
    """(params (n, 3m) with one pixel each (0-D spatial), the same mixture for every sample)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, generator=g, dtype=F64)
    means = torch.linspace(-0.5, 0.5, m, dtype=F64)
    scales = torch.full((m,), -3.5, dtype=F64) + 0.5 * torch.rand(m, generator=g, dtype=F64)
    return torch.cat([logits, means, scales]).expand(n, 3 * m).contiguous(), (logits, means, scales)


def _mixture_cdf(v, logits, means, log_scales):
    w = torch.softmax(logits, 0).numpy()
    z = (v[:, None] - means.numpy()) / torch.exp(log_scales).numpy()
    cdf = (w / (1 + torch.exp(-torch.as_tensor(z)).numpy())).sum(1)
    return cdf


def test_distribution_ks():
    params, (logits, means, scales) = _mixture_1d(20000)
    s = vae_ext.dmol_sample(params, num_channels=1, generator=torch.Generator().manual_seed(1)).view(-1)
    # unclamped (scales <= e^-3, means in [-0.5, 0.5]: the mass outside [-1, 1] is ~1e-4): the
    # sample's CDF is the mixture's
    res = stats.kstest(s.numpy(), lambda v: _mixture_cdf(v, logits, means, scales))
    assert res.pvalue > 1e-3, res
    ref = R.dmol_sample(params, num_channels=1, generator=torch.Generator().manual_seed(2)).view(-1)
    assert stats.ks_2samp(s.numpy(), ref.numpy()).pvalue > 1e-3


def test_threads_and_seed():
    params = torch.randn(4, 30, 17, 13)
    old = torch.get_num_threads()
    out = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(vae_ext.dmol_sample(params, num_channels=3, generator=torch.Generator().manual_seed(5)))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0], out[1])
    other = vae_ext.dmol_sample(params, num_channels=3, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(out[0], other)
    torch.manual_seed(3)
    a = vae_ext.dmol_sample(params, num_channels=3)
    torch.manual_seed(3)
    assert torch.equal(a, vae_ext.dmol_sample(params, num_channels=3))
    cl = vae_ext.dmol_sample(params.contiguous(memory_format=torch.channels_last), num_channels=3,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(cl, out[0])


def test_clamped_and_dtypes():
    params = torch.randn(3, 20, 8, 8) * 3
    for dt in (F32, F64, torch.float16, torch.bfloat16):
        s = vae_ext.dmol_sample(params.to(dt), num_channels=3, generator=torch.Generator().manual_seed(0))
        assert s.dtype == dt and s.shape == (3, 3, 8, 8)
        assert s.min() >= -1 and s.max() <= 1 and ((s == 1) | (s == -1)).any()


def test_rgb_coupling_visible():
    """One component, tiny scales: G = tanh(a0) R + mu_G exactly as the coupling says; B likewise."""
    n = 4000
    g = torch.Generator().manual_seed(0)
    p = torch.zeros(n, 10, dtype=F64)
    p[:, 1] = torch.rand(n, generator=g, dtype=F64) * 1.2 - 0.6   # mu_R
    p[:, 2] = -7.0                                                  # s_R
    p[:, 4], p[:, 5] = 0.1, -7.0                                    # mu_G, s_G
    p[:, 3] = math.atanh(0.5)                                       # alpha_0 (R's block)
    p[:, 7], p[:, 8] = -0.2, -7.0                                   # mu_B, s_B
    p[:, 6] = math.atanh(-0.3)                                      # alpha_1 (G's block)
    p[:, 9] = math.atanh(0.25)                                      # alpha_2 (B's block)
    s = vae_ext.dmol_sample(p, num_channels=3, generator=g)
    r, gr, b = s[:, 0], s[:, 1], s[:, 2]
    noise = 12 * math.exp(-7.0)  # |logistic(0, e^-7)| < 12 e^-7 for u in [1e-5, 1 - 1e-5]
    assert (r - p[:, 1]).abs().max() < noise
    assert (gr - (0.1 + 0.5 * r)).abs().max() < 2 * noise
    assert (b - (-0.2 - 0.3 * r + 0.25 * gr)).abs().max() < 3 * noise
    assert torch.corrcoef(torch.stack([r, gr]))[0, 1] > 0.99
