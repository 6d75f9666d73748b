"""The PNGs of a --model hvae run that differ from a flat VAE's: ``samples.png`` with a row per
temperature, and ``kl_per_layer.png``, the KL of each latent layer (which layers the model uses)."""
from __future__ import annotations

import math

import torch

from ..models.hvae import SAMPLE_TEMPERATURES
from .plots import _pyplot, _save_figure, save_image_grid

__all__ = ["save_temperature_samples", "save_kl_per_layer"]

SAMPLES_PER_ROW = 8


def save_temperature_samples(path, model, data, generator: torch.Generator) -> None:
    """A row of samples per temperature of SAMPLE_TEMPERATURES (each prior's sigma times t, VDVAE's
    way), each row from the same draws of the generator's state."""
    state = generator.get_state()
    rows = []
    for t in SAMPLE_TEMPERATURES:
        generator.set_state(state)
        rows.append(data.to_unit(model.sample(SAMPLES_PER_ROW, generator=generator, temperature=t)))
    temps = ", ".join(f"{t:g}" for t in SAMPLE_TEMPERATURES)
    save_image_grid(path, torch.cat(rows), ncol=SAMPLES_PER_ROW,
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
