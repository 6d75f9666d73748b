"""Training, evaluation and the latent-size sweep behind ``vae-ext train | eval | sweep``.

The programmatic entry points are :func:`train` (one run, resumable, data-parallel under torchrun),
:func:`evaluate_checkpoint` (test negative ELBO and importance-weighted NLL) and :func:`sweep`.
User mistakes raise :class:`vae_ext.errors.VaeExtError` subclasses with a one-line message.

A run folder holds ``checkpoint.pt`` (model, optimizer, config, epoch, history), ``metrics.csv``
and the PNGs ``reconstructions.png``, ``samples.png`` and ``loss_curves.png``. Every file is written
to a temporary name and renamed into place (``os.replace``), so an interruption never leaves a
half-written file: what is there is the last complete version.
"""
from __future__ import annotations

import csv
import io
import math
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler
from tqdm import tqdm

from .data import BINARIZE_MODES, TEST_BINARIZE_SEED, ImageData, binarize, load_data, parse_split
from .distributed import Context, resolve_device, setup
from ._interrupts import deferred as _interrupts_deferred
from .errors import CheckpointError, ConfigError, DataError, VaeExtError
from .functional import RECON_MODES
from .models import ARCHS, VAE

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "train_step",
    "evaluate",
    "evaluate_checkpoint",
    "sweep",
    "load_checkpoint",
    "resume_config",
    "model_from_checkpoint",
    "atomic_write",
]

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.csv"
CHECKPOINT_FORMAT = "vae_ext.checkpoint"
CHECKPOINT_VERSION = 1
EVAL_SEED = 1234  # the eps of the test ELBO: fixed, so epochs and runs are compared on the same draws
DEFAULT_HIDDEN = {"mlp": (400,), "conv": (256,)}
DEFAULT_CHANNELS = (32, 64)
# Options that define the model and its data: a resumed run must keep them.
FIXED_ON_RESUME = ("data", "train_split", "binarize", "arch", "latent", "hidden", "channels", "recon")
METRIC_COLUMNS = ("epoch", "step", "beta", "train_loss", "train_nelbo", "train_rec", "train_kl",
                  "test_nelbo", "test_rec", "test_kl", "lr", "seconds")


def _normalize_data_spec(spec: str) -> str:
    """Make a data path absolute, so a checkpoint's data can be found from any folder."""
    if spec.startswith("mnist:") and len(spec) > 6:
        return "mnist:" + os.path.abspath(spec[6:])
    if spec.startswith("npz:"):
        return "npz:" + os.path.abspath(spec[4:])
    if spec.endswith(".npz"):
        return os.path.abspath(spec)
    return spec


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoint). CLI option = field name."""

    data: str = "digits"
    train_split: int | float | None = None  # a single pool of images: first N (or fraction) to train
    binarize: str = "dynamic"
    arch: str = "mlp"
    latent: int = 20
    hidden: list | None = None  # None: 400 (mlp) or 256 (conv)
    channels: list | None = None  # conv only; None: 32,64
    recon: str = "bce_logits"
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    warmup: float = 0.0  # epochs over which the KL weight rises linearly from 0 to beta
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    reference: bool = False  # vae_ext.reference (plain PyTorch) instead of the fused kernels
    progress: bool = True
    plot_every: int = 0  # also write the PNGs every N epochs (0: only at the end)

    def __post_init__(self):
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ConfigError(f"--{name.replace('_', '-')}: expected one of {', '.join(options)}, "
                                  f"got {getattr(self, name)!r}")

        def number(name, kind, lo, lo_ok=True):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                raise ConfigError(f"--{name.replace('_', '-')}: expected {'a number' if kind is float else 'an integer'}, got {v!r}")
            if not math.isfinite(v) or v < lo or (v == lo and not lo_ok):
                rel = ">=" if lo_ok else ">"
                raise ConfigError(f"--{name.replace('_', '-')}: expected a value {rel} {lo}, got {v!r}")
            setattr(self, name, kind(v))

        choice("arch", tuple(ARCHS))
        choice("recon", RECON_MODES)
        choice("binarize", BINARIZE_MODES)
        number("latent", int, 1)
        number("epochs", int, 0)
        number("batch_size", int, 1)
        number("lr", float, 0.0, lo_ok=False)
        number("beta", float, 0.0)
        number("warmup", float, 0.0)
        number("seed", int, 0)
        number("plot_every", int, 0)
        self.train_split = parse_split(self.train_split)
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"--data: expected 'digits', 'mnist:DIR' or FILE.npz, got {self.data!r}")
        self.data = _normalize_data_spec(self.data)
        for name in ("hidden", "channels"):
            v = getattr(self, name)
            if v is not None:
                v = [int(s) for s in v]
                if any(s < 1 for s in v):
                    raise ConfigError(f"--{name}: expected positive sizes, got {v}")
                setattr(self, name, v)
        if self.hidden is None:
            self.hidden = list(DEFAULT_HIDDEN[self.arch])
        if self.arch == "mlp" and not self.hidden:
            raise ConfigError("--hidden: the mlp needs at least one hidden layer")
        if self.arch == "conv" and self.channels is None:
            self.channels = list(DEFAULT_CHANNELS)
        if self.arch == "mlp" and self.channels is not None:
            raise ConfigError("--channels: only the conv architecture has convolutions (pass --arch conv)")
        if self.out is not None:
            self.out = str(self.out)


def build_model(cfg: TrainConfig, image_shape) -> VAE:
    kwargs = dict(arch=cfg.arch, input_shape=tuple(image_shape), latent_size=cfg.latent,
                  hidden_sizes=cfg.hidden, recon=cfg.recon, fused=not cfg.reference)
    if cfg.arch == "conv":
        if len(image_shape) != 3:
            raise ConfigError(f"--arch conv: expected (C, H, W) images, got shape {tuple(image_shape)}")
        kwargs["channels"] = cfg.channels
    try:
        return VAE(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


# --------------------------------------------------------------------------- files


def atomic_write(path, write, mode: str = "wb") -> None:
    """Write a file through ``write(f)`` into a temporary sibling, then rename it into place.

    A signal that arrives meanwhile (``vae_ext._interrupts``) is raised once the file is in place.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _interrupts_deferred():
            with open(tmp, mode) as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(path, columns, rows) -> None:
    """Rows of dicts as CSV (floats to 6 significant digits), written atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, lambda f: f.write(buf.getvalue()), mode="w")


def _save_checkpoint(path, model, optimizer, cfg, epoch, history, data: ImageData) -> None:
    state = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": asdict(cfg),
        "model_config": model.config,
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "epoch": epoch,
        "history": history,
        "data": {"name": data.name, "image_shape": list(data.image_shape),
                 "n_train": len(data.train), "n_test": len(data.test)},
    }
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path) -> dict:
    """Read and check a checkpoint (a file, or a run folder holding checkpoint.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the one-line error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in msg.lower() or isinstance(e, pickle.UnpicklingError):
            msg = "not a PyTorch checkpoint of tensors and plain values"
        elif "zip archive" in msg:
            msg = "truncated, or not a PyTorch zip archive"
        raise CheckpointError(f"{path}: not a readable vae-ext checkpoint ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a vae-ext checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {ckpt['version']} is newer than this vae_ext reads "
                              f"({CHECKPOINT_VERSION})")
    ckpt["path"] = str(path)
    return ckpt


def _config_of(ckpt: dict) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{ckpt['path']}: its stored configuration is invalid ({e})") from None


def resume_config(ckpt: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's configuration with ``overrides`` (options given explicitly) applied.

    Options that define the model or its data (:data:`FIXED_ON_RESUME`) must equal the stored ones.
    """
    saved = _config_of(ckpt)
    merged = TrainConfig(**{**asdict(saved), **overrides})
    for name in FIXED_ON_RESUME:
        if name in overrides and getattr(merged, name) != getattr(saved, name):
            opt = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"{ckpt['path']} is from another configuration: it was trained with {opt} "
                f"{_fmt(getattr(saved, name))}, not {_fmt(getattr(merged, name))} (start a new run in another --out)"
            )
    return merged


def _fmt(v) -> str:
    if v is None:
        return "(default)"
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _load_model_state(model: VAE, ckpt: dict) -> None:
    try:
        model.load_state_dict(ckpt["model_state"])
    except (KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt['path']}: the weights do not match the model's configuration ({first})") from None


def model_from_checkpoint(ckpt: dict, *, fused: bool = True, device="cpu") -> VAE:
    """The checkpoint's model, on ``device``, with the fused kernels or (``fused=False``) the reference."""
    try:
        model = VAE.from_config(ckpt["model_config"], fused=fused)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt['path']}: its stored model configuration is invalid ({e})") from None
    _load_model_state(model, ckpt)
    return model.to(device)


def _check_image_shape(data: ImageData, model_shape, what: str) -> None:
    if tuple(data.image_shape) != tuple(model_shape):
        s = lambda t: "x".join(map(str, t))  # noqa: E731
        raise DataError(f"{data.name}: images are {s(data.image_shape)} but {what} expects {s(model_shape)}")


# --------------------------------------------------------------------------- plots


def _grid(images: torch.Tensor, ncol: int):
    """(n, C, H, W) in [0, 1] -> an (rows*(H+1)+1, ncol*(W+1)+1[, 3]) array with 1-pixel gaps."""
    images = images.detach().float().cpu().clamp(0, 1)
    n, c, h, w = images.shape
    if c not in (1, 3):
        images, c = images[:, :1], 1
    rows = math.ceil(n / ncol)
    grid = torch.full((c, rows * (h + 1) + 1, ncol * (w + 1) + 1), 0.5)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[i]
    return grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path) -> None:
    plt = _pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)


def save_image_grid(path, images: torch.Tensor, ncol: int = 8, title: str | None = None) -> None:
    plt = _pyplot()
    g = _grid(images.reshape(images.shape[0], -1, *images.shape[-2:]) if images.dim() != 4 else images, ncol)
    h, w = g.shape[:2]
    scale = 4.0 / max(h, w)
    fig = plt.figure(figsize=(max(2.0, w * scale), max(2.0, h * scale) + (0.3 if title else 0)))
    ax = fig.add_axes((0, 0, 1, 0.92 if title else 1))
    ax.imshow(g, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    _save_figure(fig, path)


def save_loss_curves(path, history) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = [r["epoch"] for r in history]
    ax.plot(ep, [r["train_nelbo"] for r in history], "o-", ms=3, label="train")
    ax.plot(ep, [r["test_nelbo"] for r in history], "o-", ms=3, label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO (nats / image)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)


def save_plots(out: Path, model: VAE, data: ImageData, history) -> None:
    """reconstructions.png (rows of test images above their reconstructions), samples.png, loss_curves.png."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ncol = min(8, len(data.test))
    x = data.test[:min(32, len(data.test)) // ncol * ncol].to(dev)
    rec = model.reconstruct(x)
    rows = torch.stack([x.reshape(-1, ncol, *x.shape[1:]), rec.reshape(-1, ncol, *x.shape[1:])], 1)
    save_image_grid(out / "reconstructions.png", rows.reshape(-1, *x.shape[1:]), ncol=ncol,
                    title="test images (odd rows) and reconstructions (even rows)")
    g = torch.Generator(device=dev).manual_seed(EVAL_SEED)
    save_image_grid(out / "samples.png", model.sample(64, generator=g), ncol=8, title="samples")
    if history:
        save_loss_curves(out / "loss_curves.png", history)
    model.train(was_training)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    model: VAE
    config: TrainConfig
    history: list
    out: Path
    checkpoint: Path
    data: ImageData


def train_step(net, model: VAE, optimizer, x: torch.Tensor, beta: float):
    """One optimizer step on the summed negative ELBO; returns the detached (loss, rec, kl) sums.

    ``net`` is the module to call (``model`` itself, or its DistributedDataParallel wrapper).
    """
    model.criterion.beta = beta
    optimizer.zero_grad(set_to_none=True)
    recon, mu, logvar = net(x)
    loss, rec, kl = model.criterion(recon, x, mu, logvar, return_terms=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), rec.detach(), kl.detach()


@torch.no_grad()
def evaluate(model: VAE, images: torch.Tensor, ctx: Context | None = None, *, batch_size: int = 1000,
             seed: int = EVAL_SEED) -> dict:
    """Mean negative ELBO (and its terms) per image over ``images``, in nats; one z per image, drawn
    from a generator seeded with ``seed`` (so repeated evaluations use the same eps).
    Under torchrun each rank takes every world_size-th image and the sums are all-reduced."""
    ctx = ctx or Context()
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    shard = images[ctx.rank::ctx.world_size]
    g = torch.Generator(device=dev).manual_seed(seed + ctx.rank)
    sums = torch.zeros(4, dtype=torch.float64, device=dev)
    for b in torch.split(shard, batch_size):
        elbo, log_px_z, kl = model.elbo(b.to(dev), generator=g, return_terms=True)
        sums += torch.stack([-elbo.sum(), -log_px_z.sum(), kl.sum(), elbo.new_tensor(len(b))]).double()
    ctx.all_reduce_sum(sums)
    model.train(was_training)
    s = sums.tolist()
    n = max(s[3], 1.0)
    return {"nelbo": s[0] / n, "rec": s[1] / n, "kl": s[2] / n, "n": int(s[3])}


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # The random draws of an epoch (eps, dynamic binarization) depend on (seed, epoch, rank) only:
    # a resumed run continues exactly as an uninterrupted one, and ranks draw different noise.
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (1 << 63)


def train(cfg: TrainConfig, checkpoint: dict | None = None, *, log=print) -> TrainResult:
    """Train (or, given a loaded ``checkpoint``, resume) a VAE; see the module docstring for outputs.

    Under ``torchrun`` (WORLD_SIZE > 1) this is one rank of a DistributedDataParallel job; rank 0
    logs and writes files. ``log`` receives the progress lines (rank 0 only).
    """
    ctx = setup(cfg.device, fused=not cfg.reference)
    try:
        return _train(cfg, checkpoint, ctx, log if ctx.is_main else (lambda *a, **k: None))
    finally:
        ctx.close()


def _train(cfg: TrainConfig, checkpoint, ctx: Context, log) -> TrainResult:
    if cfg.out is None:
        cfg = replace(cfg, out=ctx.broadcast_object(os.path.join("runs", time.strftime("vae-%Y%m%d-%H%M%S"))))
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_NAME
    if ckpt_path.exists() and (checkpoint is None or not ckpt_path.samefile(checkpoint["path"])):
        what = "pass --resume to continue it" if checkpoint is None else "resume into that folder or an empty one"
        raise ConfigError(f"{out} already holds a run ({CHECKPOINT_NAME}); {what}, or choose another --out")
    data = load_data(cfg.data, train_split=cfg.train_split, binarize_mode=cfg.binarize)
    if checkpoint is not None:
        _check_image_shape(data, checkpoint["model_config"]["input_shape"], f"the model in {checkpoint['path']}")

    dev = ctx.device
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.image_shape)
    if checkpoint is not None:
        _load_model_state(model, checkpoint)
    model.to(dev)
    net = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, start = [], 0
    if checkpoint is not None:
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{checkpoint['path']}: optimizer state does not fit the model ({e})") from None
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        history, start = list(checkpoint["history"]), int(checkpoint["epoch"])

    train_x = data.train.to(dev)
    sampler = DistributedSampler(range(len(train_x)), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=cfg.seed)
    steps = math.ceil(len(sampler) / cfg.batch_size)
    warmup_steps = cfg.warmup * steps
    step = int(history[-1]["step"]) if history else 0

    kernels = "vae_ext.reference (plain PyTorch)" if cfg.reference else "fused vae_ext kernels"
    log(f"data: {data.describe()}, binarize {cfg.binarize}")
    log(f"model: {type(model).__name__} {'x'.join(map(str, data.image_shape))} -> hidden {_fmt(cfg.hidden)} -> "
        f"latent {cfg.latent} ({model.num_parameters():,} parameters), recon {cfg.recon}, {kernels}")
    where = f"{ctx.world_size} processes (DDP), " if ctx.distributed else ""
    log(f"training on {where}{dev}; writing {out}" + (f"; resuming after epoch {start}" if checkpoint else ""))
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if start >= cfg.epochs:
        log(f"already trained for {start} epochs (--epochs {cfg.epochs}); nothing to do")

    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, ctx.rank))
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, rec, kl, images
        beta = cfg.beta
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=not (ctx.is_main and cfg.progress), dynamic_ncols=True)
        with bar:
            for i, idx in enumerate(BatchSampler(sampler, cfg.batch_size, drop_last=False)):
                x = train_x[torch.as_tensor(idx, device=dev)]
                if cfg.binarize == "dynamic":
                    x = binarize(x)
                beta = cfg.beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else cfg.beta
                loss, rec, kl = train_step(net, model, optimizer, x, beta)
                step += 1
                sums += torch.stack([loss, rec, kl, loss.new_tensor(len(idx))]).double()
                bar.update()
                if i % 10 == 9 or i == steps - 1:
                    running = (sums[0] / sums[3]).item()
                    if not math.isfinite(running):
                        raise VaeExtError(f"training diverged: the loss is {running} in epoch {epoch}; "
                                          f"try a lower --lr or a KL --warmup")
                    bar.set_postfix(loss=f"{running:.2f}")
        ctx.all_reduce_sum(sums)
        s = sums.tolist()
        c = model.log_norm_const
        test = evaluate(model, data.test, ctx)
        row = {"epoch": epoch, "step": step, "beta": beta, "train_loss": s[0] / s[3],
               "train_nelbo": (s[1] + s[2]) / s[3] + c, "train_rec": s[1] / s[3] + c, "train_kl": s[2] / s[3],
               "test_nelbo": test["nelbo"], "test_rec": test["rec"], "test_kl": test["kl"], "lr": cfg.lr,
               "seconds": time.perf_counter() - t0}
        history.append(row)
        if ctx.is_main:
            _save_checkpoint(ckpt_path, model, optimizer, cfg, epoch, history, data)
            write_csv(out / METRICS_NAME, METRIC_COLUMNS, history)
            if cfg.plot_every and epoch % cfg.plot_every == 0 and epoch != cfg.epochs:
                save_plots(out, model, data, history)
        log(f"epoch {epoch:3d}/{cfg.epochs}  train -ELBO {row['train_nelbo']:8.3f}  test -ELBO "
            f"{row['test_nelbo']:8.3f} nats/image  (KL {row['test_kl']:.2f}, beta {beta:.2f}, {row['seconds']:.1f} s)")

    if ctx.is_main:
        if not ckpt_path.exists():  # resumed past the end, or --epochs 0: still leave a checkpoint
            _save_checkpoint(ckpt_path, model, optimizer, cfg, start, history, data)
            write_csv(out / METRICS_NAME, METRIC_COLUMNS, history)
        save_plots(out, model, data, history)
        log(f"wrote {ckpt_path}, {out / METRICS_NAME}, reconstructions.png, samples.png"
            + (", loss_curves.png" if history else ""))
    ctx.barrier()
    return TrainResult(model=model, config=cfg, history=history, out=out, checkpoint=ckpt_path, data=data)


# --------------------------------------------------------------------------- evaluation


def _eval_images(data: ImageData, split: str) -> torch.Tensor:
    """The images to score: the test set, or the training set binarized once (fixed seed) if the run
    binarizes (dynamic binarization leaves the stored training images in [0, 1])."""
    if split == "test":
        return data.test
    if data.binarize == "dynamic":
        return binarize(data.train, torch.Generator().manual_seed(TEST_BINARIZE_SEED + 1))
    return data.train


@torch.no_grad()
def importance_weighted_nll(model: VAE, images: torch.Tensor, k: int, *, batch_size: int = 100,
                            seed: int = 0, progress: bool = False, desc: str = "IW NLL") -> torch.Tensor:
    """-log p(x) per image estimated with k importance samples (``VAE.log_likelihood``), batched."""
    model.eval()
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    batches = torch.split(images, batch_size)
    for b in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress, dynamic_ncols=True):
        out.append(-model.log_likelihood(b.to(dev), k, generator=g).double().cpu())
    return torch.cat(out)


def evaluate_checkpoint(path, *, k: int = 5000, data: str | None = None, train_split=None, split: str = "test",
                        device: str = "auto", reference: bool = False, seed: int = 0, batch_size: int = 100,
                        progress: bool = True) -> dict:
    """Test negative ELBO and the k-sample importance-weighted NLL of a checkpoint, in nats per image."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("eval runs as one process; start it without torchrun")
    if k < 1:
        raise ConfigError(f"--k: expected an integer >= 1, got {k}")
    ckpt = load_checkpoint(path)
    cfg = _config_of(ckpt)
    dev = resolve_device(device, fused=not reference)
    d = load_data(data or cfg.data, train_split=train_split if data else cfg.train_split, binarize_mode=cfg.binarize)
    _check_image_shape(d, ckpt["model_config"]["input_shape"], f"the model in {ckpt['path']}")
    model = model_from_checkpoint(ckpt, fused=not reference, device=dev)
    images = _eval_images(d, split)
    t0 = time.perf_counter()
    nelbo = evaluate(model, images)["nelbo"]
    t1 = time.perf_counter()
    nll = importance_weighted_nll(model, images, k, batch_size=batch_size, seed=seed, progress=progress)
    t2 = time.perf_counter()
    return {"checkpoint": ckpt["path"], "epoch": ckpt["epoch"], "data": d.name, "split": split, "n": len(images),
            "k": k, "nelbo": nelbo, "nll": nll.mean().item(), "nll_sem": (nll.std() / math.sqrt(len(nll))).item(),
            "seconds_elbo": t1 - t0, "seconds_nll": t2 - t1, "kernels": "reference" if reference else "fused",
            "device": str(dev)}


# --------------------------------------------------------------------------- sweep

SWEEP_COLUMNS = ("latent", "params_total", "params_decoder", "n_train", "n_test", "k", "train_nelbo", "test_nelbo",
                 "train_nll", "test_nll", "bic", "bic_all_params")


def _save_sweep_plot(path, rows) -> None:
    plt = _pyplot()
    lat = [r["latent"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(lat, [r["train_nelbo"] for r in rows], "o-", label="train -ELBO")
    a.plot(lat, [r["test_nelbo"] for r in rows], "o-", label="test -ELBO")
    a.plot(lat, [r["test_nll"] for r in rows], "s--", label=f"test NLL (k={rows[0]['k']})")
    a.set_xlabel("latent size")
    a.set_ylabel("nats / image")
    a.set_title("ELBO and importance-weighted NLL")
    b.plot(lat, [r["bic"] for r in rows], "o-", label="BIC (decoder parameters)")
    b.plot(lat, [r["bic_all_params"] for r in rows], "o:", alpha=0.6, label="BIC (all parameters)")
    best = min(rows, key=lambda r: r["bic"])
    b.axvline(best["latent"], color="gray", lw=0.8, ls="--")
    b.set_xlabel("latent size")
    b.set_ylabel("BIC (nats; lower is better)")
    b.set_title(f"BIC on the {rows[0]['n_train']} training images")
    for ax in (a, b):
        ax.set_xscale("log")
        ax.set_xticks(lat)
        ax.set_xticklabels([str(v) for v in lat])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def sweep(latents, base: TrainConfig, *, k: int = 1000, overrides: dict | None = None, log=print) -> list:
    """Train one model per latent size into ``base.out/latent-L`` and score each.

    For every latent size: train and test negative ELBO, train and test importance-weighted NLL with
    k samples, and BIC = -2 * (total log-likelihood estimate on the training set)
    + (number of parameters) * ln(number of training images). ``bic`` counts the decoder's parameters
    (the generative model p(x|z)p(z); the encoder only serves the estimate), ``bic_all_params``
    counts all. Writes ``sweep.csv`` and ``sweep.png`` after each model, so partial results survive.
    A folder whose checkpoint exists is resumed (its configuration must match), so a sweep can be
    restarted.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("sweep runs as one process; start it without torchrun")
    latents = list(latents)
    if not latents:
        raise ConfigError("--latent: expected at least one latent size")
    out = Path(base.out or os.path.join("runs", time.strftime("sweep-%Y%m%d-%H%M%S")))
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(overrides if overrides is not None else asdict(base))
    rows = []
    for lat in latents:
        run = out / f"latent-{lat}"
        opts = {**overrides, "latent": lat, "out": str(run)}
        ckpt = load_checkpoint(run) if (run / CHECKPOINT_NAME).exists() else None
        cfg = resume_config(ckpt, opts) if ckpt else TrainConfig(**{**asdict(base), **opts})
        log(f"--- latent size {lat}: {run}")
        res = train(cfg, ckpt, log=log)
        model, data = res.model, res.data
        train_imgs, test_imgs = _eval_images(data, "train"), _eval_images(data, "test")
        train_nll = importance_weighted_nll(model, train_imgs, k, progress=cfg.progress, desc="IW NLL train")
        test_nll = importance_weighted_nll(model, test_imgs, k, progress=cfg.progress, desc="IW NLL test")
        n = len(train_imgs)
        p_dec, p_all = model.num_parameters("decoder"), model.num_parameters()
        total_ll = -train_nll.sum().item()
        row = {"latent": lat, "params_total": p_all, "params_decoder": p_dec, "n_train": n, "n_test": len(test_imgs),
               "k": k, "train_nelbo": evaluate(model, train_imgs)["nelbo"], "test_nelbo": evaluate(model, test_imgs)["nelbo"],
               "train_nll": train_nll.mean().item(), "test_nll": test_nll.mean().item(),
               "bic": -2 * total_ll + p_dec * math.log(n), "bic_all_params": -2 * total_ll + p_all * math.log(n)}
        rows.append(row)
        log(f"latent {lat}: test -ELBO {row['test_nelbo']:.3f}, test NLL {row['test_nll']:.3f} (k={k}), "
            f"BIC {row['bic']:.6g}")
        write_csv(out / "sweep.csv", SWEEP_COLUMNS, rows)
        _save_sweep_plot(out / "sweep.png", rows)
    log(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
    return rows
