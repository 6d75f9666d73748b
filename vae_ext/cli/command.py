"""The command line of ``vae-ext``: its options, the dispatch to train | eval | sweep, and its exit statuses.

See docs/cli.md. Mistakes in the input (options, data files, checkpoints, devices) end the command
with one line on stderr naming the problem and a non-zero exit status: 2 for an unusable option
(argparse), 1 for everything else, 130 when interrupted (Ctrl-C), 143 on SIGTERM.

The library needs torch alone; the command also needs the ``cli`` extra (:data:`CLI_REQUIREMENTS`).
Without it the command says what to install, on one line, and exits with status 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import signal
import sys

from ._interrupts import raise_interrupt
from .errors import VaeExtError
from .limits import FLOAT32_MAX, LR_WHY, MAX_INT, MAX_LR, MAX_SEED, MAX_THREADS

__all__ = ["main", "build_parser", "CLI_REQUIREMENTS"]

PROG = "vae-ext"
# What the command imports beyond torch (module -> the pip distribution that provides it): the
# ``cli`` extra of pyproject.toml.
CLI_REQUIREMENTS = {"numpy": "numpy", "tqdm": "tqdm", "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def _missing_requirements() -> list:
    """The distributions of CLI_REQUIREMENTS that cannot be imported (found without importing them)."""
    missing = []
    for module, dist in CLI_REQUIREMENTS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(dist)
    return missing


def _requirements_error(missing) -> str:
    return f'{PROG}: the command needs the cli extra: pip install "vae_ext[cli]" (missing: {", ".join(missing)})'


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_list(text: str, allow_empty: bool = False) -> list:
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if (not values and not allow_empty) or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if any(v > MAX_INT for v in values):
        raise argparse.ArgumentTypeError(f"expected sizes below 2^63, got {text!r}")
    return values


def _hidden(text: str) -> list:
    return _int_list(text, allow_empty=True)


def _latents(text: str) -> list:
    values = _int_list(text)
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"each latent size once: {', '.join(map(str, twice))} is given more "
                                         f"than once in {text!r}")
    return values


def _int_in(lo: int, hi: int = MAX_INT, why: str = ""):
    """An integer lo..hi; above hi the message says the bound (and ``why``)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if v > hi:
            bound = "2^63 - 1" if hi == MAX_INT else f"{hi:,}"
            raise argparse.ArgumentTypeError(f"expected at most {bound}{why}, got {text!r}")
        return v

    return parse


_positive_int = _int_in(1)
_nonneg_int = _int_in(0)
_seed = _int_in(0, MAX_SEED)
_threads = _int_in(1, MAX_THREADS, " (OpenMP fails with far more threads than cores)")


def _float(lo: float, strict: bool, hi: float = FLOAT32_MAX, why: str = "the largest float32"):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not (v > lo if strict else v >= lo) or v == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {lo:g}, got {text!r}")
        if v > hi:
            raise argparse.ArgumentTypeError(f"expected at most {hi:.3g} ({why}), got {text!r}")
        return v

    return parse


def _device(text: str) -> str:
    if text in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")


def _train_options(p: argparse.ArgumentParser, latent: bool = True, sweep: bool = False) -> None:
    """The options of `train` (and `sweep`). Defaults are None here: TrainConfig fills them in, and
    on --resume only the options given explicitly override the checkpoint's."""
    from ..models import ARCHS, RECON_MODES
    from .config import MAX_MIXTURES
    from .data import BINARIZE_MODES

    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="SPEC", help="digits (default: scikit-learn's 8x8 digits), mnist:DIR "
                   "(IDX files, gzipped or raw) or FILE.npz")
    d.add_argument("--train-split", metavar="N|FRAC", help="for a source with a single pool of images (digits, "
                   "a folder with only the t10k files, a one-array .npz): the first N images (or this fraction) "
                   "train, the rest test; default 0.8")
    d.add_argument("--binarize", choices=BINARIZE_MODES, help="dynamic (default): a fresh Bernoulli draw of "
                   "every training batch; static: drawn once; none: grey levels (--recon dmol: always)")
    m = p.add_argument_group("model")
    if not sweep:
        m.add_argument("--model", choices=("vae", "hvae"), help="vae (default: one latent vector) or hvae (a "
                       "VDVAE-style hierarchical VAE: a latent layer per block over several resolutions, --recon dmol)")
    m.add_argument("--arch", choices=tuple(ARCHS), help="mlp (default) or conv")
    if latent:
        m.add_argument("--latent", type=_positive_int, metavar="L",
                       help="latent size (default 20; --model hvae: channels of each latent layer, default 4)")
    if not sweep:
        m.add_argument("--width", type=_positive_int, metavar="W",
                       help="--model hvae: channels at every resolution (default 16)")
        m.add_argument("--layers", type=_positive_int, metavar="N",
                       help="--model hvae: latent layers (and encoder blocks) per resolution (default 1)")
    m.add_argument("--hidden", type=_hidden, metavar="H1,H2",
                   help="hidden layer sizes (default 400 for mlp, 256 for conv)")
    m.add_argument("--channels", type=_int_list, metavar="C1,C2", help="conv channels (default 32,64)")
    m.add_argument("--recon", choices=RECON_MODES, help="reconstruction loss (default bce_logits); dmol: a "
                   "discretized mixture of logistics per pixel on the grey levels scaled to [-1, 1] (not binarized)")
    m.add_argument("--mixtures", type=_int_in(1, MAX_MIXTURES), metavar="M",
                   help="with --recon dmol: mixture components per pixel (default 10)")
    m.add_argument("--num-bits", type=_int_in(1, 16), metavar="B",
                   help="with --recon dmol: the data's grid, 2^B levels in [-1, 1] (default 8; 8x8 digits' 17 "
                   "levels are rounded to it)")
    m.add_argument("--conditional", action="store_true", default=None,
                   help="class-conditional VAE (CVAE) on the data's labels: the encoder and decoder see the "
                   "one-hot class, the prior p(z|y) is learned per class")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=_nonneg_int, help="total epochs (default 50" + (
        ", for each model)" if sweep else "; on --resume, the new total)"))
    t.add_argument("--batch-size", type=_positive_int, help="images per step and process (default 128)")
    t.add_argument("--lr", type=_float(0, strict=True, hi=MAX_LR, why=LR_WHY), help="Adam learning rate (default 1e-3)")
    t.add_argument("--beta", type=_float(0, strict=False), help="KL weight (default 1)")
    t.add_argument("--warmup", type=_float(0, strict=False, hi=float("inf")), metavar="EPOCHS",
                   help="KL warm-up: beta rises linearly from 0 over this many epochs (default 0: none)")
    t.add_argument("--free-bits", type=_float(0, strict=False), metavar="LAMBDA",
                   help="free bits: each latent unit's KL term is at least LAMBDA nats (its batch mean; "
                   "units under the floor get no KL gradient); default 0: off")
    t.add_argument("--device", type=_device, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    t.add_argument("--seed", type=_seed, help="random seed (default 0)")
    t.add_argument("--threads", type=_threads, help="CPU threads (default: PyTorch's choice; tiny models on "
                   "a busy machine run faster with 1)")
    t.add_argument("--skip-nonfinite", type=_nonneg_int, metavar="N",
                   help="skip a step whose loss or gradient norm is not finite (no optimizer step; counted in "
                   "metrics.csv) and stop after N such steps in a row (default 0: stop on a non-finite loss)")
    if not sweep:
        t.add_argument("--skip-threshold", type=_float(0, strict=True), metavar="G",
                       help="skip an update whose gradient norm exceeds G (VDVAE's skip_threshold; counted in "
                       "metrics.csv's skipped and skipped_norm); default: off")
        t.add_argument("--eval-k", type=_nonneg_int, metavar="K",
                       help="after training, the test NLL with K importance samples per image (default 0; "
                       "--model hvae: 16)")
    t.add_argument("--reference", action="store_true", default=None,
                   help="use vae_ext.reference (plain PyTorch) instead of the fused kernels")
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="sweep folder (default runs/sweep-DATE-TIME)" if sweep
                   else "run folder (default runs/vae-DATE-TIME)")
    o.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    o.add_argument("--plot-every", type=_nonneg_int, metavar="N", help="also write the PNGs every N epochs")


def _explicit(args, names) -> dict:
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _config_names():
    from dataclasses import fields

    from .config import TrainConfig

    return [f.name for f in fields(TrainConfig)]


def _cmd_train(args) -> int:
    import os
    from pathlib import Path

    from .checkpoint import checkpoint_file, load_checkpoint, resume_config
    from .config import TrainConfig
    from .errors import ConfigError
    from .runlock import RunLock
    from .train import train

    opts = _explicit(args, _config_names())
    if args.resume is None:
        train(TrainConfig(**opts))
        return 0
    if args.resume is True:
        if "out" not in opts:
            raise ConfigError("--resume without a RUN needs --out DIR (the run folder to continue)")
        where = opts["out"]
    else:
        where = args.resume
    opts.setdefault("out", str(checkpoint_file(where).parent))
    # The folder this run writes is locked before anything in it is read: a checkpoint read first
    # could be replaced by another run's newer epoch, which this run would then overwrite. (A new
    # folder holds nothing to read: train locks it once the data and the model are known to work.
    # Under torchrun rank 0 alone locks; train checks that every rank read the same checkpoint.)
    out = Path(opts["out"])
    lock = RunLock(out) if out.is_dir() and os.environ.get("RANK", "0") == "0" else None
    try:
        if lock is not None:
            lock.acquire()
        ckpt = load_checkpoint(where)
        train(resume_config(ckpt, opts), ckpt, lock=lock)
    finally:
        if lock is not None:
            lock.release()
    return 0


def _cmd_eval(args) -> int:
    from .evaluate import evaluate_checkpoint, json_safe

    r = evaluate_checkpoint(args.checkpoint, k=args.k, data=args.data, train_split=args.train_split,
                            split=args.split, device=args.device, reference=args.reference, seed=args.seed,
                            batch_size=args.batch_size, progress=args.progress)
    if args.json:
        print(json.dumps(json_safe(r), allow_nan=False))  # strict JSON: null, with a note, for NaN
    else:
        print(f"{r['checkpoint']} (epoch {r['epoch']}), {r['split']} set of {r['data']}: {r['n']} images, "
              f"{r['kernels']} kernels on {r['device']}")
        # a class-conditional model scores -log p(x|y): each image given its label, z from the class prior
        given = " (given the class: -log p(x|y))" if r["conditional"] else ""
        elbo, nll = f"{r['nelbo']:.3f} nats/image", f"{r['nll']:.3f} +- {r['nll_sem']:.3f} nats/image"
        if "dims" in r:  # a --recon dmol model: also in bits per dimension
            elbo += f" = {r['nelbo_bpd']:.4f} bits/dim"
            nll += f" = {r['nll_bpd']:.4f} +- {r['nll_sem_bpd']:.4f} bits/dim"
        print(f"{r['split']} negative ELBO{given}:  {elbo}  ({r['seconds_elbo']:.1f} s)")
        print(f"{r['split']} NLL{given}, k={r['k']}:  {nll} "
              f"(importance-weighted estimate +- standard error over images; {r['seconds_nll']:.1f} s)")
        for key, why in r["notes"].items():
            print(f"note: {key}: {why}")
    return 0


def _cmd_sweep(args) -> int:
    from .config import TrainConfig
    from .sweep import sweep

    opts = _explicit(args, [n for n in _config_names() if n != "latent"])
    base = TrainConfig(**opts)
    sweep(args.latent, base, k=args.k, overrides=opts)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog=PROG, description="Train and evaluate VAEs on the fused vae_ext kernels.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,sweep}")

    p = sub.add_parser("train", help="train a VAE (default: 8x8 digits, under a minute on a CPU)",
                       description="Train a VAE; writes checkpoint.pt, metrics.csv and PNGs into --out. "
                       "Under torchrun --nproc_per_node=N it trains data-parallel (DDP).")
    _train_options(p)
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN",
                   help="continue the run in RUN (a run folder or checkpoint file; default --out); "
                   "options given again must match the ones that define the model and data")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="test negative ELBO and importance-weighted NLL of a checkpoint",
                       description="Score a checkpoint: the negative ELBO (one z per image) and the "
                       "importance-weighted NLL estimate with --k samples (IWAE bound), in nats per image.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pt or its run folder")
    p.add_argument("--k", type=_positive_int, default=5000, help="importance samples per image (default 5000)")
    p.add_argument("--data", metavar="SPEC", help="score other data (default: the checkpoint's)")
    p.add_argument("--train-split", metavar="N|FRAC", help="with --data: split of a single pool of images")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which set to score (default test)")
    p.add_argument("--batch-size", type=_positive_int, default=100, help="images per batch (default 100)")
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the importance samples (default 0)")
    p.add_argument("--threads", type=_threads, help="CPU threads (default: PyTorch's choice)")
    p.add_argument("--reference", action="store_true", help="score with vae_ext.reference")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("sweep", help="one model per latent size: ELBO and BIC curves",
                       description="Train one model per latent size into OUT/latent-L and draw the ELBO "
                       "and BIC curves (OUT/sweep.png, OUT/sweep.csv). Takes the train options.")
    p.add_argument("--latent", type=_latents, default=[2, 5, 10, 20, 50], metavar="L1,L2,...",
                   help="latent sizes (default 2,5,10,20,50)")
    p.add_argument("--k", type=_positive_int, default=1000,
                   help="importance samples for the NLL and BIC (default 1000)")
    _train_options(p, latent=False, sweep=True)
    p.set_defaults(func=_cmd_sweep)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's preemption), handled like Ctrl-C so cleanup code runs."""


def _on_signal(signum, frame):
    raise_interrupt(_Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


def main(argv=None) -> int:
    """Run the command; returns the exit status (the console script exits with it)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return _main(argv, command)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main(argv, command) -> int:
    missing = _missing_requirements()
    if missing:
        print(_requirements_error(missing), file=sys.stderr)
        return 1
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version, or a usage error already printed on one line
            return e.code if isinstance(e.code, int) else 0
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except VaeExtError as e:
        print(f"{PROG} {command}: error: {e}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # found by find_spec above but broken: still one line, not a traceback
        root = (e.name or "").partition(".")[0]
        if root not in CLI_REQUIREMENTS:
            raise
        print(_requirements_error([CLI_REQUIREMENTS[root]]), file=sys.stderr)
        return 1
    except OSError as e:  # writing into --out: permission denied, disk full ...
        print(f"{PROG} {command}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:  # what the memory limit (vae_ext.cli.memory) did not foresee: still one line
        what = str(e).strip().splitlines()[0] if str(e).strip() else "an allocation failed"
        print(f"{PROG} {command}: error: out of memory ({what})", file=sys.stderr)
        return 1
    except RuntimeError as e:  # the allocator's refusal (CPU: a RuntimeError; CUDA: torch.OutOfMemoryError)
        from .model_memory import first_line, is_out_of_memory

        if not is_out_of_memory(e):
            raise
        print(f"{PROG} {command}: error: out of memory ({first_line(e)}); a smaller --batch-size, --hidden, "
              f"--latent or --channels needs less", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"{PROG} {command}: {what} (files already written are complete: they are replaced atomically)",
              file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
