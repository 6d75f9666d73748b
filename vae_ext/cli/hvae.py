"""``vae-ext train --model hvae``: what training adds for the hierarchical VAE
(:class:`vae_ext.models.HVAE`), kept out of train.py: building it, its metrics.csv columns (the KL
of each latent layer), and the training summary's test likelihood in bits per dimension (ELBO and
importance-weighted). Its options: cli/hvae_config.py.
"""
from __future__ import annotations

import math

import torch

from ..models import VAE
from ..models.dmol import bits_per_dim
from .errors import ConfigError
from .evaluate import evaluate, importance_weighted_nll

__all__ = ["build_hvae", "layer_names", "layer_columns", "layer_row", "test_summary"]


def build_hvae(cfg, image_shape) -> tuple:
    """(keyword arguments of VAE(...), the options that size it, for messages)."""
    if len(image_shape) != 3:
        raise ConfigError(f"--model hvae: expected (C, H, W) images, got shape {list(image_shape)}")
    kwargs = dict(arch="hvae", input_shape=tuple(image_shape), width=cfg.width, layers=cfg.layers,
                  latent_size=cfg.latent, mixtures=cfg.mixtures, num_bits=cfg.num_bits, fused=not cfg.reference)
    sizes = f"--model hvae --width {cfg.width} --layers {cfg.layers} --latent {cfg.latent} --mixtures {cfg.mixtures}"
    return kwargs, sizes


def layer_names(model: VAE) -> list:
    """The per-layer KL columns of metrics.csv: ``kl_<i>_<R>x<R>``, layer i (1: the top) at resolution R."""
    return [f"kl_{i + 1}_{r}x{r}" for i, r in enumerate(model.layer_resolutions)]


def layer_columns(model: VAE | None) -> tuple:
    """metrics.csv's columns after the dmol ones: ``skipped_norm`` and the KL of each latent layer."""
    if model is None or not getattr(model, "hierarchical", False):
        return ()
    return ("skipped_norm", *layer_names(model))


def layer_row(model: VAE, layer_kl_mean: list) -> dict:
    """The epoch's KL of each layer (nats per image, averaged over the steps taken)."""
    return dict(zip(layer_names(model), layer_kl_mean))


@torch.no_grad()
def test_summary(model: VAE, images: torch.Tensor, k: int, *, seed: int = 0, progress: bool = False) -> str:
    """One line: the test set's negative ELBO and its k-sample importance-weighted NLL, in nats per
    image and bits per dimension (the IW bound of the hierarchical VAE draws with ``kl="sample"``)."""
    dims = model.in_features
    nelbo = evaluate(model, images)["nelbo"]
    line = f"test -ELBO {nelbo:.3f} nats/image"
    if model.recon == "dmol":
        line += f" = {bits_per_dim(nelbo, dims):.4f} bits/dim"
    if k > 0:
        nll = importance_weighted_nll(model, images, k, seed=seed, progress=progress, desc=f"test NLL, k={k}")
        mean = nll.mean().item()
        sem = (nll.std() / math.sqrt(len(nll))).item() if len(nll) > 1 else math.nan
        line += f"; NLL (importance-weighted, k={k}) {mean:.3f} +- {sem:.3f} nats/image"
        if model.recon == "dmol":
            line += f" = {bits_per_dim(mean, dims):.4f} +- {bits_per_dim(sem, dims):.4f} bits/dim"
    return line
