"""A run's ``checkpoint.pt``: writing it, reading it back (tensors and plain values only:
``weights_only``), and the configuration and model it holds."""
from __future__ import annotations

import pickle
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch

from .config import FIXED_ON_RESUME, TrainConfig
from .data import ImageData
from .errors import CheckpointError, ConfigError, DataError
from .models import VAE
from .runfiles import atomic_write

__all__ = [
    "CHECKPOINT_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "config_of",
    "resume_config",
    "model_from_checkpoint",
    "load_model_state",
    "check_image_shape",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "vae_ext.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path, model, optimizer, cfg: TrainConfig, epoch: int, history, data: ImageData) -> None:
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


def config_of(ckpt: dict) -> TrainConfig:
    """The checkpoint's training configuration."""
    names = {f.name for f in fields(TrainConfig)}
    try:
        return TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in names})
    except (ConfigError, TypeError, KeyError) as e:
        raise CheckpointError(f"{ckpt['path']}: its stored configuration is invalid ({e})") from None


def resume_config(ckpt: dict, overrides: dict) -> TrainConfig:
    """The checkpoint's configuration with ``overrides`` (options given explicitly) applied.

    Options that define the model or its data (:data:`FIXED_ON_RESUME`) must equal the stored ones.
    """
    saved = config_of(ckpt)
    merged = TrainConfig(**{**asdict(saved), **overrides})
    for name in FIXED_ON_RESUME:
        if name in overrides and getattr(merged, name) != getattr(saved, name):
            opt = "--" + name.replace("_", "-")
            raise CheckpointError(
                f"{ckpt['path']} is from another configuration: it was trained with {opt} "
                f"{fmt_option(getattr(saved, name))}, not {fmt_option(getattr(merged, name))} "
                f"(start a new run in another --out)"
            )
    return merged


def fmt_option(v) -> str:
    """An option's value as the command line spells it."""
    if v is None:
        return "(default)"
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def load_model_state(model: VAE, ckpt: dict) -> None:
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
    load_model_state(model, ckpt)
    return model.to(device)


def check_image_shape(data: ImageData, model_shape, what: str) -> None:
    """DataError unless the images have the shape the model was built for."""
    if tuple(data.image_shape) != tuple(model_shape):
        s = lambda t: "x".join(map(str, t))  # noqa: E731
        raise DataError(f"{data.name}: images are {s(data.image_shape)} but {what} expects {s(model_shape)}")
