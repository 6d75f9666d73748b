"""docs/porting.md: each loss of the codebases people port from, against its vae_ext equivalent.

Every original formula is written here as its project writes it in the version docs/porting.md
names (pytorch/examples vae/main.py, PyTorch-VAE's VanillaVAE.loss_function, pythae's
VAE.loss_function from 0.1.2 on and before it, diffusers' DiagonalGaussianDistribution.kl as
AutoencoderKL's training uses it; the DMoL losses of VDVAE, PixelCNN++, NVAE and a WaveNet vocoder,
transcribed in dmol_originals.py), evaluated in float64, and compared with the one vae_ext call
docs/porting.md gives for it: the value, every term it returns and the gradient of every input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vae_ext

from dmol_originals import (
    dmol_inputs,
    nvae_reconstruction_loss,
    pixelcnn_dmol_loss,
    vdvae_dmol_loss,
    wavenet_dmol_loss,
)
from helpers import F64, assert_close


def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    loss = out[0] if isinstance(out, (tuple, list)) else out
    (loss * 1.7).sum().backward()  # grad_output != 1
    return out, [t.grad for t in leaves]


def _compare(original, ported, inputs, what):
    ref, ref_grads = _grads(original, *inputs)
    got, got_grads = _grads(ported, *inputs)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert_close(a, b, rtol=1e-12, atol=1e-12, what=f"{what} output {i}")
    for i, (a, b) in enumerate(zip(got_grads, ref_grads)):
        assert_close(a, b, rtol=1e-12, atol=1e-12, what=f"{what} grad of input {i}")


def _images(shape, seed, kind="prob"):
    g = torch.Generator().manual_seed(seed)
    if kind == "prob":
        return torch.rand(shape, generator=g, dtype=F64) * 0.98 + 0.01
    return torch.randn(shape, generator=g, dtype=F64)


def test_pytorch_examples_vae():
    """pytorch/examples vae/main.py: BCE summed over the batch + the summed KL."""
    def loss_function(recon_x, x, mu, logvar):
        BCE = F.binary_cross_entropy(recon_x, x.view(-1, 784), reduction="sum")
        KLD = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return BCE + KLD

    x = _images((16, 1, 28, 28), 1)
    ported = vae_ext.FusedELBOLoss()
    _compare(lambda r, m, lv: loss_function(r, x, m, lv), lambda r, m, lv: ported(r, x, m, lv),
             (_images((16, 784), 2), _images((16, 20), 3, "normal"), _images((16, 20), 4, "normal")),
             "pytorch/examples")


@pytest.mark.parametrize("kld_weight", [0.00025, 1.0])
def test_pytorch_vae_vanilla_vae(kld_weight):
    """PyTorch-VAE VanillaVAE.loss_function: the MSE averaged over every element, plus kld_weight
    times the batch mean of the per-sample KL; it returns the loss, the MSE and -KLD."""
    def loss_function(recons, input, mu, log_var):
        recons_loss = F.mse_loss(recons, input)
        kld_loss = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1), dim=0)
        loss = recons_loss + kld_weight * kld_loss
        return loss, recons_loss, -kld_loss

    x = _images((8, 3, 16, 16), 5, "normal")

    def ported(r, m, lv):
        loss, rec, kl = vae_ext.elbo_loss(r, x, m, lv, recon="mse", reduction="pixel_mean", beta=kld_weight,
                                          return_terms=True)
        return loss, rec, -kl

    _compare(lambda r, m, lv: loss_function(r, x, m, lv), ported,
             (_images((8, 3, 16, 16), 6, "normal"), _images((8, 128), 7, "normal"), _images((8, 128), 8, "normal")),
             "PyTorch-VAE")


def test_pythae_vae_since_0_1_2():
    """pythae >= 0.1.2 (its "Unify gaussian likelihoods", the current release): the "mse"
    reconstruction is half the squared error, so the port is half of elbo_loss with beta=2."""
    def loss_function(recon_x, x, mu, log_var):
        recon_loss = 0.5 * F.mse_loss(recon_x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1),
                                      reduction="none").sum(dim=-1)
        KLD = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
        return (recon_loss + KLD).mean(dim=0), recon_loss.mean(dim=0), KLD.mean(dim=0)

    x = _images((6, 1, 28, 28), 14)

    def ported(r, m, lv):
        loss, rec, kl = vae_ext.elbo_loss(r, x, m, lv, recon="mse", reduction="mean", beta=2.0, return_terms=True)
        return 0.5 * loss, 0.5 * rec, kl

    _compare(lambda r, m, lv: loss_function(r, x, m, lv), ported,
             (_images((6, 1, 28, 28), 15), _images((6, 16), 16, "normal"), _images((6, 16), 17, "normal")),
             "pythae >= 0.1.2 mse")


@pytest.mark.parametrize("reconstruction_loss", ["mse", "bce"])
def test_pythae_vae(reconstruction_loss):
    """pythae VAE.loss_function before 0.1.2 ("mse": the plain squared error) and its "bce" in every
    version: per-sample sums, averaged over the batch; it returns the loss and the batch means of
    the reconstruction term and of the KL."""
    def loss_function(recon_x, x, mu, log_var):
        if reconstruction_loss == "mse":
            recon_loss = F.mse_loss(recon_x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1),
                                    reduction="none").sum(dim=-1)
        else:
            recon_loss = F.binary_cross_entropy(recon_x.reshape(x.shape[0], -1), x.reshape(x.shape[0], -1),
                                                reduction="none").sum(dim=-1)
        KLD = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
        return (recon_loss + KLD).mean(dim=0), recon_loss.mean(dim=0), KLD.mean(dim=0)

    x = _images((6, 1, 28, 28), 9)

    def ported(r, m, lv):
        return vae_ext.elbo_loss(r, x, m, lv, recon=reconstruction_loss, reduction="mean", return_terms=True)

    _compare(lambda r, m, lv: loss_function(r, x, m, lv), ported,
             (_images((6, 1, 28, 28), 10), _images((6, 16), 11, "normal"), _images((6, 16), 12, "normal")),
             f"pythae {reconstruction_loss}")


class _DiagonalGaussianDistribution:
    """diffusers' DiagonalGaussianDistribution (its mean, logvar and kl() against N(0, I))."""

    def __init__(self, parameters):
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.var = torch.exp(self.logvar)

    def kl(self):
        return 0.5 * torch.sum(torch.pow(self.mean, 2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_diffusers_autoencoder_kl(reduction):
    """AutoencoderKL's KL term: posterior.kl() per sample (N, C, H, W latents, the encoder's
    moments split in two and logvar clamped to [-30, 20]); training averages it over the batch
    (sum / N). Extreme moments reach the clamp on both sides."""
    def original(moments):
        kl = _DiagonalGaussianDistribution(moments).kl()
        return {"none": kl, "sum": kl.sum(), "mean": torch.sum(kl) / kl.shape[0]}[reduction]

    def ported(moments):
        posterior = _DiagonalGaussianDistribution(moments)
        return vae_ext.gaussian_kl(posterior.mean, posterior.logvar, reduction=reduction)

    moments = _images((4, 8, 8, 8), 13, "normal") * 3
    moments[0, 4, 0, 0], moments[1, 5, 1, 1] = 40.0, -45.0  # logvar beyond the clamp
    ref, ref_grads = _grads(original, moments)
    got, got_grads = _grads(ported, moments)
    assert_close(got, ref, rtol=1e-12, what="diffusers kl")
    assert_close(got_grads[0], ref_grads[0], rtol=1e-12, atol=1e-12, what="diffusers kl grad")


# --------------------------------------------------------------------------- DMoL
# The ported calls run through vae_ext.reference.dmol_nll, and through the fused vae_ext.dmol_nll where
# this build has it; the fused op is checked against the reference the same way in tests/test_dmol*.py.
_DMOL_IMPLS = [
    pytest.param("reference", id="reference"),
    pytest.param("fused", id="fused", marks=pytest.mark.skipif(not hasattr(vae_ext, "dmol_nll"),
                                                              reason="vae_ext.dmol_nll not built yet")),
]


def _dmol_nll(impl):
    return vae_ext.reference.dmol_nll if impl == "reference" else vae_ext.dmol_nll


def _compare_dmol(original, ported, params, what):
    """Value and gradient (grad_output != 1) in float64. 1e-8: the originals' own arithmetic (a plain
    sigmoid difference, torch's softplus cut-off at 20) is off the exact math by up to a few 1e-9
    (tests/test_dmol_reference.py)."""
    ref, (ref_g,) = _grads(original, params)
    got, (got_g,) = _grads(ported, params)
    assert_close(got, ref, rtol=1e-8, atol_rel=1e-8, what=f"{what} value")
    assert_close(got_g, ref_g, rtol=1e-8, atol_rel=1e-8, what=f"{what} gradient")


@pytest.mark.parametrize("impl", _DMOL_IMPLS)
@pytest.mark.parametrize("low_bit", [False, True], ids=["8bit", "5bit"])
def test_vdvae_dmol(impl, low_bit):
    """VDVAE DmolNet.nll: channels-last l (N, H, W, 10 M) and x (N, H, W, 3), per-dimension loss (N,)."""
    dmol_nll = _dmol_nll(impl)
    params, x = dmol_inputs(3, 3, (5, 6), 4, num_bits=5 if low_bit else 8, seed=20 + low_bit)
    l0, x = params.permute(0, 2, 3, 1).contiguous(), x.permute(0, 2, 3, 1).contiguous()

    def ported(l):
        return dmol_nll(l.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), num_bits=5 if low_bit else 8,
                        reduction="none") / x[0].numel()
    _compare_dmol(lambda l: vdvae_dmol_loss(x, l, low_bit=low_bit), ported, l0, "VDVAE")


@pytest.mark.parametrize("impl", _DMOL_IMPLS)
@pytest.mark.parametrize("sum_all", [True, False])
def test_pixelcnn_dmol(impl, sum_all):
    """PixelCNN++ discretized_mix_logistic_loss (TF, transcribed): channels-last, summed or per sample."""
    dmol_nll = _dmol_nll(impl)
    params, x = dmol_inputs(2, 3, (4, 7), 10, seed=22)
    l0, x = params.permute(0, 2, 3, 1).contiguous(), x.permute(0, 2, 3, 1).contiguous()

    def ported(l):
        return dmol_nll(l.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), reduction="sum" if sum_all else "none")
    _compare_dmol(lambda l: pixelcnn_dmol_loss(x, l, sum_all=sum_all), ported, l0, "PixelCNN++")


@pytest.mark.parametrize("impl", _DMOL_IMPLS)
@pytest.mark.parametrize("num_bits", [8, 5])
def test_nvae_dmol(impl, num_bits):
    """NVAE DiscMixLogistic + reconstruction_loss: channels-first logits, x in [0, 1]; 8-bit data
    without level 254, where NVAE's 0.99 edge differs (docs/porting.md)."""
    dmol_nll = _dmol_nll(impl)
    params, x = dmol_inputs(2, 3, (6, 5), 5, num_bits=num_bits, seed=23,
                            exclude_levels=(254,) if num_bits == 8 else ())
    x = (x + 1) / 2
    _compare_dmol(lambda p: nvae_reconstruction_loss(p, x, 5, num_bits),
                  lambda p: dmol_nll(p, 2 * x - 1, num_bits=num_bits, reduction="none"), params, "NVAE")


@pytest.mark.parametrize("impl", _DMOL_IMPLS)
@pytest.mark.parametrize("log_scale_min", [-7.0, -32.0])
def test_wavenet_dmol(impl, log_scale_min):
    """r9y9/wavenet_vocoder discretized_mix_logistic_loss: y_hat (B, 3 M, T), y (B, T, 1), 16-bit."""
    dmol_nll = _dmol_nll(impl)
    params, x = dmol_inputs(2, 1, (300,), 6, num_bits=16, seed=24, edge_frac=0.03)
    y = x.transpose(1, 2).contiguous()
    _compare_dmol(lambda p: wavenet_dmol_loss(p, y, num_classes=2 ** 16, log_scale_min=log_scale_min),
                  lambda p: dmol_nll(p, y.transpose(1, 2), num_bits=16, log_scale_min=log_scale_min),
                  params, "WaveNet")
