"""Scoring a model: the negative ELBO on a fixed draw of eps, the importance-weighted NLL estimate
(IWAE bound), and ``vae-ext eval`` on a checkpoint."""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm import tqdm

from ..models import VAE
from ..models.dmol import bits_per_dim
from .checkpoint import check_image_shape, check_labels, config_of, load_checkpoint, model_from_checkpoint
from .data import TEST_BINARIZE_SEED, ImageData, binarize, load_data
from .distributed import DistributedContext, resolve_device
from .errors import ConfigError

__all__ = ["EVAL_SEED", "evaluate", "eval_images", "eval_labels", "importance_weighted_nll", "evaluate_checkpoint",
           "json_safe"]

EVAL_SEED = 1234  # the eps of the test ELBO: fixed, so epochs and runs are compared on the same draws


@torch.no_grad()
def evaluate(model: VAE, images: torch.Tensor, ctx: DistributedContext | None = None, *, batch_size: int = 1000,
             seed: int = EVAL_SEED, labels: torch.Tensor | None = None) -> dict:
    """Mean negative ELBO (and its terms) per image over ``images``, in nats; one z per image, drawn
    from a generator seeded with ``seed`` (so repeated evaluations use the same eps). A conditional
    model takes the images' ``labels``: the bound on -log p(x|y), KL to the class's prior.

    Under torchrun every rank scores every image with the same draws, so the result is the one a
    single process gives (``vae-ext eval`` reproduces the last row of a torchrun run's metrics.csv);
    a test set is small next to an epoch of training. ``ctx`` is accepted for that reason and unused.
    """
    del ctx  # sharding the images (and seeding each rank's eps apart) made the result depend on the ranks
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    ys = [None] * math.ceil(len(images) / batch_size) if labels is None else torch.split(labels, batch_size)
    g = torch.Generator(device=dev).manual_seed(seed)
    sums = torch.zeros(4, dtype=torch.float64, device=dev)
    for b, y in zip(torch.split(images, batch_size), ys):
        elbo, log_px_z, kl = model.elbo(b.to(dev), generator=g, return_terms=True, y=y)
        sums += torch.stack([-elbo.sum(), -log_px_z.sum(), kl.sum(), elbo.new_tensor(len(b))]).double()
    model.train(was_training)
    s = sums.tolist()
    n = max(s[3], 1.0)
    return {"nelbo": s[0] / n, "rec": s[1] / n, "kl": s[2] / n, "n": int(s[3])}


def eval_images(data: ImageData, split: str) -> torch.Tensor:
    """The images to score: the test set, or the training set binarized once (fixed seed) if the run
    binarizes (dynamic binarization leaves the stored training images in [0, 1])."""
    if split == "test":
        return data.test
    if data.binarize == "dynamic":
        return binarize(data.train, torch.Generator().manual_seed(TEST_BINARIZE_SEED + 1))
    return data.train


def eval_labels(data: ImageData, split: str) -> torch.Tensor | None:
    """The labels of :func:`eval_images`' images (None where the data has none)."""
    return data.test_labels if split == "test" else data.train_labels


@torch.no_grad()
def importance_weighted_nll(model: VAE, images: torch.Tensor, k: int, *, batch_size: int = 100,
                            seed: int = 0, progress: bool = False, desc: str = "IW NLL",
                            labels: torch.Tensor | None = None) -> torch.Tensor:
    """-log p(x) per image estimated with k importance samples (``VAE.log_likelihood``), batched;
    for a conditional model -log p(x|y), with the images' ``labels``."""
    model.eval()
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    batches = torch.split(images, batch_size)
    ys = [None] * len(batches) if labels is None else torch.split(labels, batch_size)
    for b, y in tqdm(list(zip(batches, ys)), desc=desc, unit="batch", leave=False, disable=None if progress else True,
                     dynamic_ncols=True):
        out.append(-model.log_likelihood(b.to(dev), k, y=y, generator=g).double().cpu())
    return torch.cat(out)


def evaluate_checkpoint(path, *, k: int = 5000, data: str | None = None, train_split=None, split: str = "test",
                        device: str = "auto", reference: bool = False, seed: int = 0, batch_size: int = 100,
                        progress: bool = True) -> dict:
    """Test negative ELBO and the k-sample importance-weighted NLL of a checkpoint, in nats per image
    (for a ``--recon dmol`` model also in bits per dimension: ``nelbo_bpd``, ``nll_bpd``, ``nll_sem_bpd``);
    for a class-conditional checkpoint both are conditional on the images' labels (-log p(x|y)),
    with the class prior p(z|y). ``notes`` maps each of ``nelbo``, ``nll``, ``nll_sem`` that is not a
    finite number (NaN: a standard error of one image, a diverged checkpoint) to the reason."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("eval runs as one process; start it without torchrun")
    if k < 1:
        raise ConfigError(f"--k: expected an integer >= 1, got {k}")
    ckpt = load_checkpoint(path)
    cfg = config_of(ckpt)
    dev = resolve_device(device, fused=not reference)
    num_classes = int(ckpt["model_config"].get("num_classes", 0))
    dmol = ckpt["model_config"].get("recon") == "dmol"
    d = load_data(data or cfg.data, train_split=train_split if data else cfg.train_split, binarize_mode=cfg.binarize,
                  labels=num_classes > 0, num_bits=ckpt["model_config"].get("num_bits") if dmol else None)
    check_image_shape(d, ckpt["model_config"]["input_shape"], f"the model in {ckpt['path']}")
    check_labels(d, num_classes, f"the model in {ckpt['path']}")
    model = model_from_checkpoint(ckpt, fused=not reference, device=dev)
    images, labels = eval_images(d, split), eval_labels(d, split) if num_classes else None
    t0 = time.perf_counter()
    nelbo = evaluate(model, images, labels=labels)["nelbo"]
    t1 = time.perf_counter()
    nll = importance_weighted_nll(model, images, k, batch_size=batch_size, seed=seed, progress=progress,
                                  labels=labels)
    t2 = time.perf_counter()
    r = {"checkpoint": ckpt["path"], "epoch": ckpt["epoch"], "data": d.name, "split": split, "n": len(images),
         "k": k, "nelbo": nelbo, "nll": nll.mean().item(), "nll_sem": math.nan,
         "seconds_elbo": t1 - t0, "seconds_nll": t2 - t1, "kernels": "reference" if reference else "fused",
         "device": str(dev), "conditional": num_classes > 0, "notes": {}}
    if len(nll) < 2:  # (torch's std of one value is NaN, with a UserWarning)
        r["notes"]["nll_sem"] = f"undefined: a standard error needs 2 images or more; the {split} set has {len(nll)}"
    else:
        r["nll_sem"] = (nll.std() / math.sqrt(len(nll))).item()
    for key in ("nelbo", "nll", "nll_sem"):
        if not math.isfinite(r[key]) and key not in r["notes"]:
            r["notes"][key] = _why_not_finite(model, r[key])
    if dmol:  # the same three in bits per dimension, nats / (D ln 2), as image likelihoods are compared
        r["dims"] = model.in_features
        for key in ("nelbo", "nll", "nll_sem"):
            r[f"{key}_bpd"] = bits_per_dim(r[key], model.in_features)
    return r


def _why_not_finite(model: VAE, value: float) -> str:
    what = "NaN" if math.isnan(value) else f"{value}"
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return f"{what}: the checkpoint's weights are not all finite"
    return f"{what}: the model gives a non-finite value on some image"


def json_safe(results: dict) -> dict:
    """:func:`evaluate_checkpoint`'s results for strict JSON: a number that is not finite becomes
    None (``null``); ``results["notes"]`` says why it is missing."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in results.items()}
