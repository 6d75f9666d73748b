"""The PNGs of a run and of a sweep (matplotlib, drawn off-screen and written atomically); a
hierarchical VAE's samples at several temperatures and the KL of its latent layers."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..models import VAE
from ..models.hvae import SAMPLE_TEMPERATURES
from .data import ImageData
from .evaluate import EVAL_SEED
from .runfiles import atomic_write

__all__ = ["save_image_grid", "save_loss_curves", "save_plots", "save_sweep_plot", "save_temperature_samples",
           "save_kl_per_layer"]


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


# samples.png of a conditional model: a row of this many samples per class, for at most MAX_CLASS_ROWS
# classes (the first ones), so the figure stays readable
SAMPLES_PER_CLASS = 8
MAX_CLASS_ROWS = 20


def save_plots(out: Path, model: VAE, data: ImageData, history) -> None:
    """reconstructions.png (rows of test images above their reconstructions), samples.png (for a
    class-conditional model one row per class, z from that class's prior; for a hierarchical VAE one
    row per temperature), loss_curves.png, and for a hierarchical VAE kl_per_layer.png."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ncol = min(8, len(data.test))
    n = min(32, len(data.test)) // ncol * ncol
    x = data.test[:n].to(dev)
    y = data.test_labels[:n] if model.conditional else None
    # drawn in [0, 1]: data on a grid in [-1, 1] (--recon dmol) is mapped there (data.to_unit)
    rec = data.to_unit(model.reconstruct(x, y))
    x = data.to_unit(x)
    rows = torch.stack([x.reshape(-1, ncol, *x.shape[1:]), rec.reshape(-1, ncol, *x.shape[1:])], 1)
    save_image_grid(out / "reconstructions.png", rows.reshape(-1, *x.shape[1:]), ncol=ncol,
                    title="test images (odd rows) and reconstructions (even rows)")
    g = torch.Generator(device=dev).manual_seed(EVAL_SEED)
    if model.conditional:
        classes = min(model.num_classes, MAX_CLASS_ROWS)
        y = torch.arange(classes, device=dev).repeat_interleave(SAMPLES_PER_CLASS)
        more = f" (first {classes} of {model.num_classes})" if classes < model.num_classes else ""
        samples = data.to_unit(model.sample(len(y), generator=g, y=y))
        save_image_grid(out / "samples.png", samples, ncol=SAMPLES_PER_CLASS,
                        title=f"samples, one row per class 0..{classes - 1}{more}, z ~ p(z|y)")
    elif getattr(model, "hierarchical", False):  # rows at several temperatures, and the KL per layer
        save_temperature_samples(out / "samples.png", model, data, g)
        if history:
            save_kl_per_layer(out / "kl_per_layer.png", model, history)
    else:
        what = "samples x ~ p(x|z) (dmol_sample)" if model.recon == "dmol" else "samples"
        save_image_grid(out / "samples.png", data.to_unit(model.sample(64, generator=g)), ncol=8, title=what)
    if history:
        save_loss_curves(out / "loss_curves.png", history)
    model.train(was_training)


# --------------------------------------------------------------------------- a hierarchical VAE's (--model hvae)
TEMPERATURE_SAMPLES = 8


def save_temperature_samples(path, model, data, generator: torch.Generator) -> None:
    """A row of samples per temperature of SAMPLE_TEMPERATURES (each prior's sigma times t, VDVAE's
    way), each row from the same draws of the generator's state."""
    state = generator.get_state()
    rows = []
    for t in SAMPLE_TEMPERATURES:
        generator.set_state(state)
        rows.append(data.to_unit(model.sample(TEMPERATURE_SAMPLES, generator=generator, temperature=t)))
    temps = ", ".join(f"{t:g}" for t in SAMPLE_TEMPERATURES)
    save_image_grid(path, torch.cat(rows), ncol=TEMPERATURE_SAMPLES,
                    title=f"samples, prior temperature t = {temps} (rows)")


def save_kl_per_layer(path, model, history) -> None:
    """Bars: the last epoch's training KL of each latent layer (nats per image), top layer first,
    labelled by resolution; the layers whose KL stays under 0.01 nats are unused."""
    names = [f"kl_{i + 1}_{r}x{r}" for i, r in enumerate(model.layer_resolutions)]
    last = history[-1]
    values = [float(last.get(n, math.nan)) for n in names]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{i + 1}\n{r}x{r}" for i, r in enumerate(model.layer_resolutions)], fontsize=7)
    ax.set_xlabel("latent layer (top-down) and resolution")
    ax.set_ylabel("KL (nats / image)")
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(f"KL of each latent layer, epoch {last['epoch']} (training)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save_figure(fig, path)


def save_sweep_plot(path, rows) -> None:
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
