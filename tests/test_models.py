"""vae_ext.models: architectures, the fused-vs-reference training comparison, the log-likelihood estimate."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vae_ext
from vae_ext import reference
from vae_ext.cli.train import train_step
from vae_ext.models import MLPVAE, ConvVAE, ReferenceELBOLoss


@pytest.fixture(autouse=True)
def _keep_rng_one_thread():
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine
    yield
    torch.set_rng_state(state)
    torch.set_num_threads(threads)


def _digits(n=256, seed=0):
    """The first n sklearn digits, binarized once with a fixed generator: (n, 1, 8, 8) of 0/1."""
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images[:n]).float().div(16).unsqueeze(1)
    return torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- architectures


def test_vae_factory_builds_the_pytorch_examples_mlp_by_default():
    m = vae_ext.VAE()
    assert type(m) is MLPVAE and isinstance(m, vae_ext.VAE)
    assert m.input_shape == (1, 28, 28) and m.hidden_sizes == (400,) and m.latent_size == 20
    assert m.recon == "bce_logits" and m.fused and type(m.criterion) is vae_ext.FusedELBOLoss
    # 784-400-20(x2) encoder, 20-400-784 decoder
    assert m.num_parameters() == (784 * 400 + 400) + 2 * (400 * 20 + 20) + (20 * 400 + 400) + (400 * 784 + 784)
    assert m.num_parameters("encoder") + m.num_parameters("decoder") == m.num_parameters()
    assert type(vae_ext.VAE(arch="conv")) is ConvVAE
    assert vae_ext.MLPVAE is MLPVAE and vae_ext.ConvVAE is ConvVAE
    with pytest.raises(ValueError, match="arch"):
        vae_ext.VAE(arch="transformer")
    with pytest.raises(ValueError, match="arch"):
        MLPVAE(arch="conv")


@pytest.mark.parametrize("arch,shape,kw", [
    ("mlp", (1, 8, 8), dict(hidden_sizes=(32, 16), latent_size=3)),
    ("mlp", (64,), dict(hidden_sizes=(16,), latent_size=2)),
    ("conv", (1, 8, 8), dict(hidden_sizes=(16,), channels=(4, 8), latent_size=3)),
    ("conv", (3, 9, 7), dict(hidden_sizes=(), channels=(4, 8), latent_size=2)),  # odd sizes, no fc layer
])
def test_shapes_of_every_method(arch, shape, kw):
    m = vae_ext.VAE(arch=arch, input_shape=shape, **kw)
    x = torch.rand(5, *shape).bernoulli()
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (5, kw["latent_size"])
    assert m.decode(mu).shape == (5, *shape)
    assert m.decode(torch.randn(4, 5, kw["latent_size"])).shape == (4, 5, *shape)  # leading sample dim
    recon, mu, logvar = m(x)
    assert recon.shape == (5, *shape)
    loss = m.criterion(recon, x, mu, logvar)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    s, r = m.sample(6), m.reconstruct(x)
    assert s.shape == (6, *shape) and r.shape == (5, *shape)
    assert 0 <= s.min() and s.max() <= 1 and 0 <= r.min() and r.max() <= 1
    assert m.elbo(x).shape == (5,) and m.log_likelihood(x, 3).shape == (5,)
    assert vae_ext.VAE.from_config(m.config).config == m.config


@pytest.mark.parametrize("arch", ["mlp", "conv", "hvae"])
def test_an_empty_batch_gives_empty_results(arch):
    """Size checks read the image shape, not x[0], which an empty batch does not have."""
    kw = dict(width=4) if arch == "hvae" else dict(hidden_sizes=(8,), latent_size=2)
    m = vae_ext.VAE(arch=arch, input_shape=(1, 8, 8), **kw)
    x = torch.rand(0, 1, 8, 8).mul(255).round().div(255)
    assert m.elbo(x).shape == (0,) and m.log_likelihood(x, 3).shape == (0,)
    assert m.reconstruct(x).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match=r"x: expected a batch of 1x8x8 images"):
        m.elbo(torch.rand(0, 1, 8, 9))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: MLPVAE(latent_size=2.5), TypeError, r"latent_size: expected integer sizes, got 2\.5"),  # not 2
    (lambda: MLPVAE(hidden_sizes=(1.7,)), TypeError, "hidden_sizes: expected integer sizes"),
    (lambda: MLPVAE(input_shape=(1, 2.5)), TypeError, "input_shape: expected integer sizes"),
    (lambda: MLPVAE(latent_size="4"), TypeError, "latent_size: expected integer sizes"),
    (lambda: MLPVAE(latent_size=None), TypeError, "latent_size"),
    (lambda: MLPVAE(hidden_sizes=400), TypeError, "hidden_sizes: expected a sequence of ints"),
    (lambda: vae_ext.VAE(arch=["mlp"]), TypeError, "arch: expected a str"),
    (lambda: vae_ext.VAE(arch="hvae", width=2.5), TypeError, "width: expected integer sizes"),
    (lambda: vae_ext.VAE(arch="hvae", layers=0), ValueError, "layers: expected positive sizes"),
])
def test_bad_constructor_arguments_are_named(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_integer_images_and_label_counts_are_named():
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(8,), latent_size=2, num_classes=3)
    with pytest.raises(TypeError, match=r"x: expected floating-point images .* got torch\.uint8; .*x\.float\(\) / 255"):
        m.elbo(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"y: expected 2 labels \(one per sample, n=2\), got 3"):
        m.sample(2, y=torch.tensor([0, 1, 2]))
    assert m.sample(3, y=torch.tensor([0, 1, 2])).shape == (3, 1, 8, 8)


def test_wrong_input_size_names_the_shapes():
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(8,), latent_size=2)
    with pytest.raises(ValueError, match=r"8x8 images.*\[3, 1, 28, 28\]"):
        m.encode(torch.rand(3, 1, 28, 28))
    with pytest.raises(ValueError, match="too small"):
        ConvVAE(input_shape=(1, 3, 3), channels=(4, 8))


@pytest.mark.parametrize("recon", ["bce_logits", "bce", "mse"])
def test_forward_hands_the_loss_what_its_recon_mode_takes(recon):
    torch.manual_seed(0)
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(16,), latent_size=2, recon=recon)
    m.eps_sampler = lambda mu, k: torch.zeros_like(mu)  # z = mu: deterministic
    x = torch.rand(4, 1, 8, 8)
    out, mu, _ = m(x)
    logits = m.decode(mu)
    expected = torch.sigmoid(logits) if recon == "bce" else logits
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- fused vs reference


def _train_losses(fused: bool, dtype, steps: int, batches, same_eps: bool = True):
    """Loss of each of `steps` Adam steps (train.train_step, summed negative ELBO) from seed 0.

    The fused model draws eps with the fused reparameterize kernel from generator(seed 7). The
    reference model gets the *same* eps: its eps_sampler asks the fused kernel for eps from its own
    generator(seed 7) (eps depends only on the generator's seed and offset, so equal call sequences
    give equal draws), then forms z = mu + exp(logvar / 2) * eps with plain PyTorch and is scored by
    vae_ext.reference.elbo_loss; its gradients come from autograd.
    """
    torch.manual_seed(0)
    model = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(64,), latent_size=8, fused=fused).to(dtype)
    g = torch.Generator().manual_seed(7)
    if fused:
        model.generator = g
    elif same_eps:
        zero = lambda mu: torch.zeros_like(mu)  # noqa: E731
        model.eps_sampler = lambda mu, k: vae_ext.reparameterize(zero(mu), zero(mu), generator=g, return_eps=True)[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for i in range(steps):
        x = batches[i % len(batches)].to(dtype)
        loss = train_step(model, model, opt, x, beta=1.0)[0]
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_fused_and_reference_training_agree_over_200_steps(dtype, rtol):
    """Fused and reference training from the same seed follow the same loss trajectory.

    What makes the comparison meaningful: the two paths differ by design in their noise stream
    (Philox in the kernel vs torch.randn), so two runs with independent eps would only agree in
    distribution. We give the reference path the fused kernel's eps (see _train_losses), feed the
    same batches in the same order and start from the same initial weights. What remains different
    is exactly what the fused kernels replace: the loss and its gradient (fused single pass vs
    F.binary_cross_entropy_with_logits + KL through autograd) and the reparameterization's backward
    (eps recomputed in the kernel vs autograd). Any error there changes the gradients, and 200 Adam
    steps amplify it; agreement to float tolerance (float64: 1e-11, float32: 2e-5 relative; measured
    7e-16 and 2e-7) over the whole trajectory, and in the final weights, says the fused path trains the
    model exactly as the reference does. The same comparison with the reference's own torch.randn eps
    differs by far more than the tolerance, which shows the test can see a difference.
    """
    batches = list(torch.split(_digits(256), 64))
    fused, m_fused = _train_losses(True, dtype, 200, batches)
    ref, m_ref = _train_losses(False, dtype, 200, batches)
    assert fused[-20:].mean() < 0.8 * fused[:5].mean()  # it learned something
    torch.testing.assert_close(fused, ref, rtol=rtol, atol=0.0)
    for (name, a), b in zip(m_fused.named_parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol * 50, atol=rtol * 1e-2, msg=lambda s, name=name: f"{name}: {s}")
    if dtype == torch.float32:
        other, _ = _train_losses(False, dtype, 200, batches, same_eps=False)
        assert ((other - fused).abs() / fused.abs()).max() > 100 * rtol


def test_reference_model_uses_the_reference_ops():
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(8,), latent_size=2, fused=False)
    assert isinstance(m.criterion, ReferenceELBOLoss)
    torch.manual_seed(3)
    mu, lv = torch.randn(4, 2), torch.randn(4, 2)
    z = m.reparameterize(mu, lv)
    torch.manual_seed(3)
    torch.randn(4, 2), torch.randn(4, 2)
    torch.testing.assert_close(z, reference.reparameterize(mu, lv))


# --------------------------------------------------------------------------- densities


@pytest.mark.parametrize("recon", ["bce_logits", "bce", "mse"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_recon_log_prob_is_the_likelihood_density(recon, fused):
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(8,), latent_size=2, recon=recon, fused=fused).double()
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64) * 2
    x = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64).bernoulli(generator=g)
    got = m.recon_log_prob(out, x)
    if recon == "mse":  # a Gaussian with variance 1/2 around the decoder output
        want = torch.distributions.Normal(out, math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    else:
        want = -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_elbo_terms_and_reproducibility():
    torch.manual_seed(0)
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(16,), latent_size=3)
    x = _digits(10)
    e1, lp, kl = m.elbo(x, generator=torch.Generator().manual_seed(5), return_terms=True)
    e2 = m.elbo(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(e1, e2)
    torch.testing.assert_close(e1, lp - kl)
    mu, logvar = m.encode(x)
    torch.testing.assert_close(kl, reference.kl_divergence(mu, logvar))
    assert (kl >= 0).all() and (e1 < 0).all()


def _quadrature_log_px(m, x, lo=-12.0, hi=12.0, n=6001):
    """log p(x) = log of the integral of p(x|z) N(z; 0, 1) dz on a grid (latent size 1): the exact answer."""
    z = torch.linspace(lo, hi, n, dtype=torch.float64).view(n, 1)
    with torch.no_grad():
        logits = m.decode(z)  # (n, 1, 8, 8)
    log_px_z = -F.binary_cross_entropy_with_logits(
        logits.unsqueeze(1).expand(n, *x.shape), x.unsqueeze(0).expand(n, *x.shape), reduction="none"
    ).flatten(2).sum(2)  # (n, N)
    log_pz = -0.5 * (z ** 2 + math.log(2 * math.pi))
    return torch.logsumexp(log_px_z + log_pz, 0) + math.log((hi - lo) / (n - 1))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_log_likelihood_converges_to_the_exact_value(fused):
    """With a 1-d latent, log p(x) can be integrated on a grid; the IWAE estimate with k=5000 must
    be within 0.05 nats of it (a wrong log q, log p(z) or log k term is off by far more), the ELBO
    must be below it and k=1 must average to the ELBO."""
    torch.manual_seed(0)
    x = _digits(192, seed=1)
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(32,), latent_size=1, fused=fused)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for i in range(150):  # a trained model, so that p(x|z) really depends on z
        train_step(m, m, opt, x[(i % 3) * 64:(i % 3 + 1) * 64], beta=1.0)
    m = m.double()
    xs = x[:6].double()
    exact = _quadrature_log_px(m, xs)
    g = torch.Generator().manual_seed(0)
    est = m.log_likelihood(xs, k=5000, generator=g, max_elements=64 * 6 * 700)  # several chunks
    torch.testing.assert_close(est, exact, rtol=0, atol=0.05)
    elbo = torch.stack([m.elbo(xs, generator=g) for _ in range(200)]).mean(0)  # +- ~0.01 (Monte Carlo)
    assert (elbo < exact + 0.03).all() and (exact - elbo).mean() > 0
    k1 = torch.stack([m.log_likelihood(xs, k=1, generator=g) for _ in range(200)]).mean(0)
    torch.testing.assert_close(k1, elbo, rtol=0, atol=0.3)
    with pytest.raises(ValueError, match="k"):
        m.log_likelihood(xs, k=0)
