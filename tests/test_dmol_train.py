"""``--recon dmol``: the VAE modules with a discretized-mixture-of-logistics decoder, and the command
that trains them on grey levels scaled to [-1, 1] and reports bits per dimension (issue 25)."""
from __future__ import annotations

import json
import math

import pytest
import torch

import vae_ext
from vae_ext import reference
from vae_ext.cli.train import train_step
from vae_ext.models import MLPVAE
from vae_ext.models.dmol import DMoLELBOLoss, mixture_mean, to_grid

from helpers import assert_one_line_error, read_csv, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--recon", "dmol", "--mixtures", "3", "--hidden", "32", "--latent", "4", "--batch-size", "128",
        "--no-progress"]
LN2 = math.log(2.0)


def _digits_grid(n=256, num_bits=8):
    """The first n sklearn digits on the num_bits grid in [-1, 1], as the command loads them."""
    from sklearn.datasets import load_digits

    from vae_ext.cli.data import to_signed_grid

    x = torch.from_numpy(load_digits().images[:n]).float().div(16).unsqueeze(1)
    return to_signed_grid(x, num_bits)


def _on_grid(x, num_bits=8):
    """Every value one of the 2^num_bits levels 2 k / (2^num_bits - 1) - 1 (up to float32 rounding)."""
    k = (x.double() + 1) * (2 ** num_bits - 1) / 2
    return bool((x.abs() <= 1).all()) and bool(((k - k.round()).abs() < 1e-3).all())


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("arch,kw", [
    ("mlp", dict(hidden_sizes=(16,))),
    ("conv", dict(hidden_sizes=(16,), channels=(4, 8))),
    ("mlp", dict(hidden_sizes=(16,), num_classes=3)),
    ("conv", dict(hidden_sizes=(), channels=(4,), num_classes=3)),
])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_dmol_model_shapes_loss_and_samples(arch, kw, fused):
    torch.manual_seed(0)
    m = vae_ext.VAE(arch=arch, input_shape=(1, 8, 8), latent_size=3, recon="dmol", mixtures=4, fused=fused, **kw)
    assert m.output_shape == (12, 8, 8) and isinstance(m.criterion, DMoLELBOLoss) and m.criterion.fused == fused
    x = _digits_grid(5)
    y = torch.tensor([0, 1, 2, 0, 1]) if m.conditional else None
    out, mu, logvar, *prior = m(x, y)
    assert out.shape == (5, 12, 8, 8)
    kw_prior = {"prior_mu": prior[0], "prior_logvar": prior[1]} if prior else {}
    loss, rec, kl, units = m.criterion(out, x, mu, logvar, return_terms=True, return_unit_kl=True, **kw_prior)
    torch.testing.assert_close(rec, reference.dmol_nll(out, x), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss, rec + kl)
    assert units.shape == (3,)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    e, lp, kl = m.elbo(x, y=y, return_terms=True)
    assert e.shape == (5,) and (lp < 0).all() and (kl >= 0).all()
    assert m.log_likelihood(x, 3, y=y).shape == (5,)
    s = m.sample(3, y=y[:3] if y is not None else None)
    assert s.shape == (3, 1, 8, 8) and _on_grid(s)
    r = m.reconstruct(x, y)
    assert r.shape == (5, 1, 8, 8) and r.abs().max() <= 1
    assert m.config["mixtures"] == 4 and m.config["num_bits"] == 8
    assert vae_ext.VAE.from_config(m.config).config == m.config


def test_dmol_recon_log_prob_is_minus_the_reference_nll():
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(8,), latent_size=2, recon="dmol", mixtures=5,
               num_bits=5).double()
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 15, 8, 8, generator=g, dtype=torch.float64)
    x = to_grid(torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1, 5)
    torch.testing.assert_close(m.recon_log_prob(out, x), -reference.dmol_nll(out, x, num_bits=5, reduction="none"),
                               rtol=1e-10, atol=1e-10)


def test_mixture_mean():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) * 0.3  # M = 1: the mean is the location
    torch.testing.assert_close(mixture_mean(p, 1), p[:, 1:2])
    p = torch.randn(2, 20, 3, generator=g, dtype=torch.float64) * 0.3  # RGB, M = 2, a 1-D spatial shape
    w = torch.softmax(p[:, :2], 1)
    mu, a = p[:, 2:].unflatten(1, (3, 3, 2))[:, :, 0], torch.tanh(p[:, 2:].unflatten(1, (3, 3, 2))[:, :, 2])
    r = mu[:, 0]
    g_ = mu[:, 1] + a[:, 0] * r
    b = mu[:, 2] + a[:, 1] * r + a[:, 2] * g_
    want = torch.stack([(w * c).sum(1) for c in (r, g_, b)], 1).clamp(-1, 1)
    torch.testing.assert_close(mixture_mean(p, 3), want)


def test_dmol_options_are_refused_where_they_do_not_fit():
    with pytest.raises(ValueError, match="mixtures: only recon='dmol'"):
        MLPVAE(input_shape=(1, 8, 8), mixtures=3)
    with pytest.raises(ValueError, match="num_bits: only recon='dmol'"):
        MLPVAE(input_shape=(1, 8, 8), recon="mse", num_bits=5)
    with pytest.raises(ValueError, match="input_shape"):
        MLPVAE(input_shape=(64,), recon="dmol")
    with pytest.raises(ValueError, match="num_bits"):
        MLPVAE(input_shape=(1, 8, 8), recon="dmol", num_bits=17)
    with pytest.raises(ValueError, match="mixtures"):
        MLPVAE(input_shape=(1, 8, 8), recon="dmol", mixtures=0)


def _train_losses(fused: bool, dtype, steps: int, batches):
    """Losses of ``steps`` Adam steps of a dmol MLP from seed 0; the reference model gets the fused
    kernel's eps (as tests/test_models.py's comparison), so only the loss and its gradient differ:
    vae_ext.dmol_nll + gaussian_kl fused, or their vae_ext.reference twins through autograd."""
    torch.manual_seed(0)
    model = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(64,), latent_size=8, recon="dmol", mixtures=5,
                   fused=fused).to(dtype)
    g = torch.Generator().manual_seed(7)
    if fused:
        model.generator = g
    else:
        zero = lambda mu: torch.zeros_like(mu)  # noqa: E731
        model.eps_sampler = lambda mu, k: vae_ext.reparameterize(zero(mu), zero(mu), generator=g, return_eps=True)[1]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = [train_step(model, model, opt, batches[i % len(batches)].to(dtype), beta=1.0)[0].item()
              for i in range(steps)]
    return torch.tensor(losses, dtype=torch.float64), model


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_fused_and_reference_dmol_training_agree(dtype, rtol):
    """The same trajectory from the same seed and eps, to float tolerance, and the same final weights.

    Float64 is the sharp check: every weight equal to 1e-12 (relative 5e-9). In float32 the mixture's
    sums round differently in the kernel and in eager PyTorch, and Adam's normalized step turns a
    rounding difference in a near-zero gradient into a step of up to lr: after 40 steps a weight or two
    differ by ~1e-3 (measured: every tensor within 1e-4 of its norm) while the losses agree to 4e-7.
    """
    batches = list(torch.split(_digits_grid(256), 64))
    fused, m_fused = _train_losses(True, dtype, 40, batches)
    ref, m_ref = _train_losses(False, dtype, 40, batches)
    assert fused[-8:].mean() < 0.95 * fused[:4].mean()  # it learned something
    torch.testing.assert_close(fused, ref, rtol=rtol, atol=0.0)
    for (name, a), b in zip(m_fused.named_parameters(), m_ref.parameters()):
        if dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=rtol * 50, atol=1e-12, msg=lambda s, name=name: f"{name}: {s}")
        else:
            assert (a - b).norm() <= 1e-3 * a.norm(), name


def test_dmol_log_likelihood_converges_to_the_exact_value():
    """With a 1-d latent log P(x) is an integral on a grid; the k=5000 importance-weighted estimate
    must be within 0.05 nats of it, and the ELBO below it."""
    torch.manual_seed(0)
    x = _digits_grid(192)
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(32,), latent_size=1, recon="dmol", mixtures=3)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for i in range(150):
        train_step(m, m, opt, x[(i % 3) * 64:(i % 3 + 1) * 64], beta=1.0)
    m = m.double()
    xs = x[:4].double()
    z = torch.linspace(-12.0, 12.0, 6001, dtype=torch.float64).view(-1, 1)
    with torch.no_grad():
        params = m.decode(z)  # (n, 9, 8, 8)
        log_px_z = torch.stack([-reference.dmol_nll(params, xi.expand(len(z), *xi.shape), reduction="none")
                                for xi in xs], 1)
    log_pz = -0.5 * (z ** 2 + math.log(2 * math.pi))
    exact = torch.logsumexp(log_px_z + log_pz, 0) + math.log(24.0 / 6000)
    g = torch.Generator().manual_seed(0)
    est = m.log_likelihood(xs, k=5000, generator=g, max_elements=64 * 4 * 9 * 700)  # several chunks
    torch.testing.assert_close(est, exact, rtol=0, atol=0.05)
    elbo = torch.stack([m.elbo(xs, generator=g) for _ in range(100)]).mean(0)
    assert (elbo < exact + 0.05).all() and (exact - elbo).mean() > 0


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def dmol_run(tmp_path_factory):
    """A tiny 4-epoch dmol run on the digits, shared by the tests below."""
    from vae_ext import cli

    out = tmp_path_factory.mktemp("dmol") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["train", "--epochs", "4", "--out", str(out), *TINY]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_dmol_run_trains_and_reports_bits_per_dim(dmol_run):
    rows = read_csv(dmol_run / "metrics.csv")
    assert len(rows) == 4 and list(rows[0])[-2:] == ["train_bpd", "test_bpd"]
    for r in rows:
        assert float(r["test_bpd"]) == pytest.approx(float(r["test_nelbo"]) / (64 * LN2), rel=1e-5)
        assert float(r["train_bpd"]) == pytest.approx(float(r["train_nelbo"]) / (64 * LN2), rel=1e-5)
    assert float(rows[-1]["train_nelbo"]) < float(rows[0]["train_nelbo"])
    assert float(rows[-1]["test_nelbo"]) < float(rows[0]["test_nelbo"])
    # 8-bit pixels: a uniform model is 8 bits/dim; a model that learned anything is below it
    assert 0 < float(rows[-1]["test_bpd"]) < 8
    for name in ("checkpoint.pt", "reconstructions.png", "samples.png", "loss_curves.png"):
        assert (dmol_run / name).stat().st_size > 0
    ckpt = torch.load(dmol_run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["recon"] == "dmol" and ckpt["config"]["binarize"] == "none"
    assert ckpt["model_config"]["mixtures"] == 3 and ckpt["model_config"]["num_bits"] == 8


def test_other_modes_keep_their_columns(capsys, tmp_path):
    rc, stdout, _ = run_cli(capsys, "train", "--epochs", "1", "--out", tmp_path / "r", "--hidden", "16",
                            "--latent", "2", "--batch-size", "512", "--no-progress")
    assert rc == 0 and "bits/dim" not in stdout
    assert "train_bpd" not in read_csv(tmp_path / "r" / "metrics.csv")[0]


def test_eval_reproduces_the_last_rows_bits_per_dim(capsys, dmol_run):
    rc, stdout, _ = run_cli(capsys, "eval", dmol_run, "--k", "20", "--json", "--no-progress")
    r = json.loads(stdout)
    assert rc == 0 and r["dims"] == 64
    last = read_csv(dmol_run / "metrics.csv")[-1]
    assert r["nelbo_bpd"] == pytest.approx(float(last["test_bpd"]), rel=1e-5)
    assert r["nelbo"] == pytest.approx(float(last["test_nelbo"]), rel=1e-5)
    assert r["nll_bpd"] == pytest.approx(r["nll"] / (64 * LN2), rel=1e-12)
    assert 0 < r["nll_bpd"] < r["nelbo_bpd"] + 0.05  # the IW bound is at least as tight, up to noise
    rc, stdout, _ = run_cli(capsys, "eval", dmol_run, "--k", "5", "--reference", "--no-progress")
    assert rc == 0 and "bits/dim" in stdout and "reference kernels" in stdout


def test_dmol_reference_run_and_resume(capsys, tmp_path):
    out = tmp_path / "ref"
    rc, stdout, _ = run_cli(capsys, "train", "--epochs", "1", "--out", out, "--reference", *TINY)
    assert rc == 0 and "vae_ext.reference" in stdout and "bits/dim" in stdout
    rc, _, _ = run_cli(capsys, "train", "--resume", out, "--epochs", "2", "--no-progress")
    assert rc == 0 and len(read_csv(out / "metrics.csv")) == 2
    rc, _, err = run_cli(capsys, "train", "--resume", out, "--epochs", "3", "--mixtures", "4")
    assert_one_line_error(rc, err, "trained with --mixtures 3, not 4")


def test_samples_are_on_the_grid(dmol_run):
    from vae_ext.cli.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(dmol_run)
    for fused in (True, False):
        m = model_from_checkpoint(ckpt, fused=fused)
        s = m.sample(50, generator=torch.Generator().manual_seed(1))
        assert s.shape == (50, 1, 8, 8) and _on_grid(s) and len(s.unique()) > 10


@pytest.mark.parametrize("argv,match", [
    (["--recon", "dmol", "--binarize", "dynamic"], "--binarize dynamic: --recon dmol models the grey levels"),
    (["--recon", "dmol", "--binarize", "static"], "--binarize static"),
    (["--mixtures", "5"], "--mixtures: only --recon dmol"),
    (["--recon", "mse", "--num-bits", "5"], "--num-bits: only --recon dmol"),
])
def test_bad_dmol_options_are_one_line(capsys, tmp_path, argv, match):
    rc, _, err = run_cli(capsys, "train", "--epochs", "1", "--out", tmp_path / "r", "--no-progress", *argv)
    assert_one_line_error(rc, err, match)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv,match", [
    (["--recon", "dmol", "--num-bits", "17"], "argument --num-bits: expected at most 16"),
    (["--recon", "dmol", "--mixtures", "0"], "argument --mixtures: expected a positive integer"),
])
def test_out_of_range_dmol_options_are_usage_errors(capsys, tmp_path, argv, match):
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "r", *argv)
    assert_one_line_error(rc, err, match, status=2)


def test_digits_are_quantized_to_the_num_bits_grid():
    from vae_ext.cli.data import load_data

    d = load_data("digits", binarize_mode="none", num_bits=4)
    assert _on_grid(d.train, 4) and _on_grid(d.test, 4) and d.train.min() == -1 and d.train.max() == 1
    assert len(d.train.unique()) <= 16
    d8 = load_data("digits", binarize_mode="none", num_bits=8)
    plain = load_data("digits", binarize_mode="none")
    # 8 bits: each of the 17 levels v/16 goes to the nearest of 256, at most half a level away
    assert (d8.train - (plain.train * 2 - 1)).abs().max() <= 1 / 255 + 1e-6
