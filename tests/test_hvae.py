"""The hierarchical VAE (vae_ext.models.HVAE, issue 27's model): shapes, every latent layer through
gaussian_latent on channel slices, the fused and the reference model training alike from one seed,
gradients reaching every layer, the importance-weighted bound, sampling at temperatures, bad input."""
from __future__ import annotations

import pytest
import torch

import vae_ext
from vae_ext.cli.model_memory import training_bytes
from vae_ext.models import HVAE, VAE, hvae_blocks
from vae_ext.models.hvae_blocks import resolutions_for

pytestmark = pytest.mark.usefixtures("one_thread")


def _digits(n=32, dtype=torch.float32):
    """The first n sklearn digits on the 8-bit grid in [-1, 1], as the command loads them."""
    from sklearn.datasets import load_digits

    from vae_ext.cli.data import to_signed_grid

    x = torch.from_numpy(load_digits().images[:n]).float().div(16).unsqueeze(1)
    return to_signed_grid(x, 8).to(dtype)


def _pair(dtype=torch.float32, **kw):
    """A fused and a reference HVAE with the same weights."""
    torch.manual_seed(0)
    fused = HVAE(input_shape=(1, 8, 8), width=8, layers=2, latent_size=3, mixtures=3, **kw).to(dtype)
    ref = VAE.from_config(fused.config, fused=False).to(dtype)
    ref.load_state_dict(fused.state_dict())
    return fused, ref


@pytest.mark.parametrize("hw,res", [((8, 8), (8, 4, 1)), ((28, 28), (32, 16, 8, 4, 1)), ((5, 7), (8, 4, 1)),
                                    ((2, 2), (2, 1)), ((1, 1), (1,))])
def test_resolutions(hw, res):
    assert resolutions_for(*hw) == res


def test_shapes_and_outputs():
    torch.manual_seed(0)
    m = VAE(arch="hvae", input_shape=(1, 8, 8), width=8, layers=2, latent_size=3, mixtures=4)
    assert isinstance(m, HVAE) and m.layer_resolutions == (1, 1, 4, 4, 8, 8) and m.output_shape == (12, 8, 8)
    x = _digits(5)
    loss, stats = m.loss(x)
    assert loss.shape == () and stats["layer_kl"].shape == (6,) and torch.isfinite(loss)
    assert torch.allclose(loss, stats["rec"] + stats["kl"]) and torch.allclose(stats["layer_kl"].sum() * 5, stats["kl"])
    g = torch.Generator().manual_seed(1)
    elbo, log_px_z, kl, layer_kl = m.elbo(x, generator=g, return_terms=True, return_layer_kl=True)
    assert elbo.shape == log_px_z.shape == kl.shape == (5,) and layer_kl.shape == (5, 6)
    assert torch.allclose(elbo, log_px_z - kl) and torch.allclose(kl, layer_kl.sum(1))
    assert m.log_likelihood(x, k=4, generator=g).shape == (5,)
    s = m.sample(3, generator=g, temperature=0.7)
    assert s.shape == (3, 1, 8, 8) and bool((s.abs() <= 1).all())
    k = (s.double() + 1) * 255 / 2
    assert bool(((k - k.round()).abs() < 1e-3).all())  # on the 8-bit grid
    assert m.reconstruct(x).shape == (5, 1, 8, 8)
    # MNIST's 28x28 is padded to 32 and the likelihood cropped back to the image
    m28 = HVAE(input_shape=(1, 28, 28), width=8, latent_size=2, mixtures=2)
    loss28, st = m28.loss(torch.zeros(2, 1, 28, 28))
    assert st["layer_kl"].shape == (5,) and m28.size == 32 and torch.isfinite(loss28)


def test_beta_weighs_the_kl():
    m, _ = _pair()
    x = _digits(4)
    with torch.no_grad():
        torch.manual_seed(3)
        full, st = m.loss(x, beta=1.0)
        torch.manual_seed(3)
        half, st_half = m.loss(x, beta=0.5)
    assert torch.equal(st["kl"], st_half["kl"])
    assert torch.allclose(half, st["rec"] + 0.5 * st["kl"]) and torch.allclose(full, st["rec"] + st["kl"])


def test_config_round_trip_and_meta_device():
    m = HVAE(input_shape=(1, 8, 8), width=12, layers=3, latent_size=5, mixtures=2, num_bits=5)
    c = m.config
    assert c["arch"] == "hvae" and c["width"] == 12 and c["layers"] == 3 and c["latent_size"] == 5
    again = VAE.from_config(c)
    assert type(again) is HVAE and again.config == c and again.num_parameters() == m.num_parameters()
    assert set(p for p in again.state_dict()) == set(m.state_dict())
    with torch.device("meta"):
        meta = VAE.from_config(c)
    assert training_bytes(meta, 64) > meta.num_parameters() * 16  # the activations count too


def test_every_latent_layer_reads_channel_slices(monkeypatch):
    """q's (mean, log sigma) and the prior's are slices of two convolutions' outputs, handed over
    without a copy; scale='logsigma', one call per layer."""
    seen = []
    real = hvae_blocks.gaussian_latent

    def spy(mu, logscale, prior_mu, prior_logscale, **kw):
        seen.append(kw["scale"])
        for t in (mu, logscale, prior_mu, prior_logscale):
            assert t._base is not None and not t.is_contiguous()  # a view of a wider tensor
        assert mu.data_ptr() != logscale.data_ptr() and mu._base is logscale._base
        assert prior_mu._base is prior_logscale._base
        return real(mu, logscale, prior_mu, prior_logscale, **kw)

    monkeypatch.setattr(hvae_blocks, "gaussian_latent", spy)
    m, _ = _pair()
    m.loss(_digits(3))
    assert seen == ["logsigma"] * len(m.latent_layers)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-4)])
def test_fused_and_reference_train_alike(dtype, tol):
    """The same weights and seed: the two models draw the same eps (the reference reads the fused op's
    Philox stream) and take the same Adam steps, to float tolerance."""
    fused, ref = _pair(dtype)
    x = _digits(24, dtype)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (fused, ref)]
    for step in range(3):
        out = []
        for m, opt in zip((fused, ref), opts):
            torch.manual_seed(100 + step)
            opt.zero_grad()
            loss, stats = m.loss(x)
            loss.backward()
            opt.step()
            out.append((loss.detach(), stats["layer_kl"]))
        (lf, kf), (lr, kr) = out
        torch.testing.assert_close(lf, lr, rtol=tol, atol=0)
        torch.testing.assert_close(kf, kr, rtol=tol, atol=tol)
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 10, msg=name)


def test_gradients_reach_every_layer():
    m, _ = _pair()
    x = _digits(16)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(2):  # the priors' last convolutions start at zero: one step opens the rest to gradients
        opt.zero_grad()
        m.loss(x)[0].backward()
        opt.step()
    opt.zero_grad()
    m.loss(x)[0].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_importance_weighted_bound_is_above_the_elbo():
    m, _ = _pair()
    x = _digits(16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        elbo = m.elbo(x, generator=g)
        iw = m.log_likelihood(x, k=32, generator=g)
        iw_chunked = m.log_likelihood(x, k=32, generator=g, max_elements=1)  # one draw per chunk
    assert iw.mean() > elbo.mean() and iw_chunked.mean() > elbo.mean()
    assert torch.isfinite(iw).all()


def test_sampling_temperature():
    m, _ = _pair()
    g = torch.Generator()
    draws = {}
    for t in (1.0, 0.5, 0.0):
        g.manual_seed(7)
        draws[t] = m.sample(4, generator=g, temperature=t)
    g.manual_seed(7)
    assert torch.equal(m.sample(4, generator=g, temperature=0.5), draws[0.5])  # reproducible
    assert not torch.equal(draws[1.0], draws[0.5])
    _, ref = _pair()
    g.manual_seed(7)
    assert ref.sample(4, generator=g, temperature=0.5).shape == (4, 1, 8, 8)


@pytest.mark.parametrize("kw,match", [
    (dict(recon="bce_logits"), "recon"), (dict(num_classes=3), "num_classes"), (dict(free_bits=0.5), "free_bits"),
    (dict(width=0), "width"), (dict(layers=0), "layers"), (dict(input_shape=(64,)), "input_shape"),
    (dict(input_shape=(2, 8, 8)), "input_shape"), (dict(mixtures=0), "mixtures"),
])
def test_bad_construction(kw, match):
    args = dict(input_shape=(1, 8, 8), width=8)
    with pytest.raises(ValueError, match=match):
        HVAE(**{**args, **kw})


def test_bad_calls():
    m, _ = _pair()
    x = _digits(2)
    with pytest.raises(ValueError, match="temperature"):
        m.sample(2, temperature=-1.0)
    with pytest.raises(ValueError, match="y:"):
        m.loss(x, y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="^x:"):
        m.loss(torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="k:"):
        m.log_likelihood(x, k=0)
    assert vae_ext.models.MODELS["hvae"] is HVAE and "hvae" not in vae_ext.models.ARCHS
