"""``vae-ext sweep``: one model per latent size, each scored by ELBO, importance-weighted NLL and BIC."""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, resume_config
from .config import TrainConfig
from .errors import ConfigError
from .evaluate import eval_images, eval_labels, evaluate, importance_weighted_nll
from .plots import save_sweep_plot
from .runfiles import write_csv
from .runlock import RunLock
from .train import train

__all__ = ["sweep", "SWEEP_COLUMNS"]

SWEEP_COLUMNS = ("latent", "params_total", "params_decoder", "n_train", "n_test", "k", "train_nelbo", "test_nelbo",
                 "train_nll", "test_nll", "bic", "bic_all_params")


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
    twice = sorted({v for v in latents if latents.count(v) > 1})
    if twice:  # each size has one folder and one row: a repeat would train nothing and duplicate the row
        raise ConfigError(f"--latent: each latent size once: {', '.join(map(str, twice))} is given more than once")
    out = Path(base.out or os.path.join("runs", time.strftime("sweep-%Y%m%d-%H%M%S")))
    with RunLock(out):  # one sweep per folder (each model's folder is locked by train)
        return _sweep(latents, base, out, k, overrides, log)


def _sweep(latents, base: TrainConfig, out: Path, k: int, overrides, log) -> list:
    overrides = dict(overrides if overrides is not None else asdict(base))
    rows = []
    for lat in latents:
        run = out / f"latent-{lat}"
        opts = {**overrides, "latent": lat, "out": str(run)}
        # the model's folder is locked before its checkpoint is read (see vae_ext.cli's train)
        with RunLock(run) if run.is_dir() else nullcontext() as lock:
            ckpt = load_checkpoint(run) if (run / CHECKPOINT_NAME).exists() else None
            cfg = resume_config(ckpt, opts) if ckpt else TrainConfig(**{**asdict(base), **opts})
            log(f"--- latent size {lat}: {run}")
            res = train(cfg, ckpt, log=log, lock=lock)
        model, data = res.model, res.data
        train_imgs, test_imgs = eval_images(data, "train"), eval_images(data, "test")
        # a conditional model is scored on -log p(x|y): its labels go along
        train_y, test_y = (eval_labels(data, "train"), eval_labels(data, "test")) if model.conditional else (None, None)
        train_nll = importance_weighted_nll(model, train_imgs, k, progress=cfg.progress, desc="IW NLL train",
                                            labels=train_y)
        test_nll = importance_weighted_nll(model, test_imgs, k, progress=cfg.progress, desc="IW NLL test",
                                           labels=test_y)
        n = len(train_imgs)
        p_dec, p_all = model.num_parameters("decoder"), model.num_parameters()
        total_ll = -train_nll.sum().item()
        row = {"latent": lat, "params_total": p_all, "params_decoder": p_dec, "n_train": n, "n_test": len(test_imgs),
               "k": k, "train_nelbo": evaluate(model, train_imgs, labels=train_y)["nelbo"],
               "test_nelbo": evaluate(model, test_imgs, labels=test_y)["nelbo"],
               "train_nll": train_nll.mean().item(), "test_nll": test_nll.mean().item(),
               "bic": -2 * total_ll + p_dec * math.log(n), "bic_all_params": -2 * total_ll + p_all * math.log(n)}
        rows.append(row)
        log(f"latent {lat}: test -ELBO {row['test_nelbo']:.3f}, test NLL {row['test_nll']:.3f} (k={k}), "
            f"BIC {row['bic']:.6g}")
        write_csv(out / "sweep.csv", SWEEP_COLUMNS, rows)
        save_sweep_plot(out / "sweep.png", rows)
    log(f"wrote {out / 'sweep.csv'} and {out / 'sweep.png'}")
    return rows
