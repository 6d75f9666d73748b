"""A run's ``checkpoint.pt``: writing it, reading it back (tensors and plain values only:
``weights_only``), and the configuration and model it holds."""
from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..models import VAE
from .config import FIXED_ON_RESUME, TrainConfig
from .data import ImageData
from .errors import CheckpointError, ConfigError, DataError
from .memory import check_fits
from .runfiles import atomic_write

__all__ = [
    "CHECKPOINT_NAME",
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_file",
    "checkpoint_stamp",
    "config_of",
    "resume_config",
    "model_from_checkpoint",
    "load_model_state",
    "check_finite_state",
    "check_image_shape",
    "check_labels",
]

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "vae_ext.checkpoint"
CHECKPOINT_VERSION = 1
# The history columns that resuming, the CSV and the loss curves rely on (other columns may be absent).
HISTORY_REQUIRED = ("epoch", "step", "train_nelbo", "test_nelbo")
# Memory per parameter the command may take: the weights, their gradients and Adam's two moments.
BYTES_PER_PARAMETER = 16


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
                 "n_train": len(data.train), "n_test": len(data.test), "num_classes": data.num_classes},
    }
    atomic_write(path, lambda f: torch.save(state, f))


def checkpoint_file(path) -> Path:
    """The checkpoint file that ``path`` names (a file, or a run folder holding checkpoint.pt); nothing
    is read, so a caller can lock the folder first."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def checkpoint_stamp(path) -> tuple | None:
    """What changes when a checkpoint file is replaced (each save renames a new file into place):
    its inode, size and modification time; None when there is no file."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def load_checkpoint(path) -> dict:
    """Read and check a checkpoint (a file, or a run folder holding checkpoint.pt).

    The result holds the file's ``path`` and its ``stamp`` (:func:`checkpoint_stamp` of the file
    read), by which a run that resumes it can tell whether another run replaced it meanwhile."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with warnings.catch_warnings(), open(path, "rb") as f:
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the one-line error says it all
            st = os.fstat(f.fileno())  # of the file read, even if another is renamed into place meanwhile
            ckpt = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in msg.lower() or isinstance(e, pickle.UnpicklingError):
            msg = "not a PyTorch checkpoint of tensors and plain values"
        elif "zip archive" in msg:
            msg = "truncated, or not a PyTorch zip archive"
        raise CheckpointError(f"{path}: not a readable vae-ext checkpoint ({msg[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a vae-ext checkpoint")
    _check_structure(ckpt, str(path))
    ckpt["path"] = str(path)
    ckpt["stamp"] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return ckpt


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_structure(ckpt: dict, path: str) -> None:
    """Every field that eval and resume use, checked once on load, so that a malformed checkpoint is
    one line naming the field, before any data is read, any model allocated or any work done."""

    def bad(field, problem):
        raise CheckpointError(f"{path}: malformed checkpoint: {field!r} {problem}")

    def need(field, kind, what):
        if field not in ckpt:
            bad(field, "is missing")
        if not isinstance(ckpt[field], kind) or isinstance(ckpt[field], bool):
            bad(field, f"should be {what}, got {type(ckpt[field]).__name__}")
        return ckpt[field]

    version = need("version", int, "an integer")
    if version < 1:
        bad("version", f"should be >= 1, got {version}")
    if version > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {version} is newer than this vae_ext reads "
                              f"({CHECKPOINT_VERSION})")
    need("config", dict, "a dict")
    model_config = need("model_config", dict, "a dict")
    model_state = need("model_state", dict, "a dict of tensors")
    optimizer_state = need("optimizer_state", dict, "a dict")
    epoch = need("epoch", int, "an integer")
    history = need("history", list, "a list")
    if epoch < 0:
        bad("epoch", f"should be >= 0, got {epoch}")
    cfg = config_of({**ckpt, "path": path})  # the training configuration is a valid one
    num_classes = model_config.get("num_classes", 0)
    if not _is_int(num_classes) or num_classes < 0 or (num_classes > 0) != cfg.conditional:
        bad("model_config", f"has num_classes {num_classes!r}, which does not fit a "
            f"{'class-conditional' if cfg.conditional else 'plain'} model (config 'conditional')")

    # The model, built on the meta device: its size and parameter shapes without allocating them.
    try:
        with torch.device("meta"):
            meta = VAE.from_config(model_config, fused=False)
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as e:  # RuntimeError: sizes overflow
        bad("model_config", f"does not describe a model ({str(e).strip().splitlines()[0][:160]})")
    n_params = meta.num_parameters()
    check_fits(n_params * BYTES_PER_PARAMETER, f"{path}: its model ({n_params:,} parameters)", CheckpointError)
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model_state.items()):
        bad("model_state", "should map parameter names to tensors")
    missing, unexpected = sorted(expected.keys() - model_state.keys()), sorted(model_state.keys() - expected.keys())
    if missing or unexpected:
        bad("model_state", f"does not fit model_config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if tuple(model_state[k].shape) != shape:
            bad("model_state", f"does not fit model_config: {k} has shape {list(model_state[k].shape)}, "
                f"expected {list(shape)}")

    # Adam's state: one entry per parameter, in the order of model.parameters().
    shapes = [tuple(p.shape) for p in meta.parameters()]
    groups, state = optimizer_state.get("param_groups"), optimizer_state.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict) or not all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        bad("optimizer_state", "is not an optimizer state (param_groups and state)")
    ids = [i for g in groups for i in g["params"]]
    if len(ids) != len(shapes) or len(set(ids)) != len(ids):
        bad("optimizer_state", f"lists {len(ids)} parameters, the model has {len(shapes)}")
    for pos, i in enumerate(ids):
        entry = state.get(i, {})
        if not isinstance(entry, dict):
            bad("optimizer_state", f"has a malformed state for parameter {pos}")
        for name, v in entry.items():
            if name != "step" and not (isinstance(v, torch.Tensor) and tuple(v.shape) == shapes[pos]):
                bad("optimizer_state", f"does not fit the model: {name} of parameter {pos}")

    if len(history) != epoch:
        bad("history", f"has {len(history)} rows for {epoch} epochs")
    for i, row in enumerate(history):
        if not isinstance(row, dict):
            bad("history", f"row {i + 1} should be a dict, got {type(row).__name__}")
        for col in HISTORY_REQUIRED:
            v = row.get(col)
            if not (_is_int(v) if col in ("epoch", "step") else _is_number(v)):
                bad("history", f"row {i + 1} has no valid {col!r}")
        if row["epoch"] != i + 1:
            bad("history", f"row {i + 1} is for epoch {row['epoch']}")


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
    if "model" in overrides and overrides["model"] != saved.model:
        # before the merge: the stored options of one model are refused by the other's checks, whose
        # message would name an option the user never gave
        _other_configuration(ckpt, "model", saved.model, overrides["model"])
    merged = TrainConfig(**{**asdict(saved), **overrides})
    for name in FIXED_ON_RESUME:
        if name in overrides and getattr(merged, name) != getattr(saved, name):
            _other_configuration(ckpt, name, getattr(saved, name), getattr(merged, name))
    return merged


def _other_configuration(ckpt: dict, name: str, saved, given):
    raise CheckpointError(
        f"{ckpt['path']} is from another configuration: it was trained with --{name.replace('_', '-')} "
        f"{fmt_option(saved)}, not {fmt_option(given)} (start a new run in another --out)"
    )


def check_finite_state(ckpt: dict) -> None:
    """Resuming needs finite weights and optimizer state: from a NaN the first step's loss is NaN,
    which training would blame on the learning rate. (A run never saves one, docs/cli.md; eval reads
    such a checkpoint and reports null scores.)"""
    def tensors(obj, where):
        if isinstance(obj, torch.Tensor):
            yield where, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{where}.{k}" if where else str(k))

    for field in ("model_state", "optimizer_state"):
        for name, t in tensors(ckpt[field], ""):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise CheckpointError(f"{ckpt['path']}: malformed checkpoint: {field!r} holds a non-finite value "
                                      f"({name}); a run never saves one, so it cannot be resumed")


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


def check_labels(data: ImageData, num_classes: int, what: str) -> None:
    """DataError unless a class-conditional model (``num_classes`` > 0) knows every label of the data."""
    if num_classes and data.num_classes > num_classes:
        raise DataError(f"{data.name}: has class labels up to {data.num_classes - 1} but {what} knows "
                        f"{num_classes} classes (0..{num_classes - 1})")


def check_image_shape(data: ImageData, model_shape, what: str) -> None:
    """DataError unless the images have the shape the model was built for."""
    if tuple(data.image_shape) != tuple(model_shape):
        s = lambda t: "x".join(map(str, t))  # noqa: E731
        raise DataError(f"{data.name}: images are {s(data.image_shape)} but {what} expects {s(model_shape)}")
