"""docs/porting.md's hierarchical-VAE latent layers on vae_ext.gaussian_latent: VDVAE's DecBlock
(openai/vdvae vae.py, with vae_helpers.py's draw_gaussian_diag_samples and gaussian_analytical_kl)
and NVAE's latent layer (NVlabs/NVAE distributions.Normal, model.py's decoder tower: the prior
from the decoder state, the residual posterior, the KL and the combiner cell).

The originals' formulas are transcribed here. They draw eps with torch's normal_; here each is handed
the eps gaussian_latent draws (the Philox stream of vae_ext.reparameterize at the same generator
state), so both sides compute on the same numbers. In float64: z, the KL and the layer's output, and
the gradient of every input and parameter, with grad_output != 1 on the output and the KL together.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vae_ext

from helpers import F64, assert_close

TOL = dict(rtol=1e-10, atol=1e-12)


def _eps(shape, seed):
    """The eps gaussian_latent draws at manual_seed(seed): reparameterize's z for mu = 0, logvar = 0."""
    zeros = torch.zeros(shape, dtype=F64)
    return vae_ext.reparameterize(zeros, zeros, generator=torch.Generator().manual_seed(seed))


def _conv(cin, cout, seed):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(cin, cout, 1).to(F64)


def _grads_of(outputs, weights, leaves):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, leaves)


def _compare(original, ported, leaves, what):
    ref = original()
    got = ported()
    g = torch.Generator().manual_seed(99)
    weights = [torch.randn(r.shape, generator=g, dtype=F64) for r in ref]  # grad_output != 1, on every output
    ref_grads = _grads_of(ref, weights, leaves)
    got_grads = _grads_of(got, weights, leaves)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, **TOL, what=f"{what} output {i}")
    for i, (a, b) in enumerate(zip(got_grads, ref_grads)):
        assert_close(a, b, **TOL, what=f"{what} grad of leaf {i}")


# ------------------------------------------------------------------------------------------ VDVAE
# vae_helpers.py (openai/vdvae): the KL of N(mu1, sigma1) to N(mu2, sigma2) per element, and the draw
# (eps passed in here instead of torch.empty_like(mu).normal_()).

def vdvae_gaussian_analytical_kl(mu1, mu2, logsigma1, logsigma2):
    return -0.5 + logsigma2 - logsigma1 + 0.5 * (logsigma1.exp() ** 2 + (mu1 - mu2) ** 2) / (logsigma2.exp() ** 2)


def vdvae_draw_gaussian_diag_samples(mu, logsigma, eps):
    return torch.exp(logsigma) * eps + mu


class DecBlock(torch.nn.Module):
    """vae.py's DecBlock with its Blocks as single 1x1 convs (they only feed the latent layer):
    enc(cat(x, acts)) -> (qm, qv), prior(x) -> (pm, pv, xpp), z_proj and a residual resnet."""

    def __init__(self, width, zdim):
        super().__init__()
        self.zdim = zdim
        self.enc = _conv(2 * width, 2 * zdim, 1)
        self.prior = _conv(width, 2 * zdim + width, 2)
        self.z_proj = _conv(zdim, width, 3)
        self.resnet = _conv(width, width, 4)

    def original(self, x, acts, eps):
        # sample(): the per-element KL, summed per image as VAE.forward does
        qm, qv = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        feats = self.prior(x)
        pm, pv, xpp = feats[:, :self.zdim, ...], feats[:, self.zdim:self.zdim * 2, ...], feats[:, self.zdim * 2:, ...]
        x = x + xpp
        z = vdvae_draw_gaussian_diag_samples(qm, qv, eps)
        kl = vdvae_gaussian_analytical_kl(qm, pm, qv, pv)
        # forward()
        x = x + self.z_proj(z)
        x = x + self.resnet(x)
        return x, z, kl.sum(dim=(1, 2, 3))

    def ported(self, x, acts, seed):
        qm, qv = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        feats = self.prior(x)
        pm, pv, xpp = feats[:, :self.zdim, ...], feats[:, self.zdim:self.zdim * 2, ...], feats[:, self.zdim * 2:, ...]
        x = x + xpp
        z, kl = vae_ext.gaussian_latent(qm, qv, pm, pv, scale="logsigma",
                                        generator=torch.Generator().manual_seed(seed))
        x = x + self.z_proj(z)
        x = x + self.resnet(x)
        return x, z, kl


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_vdvae_dec_block(layout):
    """The channel slices of the enc and prior outputs go in as they are (non-contiguous views of
    an NCHW or a channels_last tensor); x, z, the per-image KL and every gradient agree."""
    width, zdim, shape = 6, 3, (5, 6, 4, 3)
    block = DecBlock(width, zdim)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=F64)
    acts = torch.randn(shape, generator=g, dtype=F64)
    if layout == "channels_last":
        block = block.to(memory_format=torch.channels_last)
        x, acts = x.to(memory_format=torch.channels_last), acts.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    acts.requires_grad_(True)
    eps = _eps((shape[0], zdim, *shape[2:]), seed=11)
    leaves = [x, acts, *block.parameters()]
    _compare(lambda: block.original(x, acts, eps), lambda: block.ported(x, acts, 11), leaves, f"VDVAE {layout}")


def test_vdvae_kl_formula_alone():
    """gaussian_analytical_kl(mu1, mu2, logsigma1, logsigma2) summed per sample, with a prior shared
    by the batch (broadcast), is gaussian_latent's kl; its gradients reach all four."""
    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(s, generator=g, dtype=F64).requires_grad_(True)
              for s in ((4, 3, 5), (4, 3, 5), (3, 1), (3, 5))]
    mu1, logsigma1, mu2, logsigma2 = leaves
    eps = _eps((4, 3, 5), seed=5)

    def original():
        z = vdvae_draw_gaussian_diag_samples(mu1, logsigma1, eps)
        return z, vdvae_gaussian_analytical_kl(mu1, mu2, logsigma1, logsigma2).sum(dim=(1, 2))

    def ported():
        return vae_ext.gaussian_latent(mu1, logsigma1, mu2, logsigma2, scale="logsigma",
                                       generator=torch.Generator().manual_seed(5))

    _compare(original, ported, leaves, "VDVAE kl")


# ------------------------------------------------------------------------------------------- NVAE
# distributions.py (NVlabs/NVAE): Normal soft-clamps mu and log_sigma to [-5, 5] and adds 0.01 to
# sigma; sample() draws eps with normal_ (passed in here: sample_given_eps).

def nvae_soft_clamp5(x):
    return x.div(5.).tanh_().mul(5.)


class NVAENormal:
    def __init__(self, mu, log_sigma):
        self.mu = nvae_soft_clamp5(mu)
        log_sigma = nvae_soft_clamp5(log_sigma)
        self.sigma = torch.exp(log_sigma) + 1e-2

    def sample_given_eps(self, eps):
        return eps * self.sigma + self.mu

    def log_p(self, samples):
        normalized_samples = (samples - self.mu) / self.sigma
        return -0.5 * normalized_samples * normalized_samples - 0.5 * math.log(2 * math.pi) - torch.log(self.sigma)

    def kl(self, normal_dist):
        term1 = (self.mu - normal_dist.mu) / normal_dist.sigma
        term2 = self.sigma / normal_dist.sigma
        return 0.5 * (term1 * term1 + term2 * term2) - 0.5 - torch.log(term2)


def nvae_normal_params(mu, log_sigma):
    """Normal's (mu, sigma) as gaussian_latent's (mu, log sigma): log(exp(clamped) + 0.01)."""
    log_sigma = nvae_soft_clamp5(log_sigma)
    return nvae_soft_clamp5(mu), torch.logaddexp(log_sigma, log_sigma.new_tensor(math.log(1e-2)))


class NVAELayer(torch.nn.Module):
    """One group of model.py's decoder tower (res_dist): the prior from the decoder state s
    (dec_sampler: ELU then a 1x1 conv), the posterior's residual from the encoder combiner's features
    (enc_sampler), the KL, then the combiner cell conv(cat(s, z))."""

    def __init__(self, channels, latents):
        super().__init__()
        self.dec_sampler = _conv(channels, 2 * latents, 5)
        self.enc_sampler = _conv(channels, 2 * latents, 6)
        self.combiner = _conv(channels + latents, channels, 7)

    def params(self, s, ftr):
        mu_p, log_sig_p = torch.chunk(self.dec_sampler(F.elu(s)), 2, dim=1)
        mu_q, log_sig_q = torch.chunk(self.enc_sampler(ftr), 2, dim=1)
        return mu_p, log_sig_p, mu_q, log_sig_q

    def original(self, s, ftr, eps, kl_mode):
        mu_p, log_sig_p, mu_q, log_sig_q = self.params(s, ftr)
        dist = NVAENormal(mu_p + mu_q, log_sig_p + log_sig_q)
        z = dist.sample_given_eps(eps)
        log_q_conv = dist.log_p(z)
        prior = NVAENormal(mu_p, log_sig_p)
        log_p_conv = prior.log_p(z)
        kl_per_var = dist.kl(prior) if kl_mode == "analytic" else log_q_conv - log_p_conv
        s = self.combiner(torch.cat([s, z], dim=1))
        return s, z, torch.sum(kl_per_var, dim=[1, 2, 3])

    def ported(self, s, ftr, seed, kl_mode):
        mu_p, log_sig_p, mu_q, log_sig_q = self.params(s, ftr)
        z, kl = vae_ext.gaussian_latent(*nvae_normal_params(mu_p + mu_q, log_sig_p + log_sig_q),
                                        *nvae_normal_params(mu_p, log_sig_p), scale="logsigma", kl=kl_mode,
                                        generator=torch.Generator().manual_seed(seed))
        s = self.combiner(torch.cat([s, z], dim=1))
        return s, z, kl


@pytest.mark.parametrize("kl_mode", ["analytic", "sample"])
def test_nvae_layer(kl_mode):
    """NVAE's q.kl(p) (no flows) is kl="analytic"; its log_q_conv - log_p_conv (the flow path, with
    no flow cell in between) is kl="sample"; both summed per image as kl_all."""
    channels, latents, shape = 6, 4, (3, 6, 5, 4)
    layer = NVAELayer(channels, latents)
    g = torch.Generator().manual_seed(8)
    s = (2 * torch.randn(shape, generator=g, dtype=F64)).requires_grad_(True)  # some values clamp softly
    ftr = (2 * torch.randn(shape, generator=g, dtype=F64)).requires_grad_(True)
    eps = _eps((shape[0], latents, *shape[2:]), seed=12)
    leaves = [s, ftr, *layer.parameters()]
    _compare(lambda: layer.original(s, ftr, eps, kl_mode), lambda: layer.ported(s, ftr, 12, kl_mode), leaves,
             f"NVAE {kl_mode}")


def test_nvae_first_group():
    """The first group: q from the encoder alone, p = Normal(0, 0), whose sigma is 1.01, not 1:
    a 0-d prior (0, log 1.01), broadcast to every element."""
    g = torch.Generator().manual_seed(9)
    mu_q, log_sig_q = (torch.randn((4, 3, 2, 2), generator=g, dtype=F64).requires_grad_(True) for _ in range(2))
    eps = _eps((4, 3, 2, 2), seed=13)

    def original():
        dist = NVAENormal(mu_q, log_sig_q)
        z = dist.sample_given_eps(eps)
        prior = NVAENormal(torch.zeros_like(z), torch.zeros_like(z))
        return z, torch.sum(dist.kl(prior), dim=[1, 2, 3])

    def ported():
        pmu, pls = nvae_normal_params(torch.zeros((), dtype=F64), torch.zeros((), dtype=F64))
        return vae_ext.gaussian_latent(*nvae_normal_params(mu_q, log_sig_q), pmu, pls, scale="logsigma",
                                       generator=torch.Generator().manual_seed(13))

    _compare(original, ported, [mu_q, log_sig_q], "NVAE first group")
