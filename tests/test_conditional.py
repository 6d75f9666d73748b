"""Class labels, the class-conditional VAE (``--conditional``), ``--free-bits`` and the active-units
column: the data loaders, the model, and the command end to end on tiny digits models."""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vae_ext
from vae_ext.cli.checkpoint import load_checkpoint
from vae_ext.cli.config import TrainConfig
from vae_ext.cli.data import load_data
from vae_ext.cli.errors import ConfigError, DataError
from vae_ext.cli.train import METRIC_COLUMNS, train_step
from vae_ext.models import MLPVAE, ConvVAE

from helpers import assert_one_line_error, mnist_dir, read_csv, run_cli

TINY = ["--hidden", "16", "--latent", "2", "--batch-size", "256", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_thread")


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    big = {0x08: "u1", 0x09: "i1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(big).tobytes()


def mnist_folder(path: Path, n=10, labels=None, gz=True, prefix="t10k", seed=0) -> Path:
    """A folder with n 6x5 images (and, unless labels is False, their labels 0..9 cycling)."""
    path.mkdir(exist_ok=True)
    imgs = np.random.default_rng(seed).integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
    raw = idx_bytes(imgs)
    (path / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}").write_bytes(gzip.compress(raw) if gz else raw)
    if labels is not False:
        lab = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
        raw = lab if isinstance(lab, bytes) else idx_bytes(lab)
        (path / f"{prefix}-labels-idx1-ubyte{'.gz' if gz else ''}").write_bytes(gzip.compress(raw) if gz else raw)
    return path


# --------------------------------------------------------------------------- labels from every source


def test_digits_labels_follow_the_split():
    from sklearn.datasets import load_digits

    d = load_data("digits", binarize_mode="none", labels=True)
    target = torch.from_numpy(load_digits().target)
    assert d.train_labels.dtype == torch.int64 and d.num_classes == 10
    assert torch.equal(d.train_labels, target[:1438]) and torch.equal(d.test_labels, target[1438:])
    assert load_data("digits", binarize_mode="none").train_labels is None  # not asked for: none


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_labels_pool_and_pair(tmp_path, gz):
    pool = mnist_folder(tmp_path / "pool", n=10, gz=gz)
    d = load_data(f"mnist:{pool}", train_split=7, binarize_mode="none", labels=True)
    assert d.train_labels.tolist() == list(range(7)) and d.test_labels.tolist() == [7, 8, 9]
    pair = mnist_folder(tmp_path / "pair", n=6, prefix="train", gz=gz)
    mnist_folder(pair, n=4, prefix="t10k", labels=np.array([3, 1, 4, 1], dtype=np.uint8), gz=gz, seed=1)
    d = load_data(f"mnist:{pair}", binarize_mode="none", labels=True)
    assert d.train_labels.tolist() == [0, 1, 2, 3, 4, 5] and d.test_labels.tolist() == [3, 1, 4, 1]
    assert d.num_classes == 6


def test_real_mnist_labels():
    folder = mnist_dir("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    d = load_data(f"mnist:{folder}", train_split=8000, binarize_mode="none", labels=True)
    assert d.train_labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9] and d.num_classes == 10
    assert len(d.train_labels) == 8000 and len(d.test_labels) == 2000
    assert torch.bincount(d.test_labels).min() > 150  # every digit is in the test part


@pytest.mark.parametrize("labels,match", [
    (np.arange(9, dtype=np.uint8), "9 labels for 10 images"),
    (np.arange(11, dtype=np.uint8), "11 labels for 10 images"),
    (np.zeros((10, 2), dtype=np.uint8), "expected labels of shape (N,)"),
    (np.arange(10, dtype=np.float32), "expected integer class labels"),
    (np.array([0, 1, -1, 0, 0, 0, 0, 0, 0, 0], dtype=np.int8), "must lie in 0..9999, found -1..1"),
    (np.array([0, 1, 70000, 0, 0, 0, 0, 0, 0, 0], dtype=np.int32), "found 0..70000"),
    (b"\x00\x00\x10\x01" + bytes(14), "not an IDX file"),
    (idx_bytes(np.arange(10, dtype=np.uint8))[:-3], "truncated IDX file"),
])
def test_bad_idx_label_file_is_one_line(capsys, tmp_path, labels, match):
    code = {np.dtype(np.float32): 0x0D, np.dtype(np.int8): 0x09, np.dtype(np.int32): 0x0C}
    if isinstance(labels, np.ndarray) and labels.dtype in code:
        labels = idx_bytes(labels, code[labels.dtype])
    folder = mnist_folder(tmp_path / "m", labels=labels)
    rc, _, err = run_cli(capsys, "train", "--data", f"mnist:{folder}", "--conditional", "--out", tmp_path / "r",
                         "--epochs", "1", *TINY)
    assert_one_line_error(rc, err, "t10k-labels-idx1-ubyte.gz", match)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()
    # a run that does not use the labels never reads them
    assert load_data(f"mnist:{folder}", binarize_mode="none").train_labels is None


def test_corrupt_gzip_label_file(tmp_path):
    folder = mnist_folder(tmp_path / "m")
    p = folder / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-12])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: corrupt or truncated gzip data"):
        load_data(f"mnist:{folder}", labels=True)


def test_npz_labels(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "pair.npz"
    np.savez(p, x_train=rng.random((6, 4, 4)), x_test=rng.random((3, 4, 4)), y_train=np.arange(6),
             y_test=np.array([2, 2, 0]))
    d = load_data(str(p), binarize_mode="none", labels=True)
    assert d.train_labels.tolist() == list(range(6)) and d.test_labels.tolist() == [2, 2, 0]
    p = tmp_path / "pool.npz"
    np.savez(p, digits=rng.random((10, 4, 4)), labels=np.arange(10) % 3)  # the one image array besides labels
    d = load_data(str(p), train_split=8, binarize_mode="none", labels=True)
    assert d.test_labels.tolist() == [2, 0] and d.num_classes == 3
    np.savez(p, digits=rng.random((10, 4, 4)), labels=np.arange(9))
    with pytest.raises(DataError, match="labels: 9 labels for 10 images"):
        load_data(str(p), labels=True)
    np.savez(p, x=rng.random((10, 4, 4)), labels=np.linspace(0, 1, 10))
    with pytest.raises(DataError, match="expected integer class labels"):
        load_data(str(p), labels=True)


def test_a_source_without_labels_is_one_config_error(capsys, tmp_path):
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((10, 4, 4), dtype=np.uint8))
    np.savez(tmp_path / "pair.npz", train=np.zeros((4, 4, 4), dtype=np.uint8), test=np.zeros((2, 4, 4), np.uint8))
    folder = mnist_folder(tmp_path / "m", labels=False)
    with pytest.raises(ConfigError, match="no t10k-labels-idx1-ubyte"):
        load_data(f"mnist:{folder}", labels=True)
    with pytest.raises(ConfigError, match="'y_train' and 'y_test'"):
        load_data(str(tmp_path / "pair.npz"), labels=True)
    for spec, match in ((f"mnist:{folder}", "no t10k-labels-idx1-ubyte[.gz] beside the t10k images"),
                        (tmp_path / "nolabels.npz", "no labels: expected an array 'labels'")):
        rc, _, err = run_cli(capsys, "train", "--data", spec, "--conditional", "--out", tmp_path / "r", *TINY)
        assert_one_line_error(rc, err, match, "--conditional")


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("cls,kw", [
    (MLPVAE, dict(hidden_sizes=(16,))),
    (ConvVAE, dict(hidden_sizes=(16,), channels=(4,))),
    (ConvVAE, dict(hidden_sizes=(), channels=(4, 8))),  # the label goes straight into fc_mu
])
def test_conditional_model_uses_the_label_everywhere(cls, kw):
    torch.manual_seed(0)
    m = cls(input_shape=(1, 8, 8), latent_size=3, num_classes=4, **kw)
    with torch.no_grad():
        m.prior_net.weight.normal_()  # a prior that differs by class
    x, y = torch.rand(5, 1, 8, 8).bernoulli(), torch.tensor([0, 1, 2, 3, 0])
    recon, mu, logvar, pmu, plv = m(x, y)
    assert recon.shape == x.shape and pmu.shape == plv.shape == mu.shape == (5, 3)
    torch.testing.assert_close(pmu[0], pmu[4])  # the prior depends on the class alone
    torch.testing.assert_close(pmu, m.prior_net.weight[y, :3])
    loss = m.criterion(recon, x, mu, logvar, prior_mu=pmu, prior_logvar=plv)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.prior_net.weight.grad[:, :].abs().sum() > 0  # the prior is learned
    # the label changes the encoder's and the decoder's output
    other = (y + 1) % 4
    assert not torch.allclose(m.encode(x, y)[0], m.encode(x, other)[0])
    assert not torch.allclose(m.decode(mu, y), m.decode(mu, other))
    assert m.decode(torch.randn(7, 5, 3), y).shape == (7, 5, 1, 8, 8)  # a leading samples dimension
    assert m.sample(4, y=torch.arange(4)).shape == (4, 1, 8, 8) and m.reconstruct(x, y).shape == x.shape
    assert m.elbo(x, y=y).shape == (5,) and m.log_likelihood(x, 3, y=y).shape == (5,)
    assert vae_ext.VAE.from_config(m.config).config == m.config and m.config["num_classes"] == 4
    for bad, match in ((None, "needs the class labels"), (torch.tensor([0, 4, 1, 1, 1]), r"0\.\.3, found 0\.\.4"),
                       (torch.zeros(5), "integer tensor")):
        with pytest.raises(ValueError, match=match):
            m.encode(x, bad)
    with pytest.raises(ValueError, match="not class-conditional"):
        cls(input_shape=(1, 8, 8), latent_size=3, **kw).encode(x, y)


@pytest.mark.parametrize("cls,kw", [
    (MLPVAE, dict(hidden_sizes=(16,))),
    (ConvVAE, dict(hidden_sizes=(16,), channels=(4,))),
    (ConvVAE, dict(hidden_sizes=(), channels=(4, 8))),
])
@pytest.mark.parametrize("n_labels", [1, 3, 6])
def test_a_label_count_other_than_the_batch_is_named(cls, kw, n_labels):
    """Issue 30: not torch.cat's "Sizes of tensors must match" from inside the encoder."""
    m = cls(input_shape=(1, 8, 8), latent_size=3, num_classes=4, **kw)
    x, y = torch.rand(5, 1, 8, 8).bernoulli(), torch.zeros(n_labels, dtype=torch.long)
    calls = {"forward": lambda: m(x, y), "encode": lambda: m.encode(x, y), "loss": lambda: m.loss(x, y=y),
             "elbo": lambda: m.elbo(x, y=y), "log_likelihood": lambda: m.log_likelihood(x, 2, y=y),
             "reconstruct": lambda: m.reconstruct(x, y)}
    for call in calls.values():
        with pytest.raises(ValueError, match=rf"^y: expected 5 labels \(one per image of x\), got {n_labels}$"):
            call()


def test_conditional_elbo_and_sample_use_the_class_prior():
    torch.manual_seed(0)
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(16,), latent_size=3, num_classes=3)
    with torch.no_grad():
        m.prior_net.weight.normal_()
    x, y = torch.rand(6, 1, 8, 8).bernoulli(), torch.tensor([0, 1, 2, 0, 1, 2])
    _, _, kl = m.elbo(x, generator=torch.Generator().manual_seed(1), return_terms=True, y=y)
    mu, logvar = m.encode(x, y)
    pmu, plv = m.prior(y)
    torch.testing.assert_close(kl, vae_ext.reference.kl_divergence(mu, logvar, pmu, plv))
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    eps = torch.randn(3, 3, generator=g())
    want = m.mean(m.decode(pmu[:3] + torch.exp(0.5 * plv[:3]) * eps, y[:3]))
    torch.testing.assert_close(m.sample(3, generator=g(), y=y[:3]), want)


def _quadrature_log_px_given_y(m, x, y, lo=-14.0, hi=14.0, n=8001):
    """log p(x|y) = log of the integral of p(x|z,y) p(z|y) dz on a grid (latent size 1)."""
    z = torch.linspace(lo, hi, n, dtype=torch.float64).view(n, 1, 1).expand(n, len(x), 1)
    with torch.no_grad():
        logits = m.decode(z, y)  # (n, N, 1, 8, 8)
        pmu, plv = m.prior(y)
    log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand(n, *x.shape), reduction="none").flatten(2).sum(2)
    log_pz = -0.5 * ((z[..., 0] - pmu[:, 0]) ** 2 * torch.exp(-plv[:, 0]) + plv[:, 0] + math.log(2 * math.pi))
    return torch.logsumexp(log_px_z + log_pz, 0) + math.log((hi - lo) / (n - 1))


def test_conditional_log_likelihood_converges_to_the_exact_value():
    """-log p(x|y) by importance sampling with the class prior: within 0.05 nats of quadrature (a
    log p(z) that ignored the class prior, here near N(+-2, e^-+0.5), is off by nats)."""
    torch.manual_seed(0)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.bernoulli(torch.from_numpy(d.images[:96]).float().div(16).unsqueeze(1),
                        generator=torch.Generator().manual_seed(1))
    y = torch.from_numpy(d.target[:96]) % 2
    m = MLPVAE(input_shape=(1, 8, 8), hidden_sizes=(32,), latent_size=1, num_classes=2)
    with torch.no_grad():  # class priors far from N(0, 1); training moves them a little
        m.prior_net.weight.copy_(torch.tensor([[2.0, -0.5], [-2.0, 0.5]]))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for i in range(150):  # a trained model: q(z|x,y) near the posterior, p(x|z,y) depending on z
        train_step(m, m, opt, x[(i % 3) * 32:(i % 3 + 1) * 32], 1.0, y[(i % 3) * 32:(i % 3 + 1) * 32])
    assert (m.prior_net.weight[:, 0].abs() > 1.5).all()
    m = m.double()
    xs, ys = x[:6].double(), y[:6]
    exact = _quadrature_log_px_given_y(m, xs, ys)
    est = m.log_likelihood(xs, k=5000, y=ys, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, exact, rtol=0, atol=0.05)


# --------------------------------------------------------------------------- the command


def test_conditional_train_samples_eval_resume(capsys, tmp_path, monkeypatch):
    """A tiny --conditional run on digits: samples.png has one row per class (z from that class's
    prior), eval scores -log p(x|y) and reproduces the last test row, and resume continues exactly."""
    import vae_ext.cli.plots as P

    grids = {}
    real_grid = P.save_image_grid

    def spy(path, images, ncol=8, title=None):
        grids[Path(path).name] = (images.clone(), ncol, title)
        real_grid(path, images, ncol=ncol, title=title)

    monkeypatch.setattr(P, "save_image_grid", spy)
    a, b = tmp_path / "a", tmp_path / "b"
    rc, stdout, _ = run_cli(capsys, "train", "--conditional", "--epochs", "2", "--out", a, *TINY)
    assert rc == 0 and "class-conditional (10 classes)" in stdout
    assert (a / "samples.png").stat().st_size > 0
    images, ncol, title = grids["samples.png"]
    assert ncol == 8 and images.shape == (10 * 8, 1, 8, 8) and "one row per class" in title
    # row c: the decoder's means at z ~ p(z|y=c), drawn as the plot draws them
    from vae_ext.cli.checkpoint import model_from_checkpoint
    from vae_ext.cli.evaluate import EVAL_SEED

    ck = load_checkpoint(a)
    assert ck["config"]["conditional"] and ck["model_config"]["num_classes"] == 10
    m = model_from_checkpoint(ck).eval()
    want = m.sample(80, generator=torch.Generator().manual_seed(EVAL_SEED), y=torch.arange(10).repeat_interleave(8))
    torch.testing.assert_close(images, want)

    rc, stdout, _ = run_cli(capsys, "eval", a, "--k", "20", "--json", "--no-progress")
    import json

    r = json.loads(stdout)
    assert rc == 0 and r["conditional"] is True and r["n"] == 359
    assert r["nelbo"] == pytest.approx(float(read_csv(a / "metrics.csv")[-1]["test_nelbo"]), rel=1e-5)
    assert 0 < r["nll"] < r["nelbo"] + 1.0
    rc, stdout, _ = run_cli(capsys, "eval", a, "--k", "5", "--no-progress", "--reference")
    assert rc == 0 and "given the class: -log p(x|y)" in stdout

    assert run_cli(capsys, "train", "--conditional", "--epochs", "1", "--out", b, *TINY)[0] == 0
    rc, stdout, _ = run_cli(capsys, "train", "--resume", b, "--epochs", "2", "--no-progress")
    assert rc == 0 and "resuming after epoch 1" in stdout
    sa, sb = load_checkpoint(a)["model_state"], load_checkpoint(b)["model_state"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    rc, _, err = run_cli(capsys, "train", "--resume", b, "--epochs", "3", "--conditional", "--no-progress")
    assert rc == 0, err  # the same value again is fine


def test_conditional_option_is_fixed_on_resume(capsys, tmp_path):
    out = tmp_path / "plain"
    assert run_cli(capsys, "train", "--epochs", "1", "--out", out, *TINY)[0] == 0
    rc, _, err = run_cli(capsys, "train", "--resume", out, "--conditional", "--epochs", "2")
    assert_one_line_error(rc, err, "from another configuration: it was trained with --conditional False, not True")


def test_conditional_conv_run(capsys, tmp_path):
    rc, stdout, err = run_cli(capsys, "train", "--conditional", "--arch", "conv", "--channels", "4", "--hidden", "8",
                              "--latent", "2", "--epochs", "1", "--batch-size", "512", "--no-progress",
                              "--out", tmp_path / "c", "--reference")
    assert rc == 0, err
    rc, stdout, _ = run_cli(capsys, "eval", tmp_path / "c", "--k", "4", "--json", "--no-progress")
    assert rc == 0 and '"conditional": true' in stdout


def test_free_bits_floor_the_loss_and_log_the_true_kl(capsys, tmp_path):
    """With a floor of 2 nats per unit (4 for the two units) over a KL of well under that, the
    objective (train_loss) exceeds the negative ELBO, whose KL column is the true KL."""
    out = tmp_path / "fb"
    rc, stdout, err = run_cli(capsys, "train", "--free-bits", "2", "--epochs", "1", "--out", out, *TINY)
    assert rc == 0, err
    assert "free bits 2 nats/unit" in stdout
    row = read_csv(out / "metrics.csv")[0]
    kl, loss, nelbo = float(row["train_kl"]), float(row["train_loss"]), float(row["train_nelbo"])
    assert 0 < kl < 2.0
    assert loss - nelbo > 1.0  # the floored KL term, 4 nats per image minus the true KL
    assert load_checkpoint(out)["config"]["free_bits"] == 2.0
    # free bits may change on resume, as beta may
    rc, _, err = run_cli(capsys, "train", "--resume", out, "--free-bits", "0", "--epochs", "2", "--no-progress")
    assert rc == 0, err
    row = read_csv(out / "metrics.csv")[1]
    assert float(row["train_loss"]) == pytest.approx(float(row["train_nelbo"]), abs=1e-3)


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc", ""])
def test_bad_free_bits_is_one_line(capsys, tmp_path, value):
    rc, _, err = run_cli(capsys, "train", "--free-bits", value, "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "argument --free-bits: expected a number >= 0", status=2)
    with pytest.raises(ConfigError, match="--free-bits"):
        TrainConfig(free_bits=-0.5)


def test_active_units_column(capsys, tmp_path, monkeypatch):
    """metrics.csv keeps its columns in order and appends active_units: the units whose batch-mean KL,
    averaged over the epoch's steps, exceeds 0.01 nats (here forced: 0.5 and 0.011 on every step;
    unit 2 alternates 0.004 and 0.012, unit 3 0.018 and 0: over 0.01 on some steps, not on average)."""
    import vae_ext.cli.train as T

    assert METRIC_COLUMNS[:13] == ("epoch", "step", "beta", "train_loss", "train_nelbo", "train_rec", "train_kl",
                                   "test_nelbo", "test_rec", "test_kl", "skipped", "lr", "seconds")
    assert METRIC_COLUMNS[13:] == ("active_units",)
    real, n = T._loss_and_gradients, {"step": 0}
    forced = [torch.tensor([0.5, 0.011, 0.004, 0.018]), torch.tensor([0.5, 0.011, 0.012, 0.0])]

    def fake(*a, **k):
        loss, rec, kl, unit_kl = real(*a, **k)
        n["step"] += 1
        return loss, rec, kl, forced[n["step"] % 2].to(unit_kl.dtype)

    monkeypatch.setattr(T, "_loss_and_gradients", fake)
    out = tmp_path / "au"
    rc, stdout, err = run_cli(capsys, "train", "--epochs", "1", "--out", out, "--hidden", "16", "--latent", "4",
                              "--batch-size", "240", "--no-progress")  # 6 steps: 3 of each
    assert rc == 0, err
    assert "active units 2/4" in stdout
    with open(out / "metrics.csv") as f:
        assert f.readline().strip().split(",") == list(METRIC_COLUMNS)
    assert read_csv(out / "metrics.csv")[0]["active_units"] == "2"
    monkeypatch.setattr(T, "_loss_and_gradients", real)
    rc, stdout, _ = run_cli(capsys, "train", "--resume", out, "--epochs", "2", "--no-progress")
    au = int(read_csv(out / "metrics.csv")[1]["active_units"])
    assert rc == 0 and 0 <= au <= 4 and f"active units {au}/4" in stdout


def test_conditional_checkpoint_checks(capsys, tmp_path):
    """A checkpoint whose model does not match its 'conditional' option, and eval on labels the model
    does not know: one line each."""
    out = tmp_path / "c"
    assert run_cli(capsys, "train", "--conditional", "--epochs", "1", "--out", out, *TINY)[0] == 0
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    del ck["model_config"]["num_classes"]
    torch.save(ck, tmp_path / "bad.pt")
    rc, _, err = run_cli(capsys, "eval", tmp_path / "bad.pt", "--k", "2", "--no-progress")
    assert_one_line_error(rc, err, "malformed checkpoint: 'model_config'", "num_classes")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "more.npz", x_train=rng.random((4, 8, 8)), x_test=rng.random((3, 8, 8)),
             y_train=np.arange(4), y_test=np.array([0, 11, 3]))
    rc, _, err = run_cli(capsys, "eval", out, "--data", tmp_path / "more.npz", "--k", "2", "--no-progress")
    assert_one_line_error(rc, err, "has class labels up to 11 but the model in", "knows 10 classes")
