"""The configuration of a training run (:class:`TrainConfig`): every option of ``vae-ext train``,
checked on construction, stored in the run's checkpoint."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..models import ARCHS, RECON_MODES
from .data import BINARIZE_MODES, parse_split
from .errors import ConfigError
from .hvae_config import check_model_options
from .limits import FLOAT32_MAX, LR_WHY, MAX_INT, MAX_LR, MAX_SEED

__all__ = ["TrainConfig", "FIXED_ON_RESUME", "DEFAULT_HIDDEN", "DEFAULT_CHANNELS", "DMOL_MIXTURES", "DMOL_NUM_BITS",
           "MAX_MIXTURES"]

DEFAULT_HIDDEN = {"mlp": (400,), "conv": (256,)}
DEFAULT_CHANNELS = (32, 64)
DMOL_MIXTURES, DMOL_NUM_BITS = 10, 8  # --recon dmol: VDVAE's and PixelCNN++'s M = 10, 8-bit images
# More components than any published model uses by far (PixelCNN++: 10, VDVAE: 10, NVAE: 10);
# a bound keeps a typo from building a decoder of billions of outputs.
MAX_MIXTURES = 1024
# Options that define the model and its data: a resumed run must keep them.
FIXED_ON_RESUME = ("data", "train_split", "binarize", "arch", "latent", "hidden", "channels", "recon",
                   "conditional", "mixtures", "num_bits", "model", "width", "layers")


def _normalize_data_spec(spec: str) -> str:
    """Make a data path absolute, so a checkpoint's data can be found from any folder."""
    if spec.startswith("mnist:") and len(spec) > 6:
        return "mnist:" + os.path.abspath(spec[6:])
    if spec.startswith("npz:"):
        return "npz:" + os.path.abspath(spec[4:])
    if spec.endswith(".npz"):
        return os.path.abspath(spec)
    return spec


@dataclass
class TrainConfig:
    """Everything a training run depends on (stored in its checkpoint). CLI option = field name."""

    data: str = "digits"
    train_split: int | float | None = None  # a single pool of images: first N (or fraction) to train
    binarize: str | None = None  # None: "dynamic", or "none" for recon "dmol" (which models grey levels)
    model: str = "vae"  # "hvae": the hierarchical VAE (vae_ext.models.HVAE; options in cli/hvae_config.py)
    arch: str | None = None  # None: "mlp" (a --model hvae run stores "hvae")
    latent: int | None = None  # None: 20 (hvae: 4 channels per latent layer)
    width: int | None = None  # hvae only: channels at every resolution (None: 16)
    layers: int | None = None  # hvae only: latent layers per resolution (None: 1)
    hidden: list | None = None  # None: 400 (mlp) or 256 (conv)
    channels: list | None = None  # conv only; None: 32,64
    recon: str | None = None  # None: "bce_logits" ("dmol" for hvae)
    mixtures: int | None = None  # recon "dmol" only: mixture components per pixel (None: 10)
    num_bits: int | None = None  # recon "dmol" only: the data's grid, 2^num_bits levels in [-1, 1] (None: 8)
    conditional: bool = False  # a class-conditional VAE: q(z|x,y), p(x|z,y) and a learned prior p(z|y)
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    warmup: float = 0.0  # epochs over which the KL weight rises linearly from 0 to beta
    free_bits: float = 0.0  # nats per latent unit: the KL term is sum_u max(free_bits, KL_u) (0: off)
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    reference: bool = False  # vae_ext.reference (plain PyTorch) instead of the fused kernels
    progress: bool = True
    plot_every: int = 0  # also write the PNGs every N epochs (0: only at the end)
    skip_nonfinite: int = 0  # skip steps with a non-finite loss or gradient; stop after this many in a row (0: off)
    skip_threshold: float = 0.0  # skip steps whose gradient norm exceeds this (VDVAE's skip_threshold; 0: off)
    eval_k: int | None = None  # importance samples per test image in the final summary (None: 0; hvae: 16)

    def __post_init__(self):
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ConfigError(f"--{name.replace('_', '-')}: expected one of {', '.join(options)}, "
                                  f"got {getattr(self, name)!r}")

        def number(name, kind, lo, lo_ok=True, hi=None, why=None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                what = "a number" if kind is float else "an integer"
                raise ConfigError(f"--{name.replace('_', '-')}: expected {what}, got {v!r}")
            if not math.isfinite(v) or v < lo or (v == lo and not lo_ok):
                rel = ">=" if lo_ok else ">"
                raise ConfigError(f"--{name.replace('_', '-')}: expected a value {rel} {lo}, got {v!r}")
            hi = hi if hi is not None else (FLOAT32_MAX if kind is float else MAX_INT)
            if v > hi:
                why = why or ("the largest float32" if kind is float else "PyTorch's int64")
                bound = f"{hi:.3g}" if kind is float else ("2^63 - 1" if hi == MAX_INT else f"{hi:,}")
                raise ConfigError(f"--{name.replace('_', '-')}: expected at most {bound} ({why}), got {v!r}")
            setattr(self, name, kind(v))

        check_model_options(self)
        if self.model == "vae":
            choice("arch", tuple(ARCHS))
        choice("recon", RECON_MODES)
        self._dmol_options()
        choice("binarize", BINARIZE_MODES)
        number("latent", int, 1)
        number("epochs", int, 0)
        number("batch_size", int, 1)
        number("lr", float, 0.0, lo_ok=False, hi=MAX_LR, why=LR_WHY)
        number("beta", float, 0.0)
        number("warmup", float, 0.0, hi=math.inf)
        number("free_bits", float, 0.0)
        if not isinstance(self.conditional, bool):
            raise ConfigError(f"--conditional: expected True or False, got {self.conditional!r}")
        number("seed", int, 0, hi=MAX_SEED, why="the seed plus an epoch must fit in uint64")
        number("plot_every", int, 0)
        number("skip_nonfinite", int, 0)
        number("skip_threshold", float, 0.0)
        number("eval_k", int, 0)
        self.train_split = parse_split(self.train_split)
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"--data: expected 'digits', 'mnist:DIR' or FILE.npz, got {self.data!r}")
        self.data = _normalize_data_spec(self.data)
        for name in ("hidden", "channels"):
            v = getattr(self, name)
            if v is not None:
                v = [int(s) for s in v]
                if any(s < 1 for s in v):
                    raise ConfigError(f"--{name}: expected positive sizes, got {v}")
                if any(s > MAX_INT for s in v):
                    raise ConfigError(f"--{name}: expected sizes below 2^63, got {v}")
                setattr(self, name, v)
        if self.hidden is None and self.model == "vae":
            self.hidden = list(DEFAULT_HIDDEN[self.arch])
        if self.arch == "mlp" and not self.hidden:
            raise ConfigError("--hidden: the mlp needs at least one hidden layer")
        if self.arch == "conv" and self.channels is None:
            self.channels = list(DEFAULT_CHANNELS)
        if self.arch == "mlp" and self.channels is not None:
            raise ConfigError("--channels: only the conv architecture has convolutions (pass --arch conv)")
        if self.out is not None:
            self.out = str(self.out)

    def _dmol_options(self) -> None:
        """--mixtures and --num-bits belong to --recon dmol, which models the grey levels: it refuses
        a binarization, and the other modes refuse the two options."""
        if self.recon != "dmol":
            for name in ("mixtures", "num_bits"):
                if getattr(self, name) is not None:
                    opt = "--" + name.replace("_", "-")
                    raise ConfigError(f"{opt}: only --recon dmol (a mixture of logistics) takes it; "
                                      f"got --recon {self.recon}")
            self.binarize = "dynamic" if self.binarize is None else self.binarize
            return
        if self.binarize not in (None, "none"):
            raise ConfigError(f"--binarize {self.binarize}: --recon dmol models the grey levels (on the "
                              f"--num-bits grid, scaled to [-1, 1]), not binary pixels; leave --binarize out")
        self.binarize = "none"
        for name, default, hi in (("mixtures", DMOL_MIXTURES, MAX_MIXTURES), ("num_bits", DMOL_NUM_BITS, 16)):
            v = default if getattr(self, name) is None else getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise ConfigError(f"--{name.replace('_', '-')}: expected an integer in 1..{hi:,}, got {v!r}")
            setattr(self, name, v)
