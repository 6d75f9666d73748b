"""Training behind ``vae-ext train``: one run, resumable, data-parallel under torchrun.

A run folder holds ``checkpoint.pt`` (model, optimizer, config, epoch, history), ``metrics.csv``
(a row per epoch, with the number of active latent units: batch-mean KL above
:data:`ACTIVE_UNIT_NATS`) and the PNGs ``reconstructions.png``, ``samples.png`` and
``loss_curves.png``. Every file is written to a temporary name and renamed into place
(``vae_ext.cli.runfiles``), so an interruption never leaves a half-written file: what is there is the
last complete version.
User mistakes raise :class:`vae_ext.cli.errors.VaeExtError` subclasses with a one-line message.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler
from tqdm import tqdm

from ..models import VAE
from ..models.dmol import bits_per_dim
from .checkpoint import (
    CHECKPOINT_NAME,
    check_finite_state,
    check_image_shape,
    check_labels,
    checkpoint_stamp,
    fmt_option,
    load_model_state,
    save_checkpoint,
)
from .config import TrainConfig
from .data import ImageData, binarize, load_data
from .distributed import DistributedContext, setup
from .errors import CheckpointError, ConfigError, VaeExtError
from .evaluate import evaluate
from .hvae import build_hvae, layer_columns, layer_row, test_summary
from .memory import check_fits
from .model_memory import first_line, is_out_of_memory, training_bytes
from .plots import save_plots
from .runfiles import write_csv
from .runlock import RunLock

__all__ = ["TrainResult", "train", "train_step", "guarded_train_step", "build_model", "METRICS_NAME", "METRIC_COLUMNS",
           "DMOL_METRIC_COLUMNS", "ACTIVE_UNIT_NATS", "metric_columns"]

METRICS_NAME = "metrics.csv"
# New columns go at the end: scripts that read the file by position keep working.
METRIC_COLUMNS = ("epoch", "step", "beta", "train_loss", "train_nelbo", "train_rec", "train_kl",
                  "test_nelbo", "test_rec", "test_kl", "skipped", "lr", "seconds", "active_units")
# A --recon dmol run also has its negative ELBOs in bits per dimension, nats / (D ln 2): the unit in
# which image likelihoods are compared (the other modes' files keep their columns).
DMOL_METRIC_COLUMNS = METRIC_COLUMNS + ("train_bpd", "test_bpd")
# A latent unit is "active" when its KL to the prior, averaged over the epoch's batches, exceeds
# this many nats (Burda et al. measure activity by a variance; the KL threshold is the issue's).
ACTIVE_UNIT_NATS = 0.01


def build_model(cfg: TrainConfig, image_shape, num_classes: int = 0, *, batch: int | None = None) -> VAE:
    """The run's model; ``num_classes`` > 0 (with ``cfg.conditional``) for a class-conditional one.

    First built on the meta device: a model that cannot be trained in the memory available, with
    batches of ``batch`` images (default ``cfg.batch_size``), is refused (ConfigError naming the
    options) before anything is allocated."""
    kwargs = dict(arch=cfg.arch, input_shape=tuple(image_shape), latent_size=cfg.latent,
                  hidden_sizes=cfg.hidden, recon=cfg.recon, fused=not cfg.reference,
                  num_classes=num_classes if cfg.conditional else 0, free_bits=cfg.free_bits)
    sizes = f"--arch {cfg.arch} --hidden {fmt_option(cfg.hidden)} --latent {cfg.latent}"
    if cfg.model == "hvae":
        kwargs, sizes = build_hvae(cfg, image_shape)
    elif cfg.recon == "dmol":
        kwargs.update(mixtures=cfg.mixtures, num_bits=cfg.num_bits)
        sizes += f" --mixtures {cfg.mixtures}"
    if cfg.arch == "conv":
        if len(image_shape) != 3:
            raise ConfigError(f"--arch conv: expected (C, H, W) images, got shape {list(image_shape)}")
        kwargs["channels"] = cfg.channels
        sizes += f" --channels {fmt_option(cfg.channels)}"
    batch = cfg.batch_size if batch is None else batch
    try:
        with torch.device("meta"):
            meta = VAE(**kwargs)
        need = training_bytes(meta, batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    except (RuntimeError, OverflowError, TypeError) as e:  # a size beyond what a tensor can hold
        raise ConfigError(f"{sizes}: the model is too large to build ({first_line(e)})") from None
    check_fits(need, f"{sizes} --batch-size {cfg.batch_size}: training this model ({meta.num_parameters():,} "
               f"parameters)", ConfigError)
    try:
        return VAE(**kwargs)
    except RuntimeError as e:  # the memory was taken meanwhile, or there was no limit to check
        if not is_out_of_memory(e):
            raise
        raise ConfigError(f"{sizes}: out of memory building the model ({first_line(e)})") from None


@dataclass
class TrainResult:
    model: VAE
    config: TrainConfig
    history: list
    out: Path
    checkpoint: Path
    data: ImageData


def metric_columns(cfg: TrainConfig, model: VAE | None = None) -> tuple:
    """The columns of a run's metrics.csv: :data:`DMOL_METRIC_COLUMNS` for --recon dmol; a --model hvae
    run's ``model`` adds ``skipped_norm`` and each latent layer's KL (cli/hvae.py)."""
    columns = DMOL_METRIC_COLUMNS if cfg.recon == "dmol" else METRIC_COLUMNS
    extra = layer_columns(model)
    if cfg.skip_threshold and not extra:
        extra = ("skipped_norm",)
    return columns + extra


def _loss_and_gradients(net, model: VAE, optimizer, x: torch.Tensor, beta: float, y=None):
    model.criterion.beta = beta
    optimizer.zero_grad(set_to_none=True)
    if getattr(model, "hierarchical", False):  # HVAE: its forward is the loss (one KL per latent layer)
        loss, stats = net(x)
        loss.backward()
        return loss.detach(), stats["rec"], stats["kl"], stats["layer_kl"]
    recon, mu, logvar, *prior = net(x) if y is None else net(x, y)
    kw = {"prior_mu": prior[0], "prior_logvar": prior[1]} if prior else {}
    # kl is the true KL (with free bits the loss uses the floored one); unit_kl: each unit's batch mean
    loss, rec, kl, unit_kl = model.criterion(recon, x, mu, logvar, return_terms=True, return_unit_kl=True, **kw)
    loss.backward()
    return loss.detach(), rec.detach(), kl.detach(), unit_kl


def train_step(net, model: VAE, optimizer, x: torch.Tensor, beta: float, y=None):
    """One optimizer step on the summed negative ELBO; returns the detached (loss, rec, kl) sums and
    each latent unit's KL averaged over the batch (shape (latent,)).

    ``net`` is the module to call (``model`` itself, or its DistributedDataParallel wrapper); ``y``
    the labels of a class-conditional model.
    """
    terms = _loss_and_gradients(net, model, optimizer, x, beta, y)
    optimizer.step()
    return terms


def _total_norm(grads, device) -> torch.Tensor:
    """The 2-norm of all the gradients together, as torch.nn.utils.get_total_norm gives it (that
    function is new in torch 2.6; the library supports older torch)."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def guarded_train_step(net, model: VAE, optimizer, x: torch.Tensor, beta: float, ctx: DistributedContext, y=None,
                       *, skip_threshold: float = 0.0):
    """:func:`train_step`, skipped (no optimizer step) when the loss or the gradient norm is not
    finite on any rank, or (``skip_threshold`` > 0, VDVAE's skip_threshold) when the gradient norm
    exceeds it; returns (loss, rec, kl, unit_kl, skipped): skipped is False, True (not finite) or
    ``"norm"`` (over the threshold)."""
    loss, rec, kl, unit_kl = _loss_and_gradients(net, model, optimizer, x, beta, y)
    norm = _total_norm([p.grad for p in model.parameters() if p.grad is not None], loss.device)
    bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).to(torch.float32)
    over = (norm > skip_threshold).to(torch.float32) if skip_threshold else torch.zeros_like(bad)
    # every rank skips together (DDP's gradients are shared, so are their norms)
    bad, over = ctx.all_reduce_sum(torch.stack([bad, over])).tolist()
    if bad > 0 or over > 0:
        optimizer.zero_grad(set_to_none=True)
        return loss, rec, kl, unit_kl, True if bad > 0 else "norm"
    optimizer.step()
    return loss, rec, kl, unit_kl, False


def _weights_finite(model: VAE) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # The random draws of an epoch (eps, dynamic binarization) depend on (seed, epoch, rank) only:
    # a resumed run continues exactly as an uninterrupted one, and ranks draw different noise.
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101) % (1 << 63)


def train(cfg: TrainConfig, checkpoint: dict | None = None, *, log=print, lock: RunLock | None = None) -> TrainResult:
    """Train (or, given a loaded ``checkpoint``, resume) a VAE; see the module docstring for outputs.

    Under ``torchrun`` (WORLD_SIZE > 1) this is one rank of a DistributedDataParallel job; rank 0
    logs and writes files. ``log`` receives the progress lines (rank 0 only).

    ``lock``: the RunLock of ``cfg.out``, taken by a caller before it read ``checkpoint`` from that
    folder (``vae-ext train --resume`` does), held through training and released by the caller.
    Without it train takes the lock itself, and refuses a ``checkpoint`` that another run replaced
    between its reading and the lock (resuming it would overwrite that run's newer epochs).
    """
    ctx = setup(cfg.device, fused=not cfg.reference)
    try:
        return _train(cfg, checkpoint, ctx, log if ctx.is_main else (lambda *a, **k: None), lock)
    finally:
        ctx.close()


def _on_main(ctx: DistributedContext, fn):
    """Run ``fn`` on rank 0 only; a VaeExtError it raises is raised on every rank (none waits forever)."""
    error = None
    if ctx.is_main:
        try:
            fn()
        except VaeExtError as e:
            error = e
    error = ctx.broadcast_object(None if error is None else (type(error), str(error)))
    if error is not None:
        raise error[0](error[1])


def _train(cfg: TrainConfig, checkpoint, ctx: DistributedContext, log, lock: RunLock | None) -> TrainResult:
    if cfg.out is None:
        cfg = replace(cfg, out=ctx.broadcast_object(os.path.join("runs", time.strftime("vae-%Y%m%d-%H%M%S"))))
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected the run's folder (made if missing)")
    if lock is not None and lock.folder.resolve() != out.resolve():
        raise ValueError(f"lock: expected the RunLock of cfg.out ({out}), got one of {lock.folder}")
    own = lock is None
    lock = lock or RunLock(out)  # rank 0 alone writes, so rank 0 alone takes it
    try:
        return _train_locked(cfg, checkpoint, ctx, log, out, lock)
    finally:
        if own:
            lock.release()


def _replaced(checkpoint: dict) -> CheckpointError:
    return CheckpointError(f"{checkpoint['path']} was replaced by another run after this one read it (at epoch "
                           f"{checkpoint['epoch']}); run the command again to resume from the newer epoch")


def _same_checkpoint_on_every_rank(ctx: DistributedContext, checkpoint: dict) -> None:
    """Rank 0 read its checkpoint holding the run folder's lock, the others perhaps just before
    another run replaced it: every rank must start from the same one. Compared by content (its epoch
    and last metrics row, whose wall-clock seconds tell two runs apart), not by the file's stamp,
    which differs between the copies of a run folder on several machines."""
    history = checkpoint.get("history") or [None]
    mine = repr((checkpoint.get("epoch"), history[-1]))
    differs = torch.tensor([float(mine != ctx.broadcast_object(mine))], device=ctx.device)
    if ctx.all_reduce_sum(differs).item() > 0:
        raise _replaced(checkpoint)


def _train_locked(cfg: TrainConfig, checkpoint, ctx: DistributedContext, log, out: Path, lock: RunLock) -> TrainResult:
    ckpt_path = out / CHECKPOINT_NAME

    def refuse_another_run():
        if ckpt_path.exists() and (checkpoint is None or not ckpt_path.samefile(checkpoint["path"])):
            what = "pass --resume to continue it" if checkpoint is None else "resume into that folder or an empty one"
            raise ConfigError(f"{out} already holds a run ({CHECKPOINT_NAME}); {what}, or choose another --out")

    def claim_folder(early: bool = False):
        # Early, before the data is read: a run still writing an existing folder is refused at once.
        # Later, once the data and the model are known to work: the folder is made and locked.
        refuse_another_run()
        if early and not out.is_dir():
            return
        lock.acquire()
        refuse_another_run()  # again: another run may have finished here while this one waited
        if checkpoint is not None and checkpoint.get("stamp") is not None and ckpt_path.exists() \
                and checkpoint_stamp(ckpt_path) != checkpoint["stamp"]:  # resuming in place, read unlocked
            raise _replaced(checkpoint)

    _on_main(ctx, lambda: claim_folder(early=True))
    if checkpoint is not None:
        check_finite_state(checkpoint)  # before the data is read
        if ctx.distributed:
            _same_checkpoint_on_every_rank(ctx, checkpoint)
    data = load_data(cfg.data, train_split=cfg.train_split, binarize_mode=cfg.binarize, labels=cfg.conditional,
                     num_bits=cfg.num_bits if cfg.recon == "dmol" else None)
    num_classes = data.num_classes
    if checkpoint is not None:
        check_image_shape(data, checkpoint["model_config"]["input_shape"], f"the model in {checkpoint['path']}")
        num_classes = int(checkpoint["model_config"].get("num_classes", 0))
        check_labels(data, num_classes, f"the model in {checkpoint['path']}")

    dev = ctx.device
    torch.manual_seed(cfg.seed)
    # the largest batch a step takes: a rank's share of the training set caps --batch-size
    model = build_model(cfg, data.image_shape, num_classes,
                        batch=min(cfg.batch_size, math.ceil(len(data.train) / ctx.world_size)))
    if checkpoint is not None:
        load_model_state(model, checkpoint)
    model.to(dev)
    net = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    history, start = [], 0
    if checkpoint is not None:
        try:
            optimizer.load_state_dict(checkpoint["optimizer_state"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"{checkpoint['path']}: optimizer state does not fit the model ({e})") from None
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        history, start = list(checkpoint["history"]), int(checkpoint["epoch"])

    train_x = data.train.to(dev)
    train_y = data.train_labels.to(dev) if model.conditional else None
    sampler = DistributedSampler(range(len(train_x)), num_replicas=ctx.world_size, rank=ctx.rank,
                                 shuffle=True, seed=cfg.seed)
    steps = math.ceil(len(sampler) / cfg.batch_size)
    warmup_steps = cfg.warmup * steps
    step = int(history[-1]["step"]) if history else 0
    in_a_row = 0  # consecutive skipped steps (--skip-nonfinite)
    hierarchical = getattr(model, "hierarchical", False)
    # the KL's units: latent units, or an HVAE's latent layers (each one unit in active_units)
    n_units = len(model.latent_layers) if hierarchical else cfg.latent
    unit_name = "layers" if hierarchical else "units"

    kernels = "vae_ext.reference (plain PyTorch)" if cfg.reference else "fused vae_ext kernels"
    log(f"data: {data.describe()}" + ("" if cfg.recon == "dmol" else f", binarize {cfg.binarize}"))
    cond = f"class-conditional ({model.num_classes} classes) " if model.conditional else ""
    shape = f"{type(model).__name__} {'x'.join(map(str, data.image_shape))}"
    what = (f"{shape}, width {cfg.width}, {n_units} latent layers of {cfg.latent} channels at resolutions "
            f"{','.join(map(str, model.layer_resolutions))}" if hierarchical else
            f"{shape} -> hidden {fmt_option(cfg.hidden)} -> latent {cfg.latent}")
    log(f"model: {cond}{what} ({model.num_parameters():,} parameters), recon {cfg.recon}"
        + (f" ({cfg.mixtures} logistics per pixel)" if cfg.recon == "dmol" else "")
        + (f", free bits {cfg.free_bits:g} nats/unit" if cfg.free_bits else "") + f", {kernels}")
    where = f"{ctx.world_size} processes (DDP), " if ctx.distributed else ""
    log(f"training on {where}{dev}; writing {out}" + (f"; resuming after epoch {start}" if checkpoint else ""))
    _on_main(ctx, claim_folder)
    if start >= cfg.epochs:
        log(f"already trained for {start} epochs (--epochs {cfg.epochs}); nothing to do")

    for epoch in range(start + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, ctx.rank))
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, rec, kl, images (of steps taken)
        # each unit's batch-mean KL summed over the steps taken, and the number of those steps
        units = torch.zeros(n_units + 1, dtype=torch.float64, device=dev)
        skipped = skipped_norm = 0
        beta = cfg.beta
        # disable=None: no bar when stderr is not a terminal (a log file gets no \r frames)
        bar = tqdm(total=steps, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False,
                   disable=None if (ctx.is_main and cfg.progress) else True, dynamic_ncols=True)
        with bar:
            for i, idx in enumerate(BatchSampler(sampler, cfg.batch_size, drop_last=False)):
                idx = torch.as_tensor(idx, device=dev)
                x = train_x[idx]
                y = None if train_y is None else train_y[idx]
                if cfg.binarize == "dynamic":
                    x = binarize(x)
                beta = cfg.beta * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else cfg.beta
                if cfg.skip_nonfinite or cfg.skip_threshold:
                    loss, rec, kl, unit_kl, skip = guarded_train_step(net, model, optimizer, x, beta, ctx, y,
                                                                      skip_threshold=cfg.skip_threshold)
                else:
                    (loss, rec, kl, unit_kl), skip = train_step(net, model, optimizer, x, beta, y), False
                step += 1
                bar.update()
                if skip == "norm":  # an outlier gradient norm (--skip-threshold): counted, never fatal
                    skipped += 1
                    skipped_norm += 1
                    continue
                if skip:
                    skipped += 1
                    in_a_row += 1
                    if in_a_row >= cfg.skip_nonfinite:
                        raise VaeExtError(f"training diverged: {in_a_row} steps in a row with a non-finite loss or "
                                          f"gradient (--skip-nonfinite {cfg.skip_nonfinite}), the last in epoch "
                                          f"{epoch}; try a lower --lr or a KL --warmup")
                    continue
                in_a_row = 0
                sums += torch.stack([loss, rec, kl, loss.new_tensor(len(idx))]).double()
                w = len(idx) if hierarchical else 1  # an HVAE's layer KLs: nats per image over the epoch
                units[:-1] += unit_kl.reshape(-1).double() * w
                units[-1] += w
                if (i % 10 == 9 or i == steps - 1) and sums[3] > 0:
                    running = (sums[0] / sums[3]).item()
                    if not math.isfinite(running):
                        raise VaeExtError(f"training diverged: the loss is {running} in epoch {epoch}; "
                                          f"try a lower --lr or a KL --warmup")
                    bar.set_postfix(loss=f"{running:.2f}")
        if not _weights_finite(model):  # never checkpoint a non-finite weight
            raise VaeExtError(f"training diverged: a weight became non-finite in epoch {epoch}, which was not "
                              f"saved; try a lower --lr, a KL --warmup or --skip-nonfinite")
        ctx.all_reduce_sum(sums)
        ctx.all_reduce_sum(units)
        s = [v if sums[3] > 0 else math.nan for v in sums.tolist()]
        active = int((units[:-1] / units[-1] > ACTIVE_UNIT_NATS).sum()) if units[-1] > 0 else math.nan
        c = model.log_norm_const
        test = evaluate(model, data.test, ctx, labels=data.test_labels if model.conditional else None)
        row = {"epoch": epoch, "step": step, "beta": beta, "train_loss": s[0] / s[3],
               "train_nelbo": (s[1] + s[2]) / s[3] + c, "train_rec": s[1] / s[3] + c, "train_kl": s[2] / s[3],
               "test_nelbo": test["nelbo"], "test_rec": test["rec"], "test_kl": test["kl"], "skipped": skipped,
               "lr": cfg.lr,
               "seconds": time.perf_counter() - t0, "active_units": active}
        if cfg.recon == "dmol":
            dims = math.prod(data.image_shape)
            row.update(train_bpd=bits_per_dim(row["train_nelbo"], dims), test_bpd=bits_per_dim(row["test_nelbo"], dims))
        if cfg.skip_threshold or hierarchical:
            row["skipped_norm"] = skipped_norm
        if hierarchical:
            row.update(layer_row(model, (units[:-1] / units[-1]).tolist() if units[-1] > 0 else [math.nan] * n_units))
        history.append(row)
        if ctx.is_main:
            save_checkpoint(ckpt_path, model, optimizer, cfg, epoch, history, data)
            write_csv(out / METRICS_NAME, metric_columns(cfg, model), history)
            if cfg.plot_every and epoch % cfg.plot_every == 0 and epoch != cfg.epochs:
                save_plots(out, model, data, history)
        bpd = f" = {row['test_bpd']:.4f} bits/dim" if cfg.recon == "dmol" else ""
        skips = f", {skipped_norm} updates skipped (gradient norm > {cfg.skip_threshold:g})" if skipped_norm else ""
        log(f"epoch {epoch:3d}/{cfg.epochs}  train -ELBO {row['train_nelbo']:8.3f}  test -ELBO "
            f"{row['test_nelbo']:8.3f} nats/image{bpd}  (KL {row['test_kl']:.2f}, beta {beta:.2f}, active {unit_name} "
            f"{active}/{n_units}{skips}, {row['seconds']:.1f} s)")

    if ctx.is_main:
        if not ckpt_path.exists():  # resumed past the end, or --epochs 0: still leave a checkpoint
            save_checkpoint(ckpt_path, model, optimizer, cfg, start, history, data)
            write_csv(out / METRICS_NAME, metric_columns(cfg, model), history)
        save_plots(out, model, data, history)
        names = [METRICS_NAME, "reconstructions.png", "samples.png"] + (["loss_curves.png"] if history else [])
        names += ["kl_per_layer.png"] if hierarchical and history else []
        if cfg.eval_k or hierarchical:
            log(test_summary(model, data.test, cfg.eval_k, seed=cfg.seed, progress=cfg.progress))
        log("wrote " + ", ".join(str(p) for p in [ckpt_path, *(out / n for n in names)]))
    ctx.barrier()
    return TrainResult(model=model, config=cfg, history=history, out=out, checkpoint=ckpt_path, data=data)
