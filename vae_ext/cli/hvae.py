"""``vae-ext train --model hvae``: what the command adds for the hierarchical VAE
(:class:`vae_ext.models.HVAE`), kept out of train.py and config.py: its options' defaults and
refusals, building it, its metrics.csv columns (the KL of each latent layer), and the training
summary's test likelihood in bits per dimension (ELBO and importance-weighted).
"""
from __future__ import annotations

import math

import torch

from ..models import VAE
from ..models.dmol import bits_per_dim
from ..models.hvae import DEFAULT_LAYERS, DEFAULT_WIDTH, DEFAULT_ZDIM
from .errors import ConfigError
from .limits import MAX_INT

__all__ = ["MODELS", "DEFAULT_EVAL_K", "check_model_options", "build_hvae", "layer_columns", "layer_row",
           "test_summary"]

MODELS = ("vae", "hvae")
# --eval-k: importance samples per test image in the training summary (hvae; 0: the ELBO alone)
DEFAULT_EVAL_K = {"vae": 0, "hvae": 16}
# The options the flat VAEs have and the hierarchical one has not (None: not given)
_FLAT_ONLY = {"arch": "the hierarchical VAE has its own architecture (--width, --layers)",
              "hidden": "the hierarchical VAE has no fully connected layers (--width sets its channels)",
              "channels": "the hierarchical VAE's channels are --width at every resolution"}


def _fail(option: str, why: str) -> ConfigError:
    return ConfigError(f"{option}: {why}")


def check_model_options(cfg) -> None:
    """Fill in and check ``cfg``'s --model options (TrainConfig.__post_init__, before the rest): for
    hvae the defaults (--recon dmol, --latent 4 channels per layer, --width 16, --layers 1) and a
    one-line refusal of every option it cannot take; for vae a refusal of --width and --layers."""
    if cfg.model not in MODELS:
        raise _fail("--model", f"expected one of {', '.join(MODELS)}, got {cfg.model!r}")
    if cfg.eval_k is None:
        cfg.eval_k = DEFAULT_EVAL_K[cfg.model]
    if cfg.model == "vae":
        for name in ("width", "layers"):
            if getattr(cfg, name) is not None:
                raise _fail(f"--{name}", "only --model hvae (the hierarchical VAE) takes it")
        cfg.arch = "mlp" if cfg.arch is None else cfg.arch
        cfg.recon = "bce_logits" if cfg.recon is None else cfg.recon
        cfg.latent = 20 if cfg.latent is None else cfg.latent
        return
    for name, why in _FLAT_ONLY.items():
        v = getattr(cfg, name)
        if v is not None and not (name == "arch" and v == "hvae"):  # a stored hvae config says arch hvae
            raise _fail(f"--{name}", f"not with --model hvae: {why}")
    if cfg.recon not in (None, "dmol"):
        raise _fail(f"--recon {cfg.recon}", "--model hvae models the grey levels with --recon dmol (its only "
                    "likelihood); leave --recon out")
    if cfg.conditional:
        raise _fail("--conditional", "--model hvae is not class-conditional")
    if cfg.free_bits:
        raise _fail("--free-bits", "--model hvae has no free bits (its KL is per latent layer)")
    cfg.arch, cfg.recon = "hvae", "dmol"
    cfg.latent = DEFAULT_ZDIM if cfg.latent is None else cfg.latent
    for name, default in (("width", DEFAULT_WIDTH), ("layers", DEFAULT_LAYERS)):
        v = default if getattr(cfg, name) is None else getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_INT:
            raise _fail(f"--{name.replace('_', '-')}", f"expected a positive integer, got {v!r}")
        setattr(cfg, name, v)


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
    from .evaluate import evaluate, importance_weighted_nll

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
