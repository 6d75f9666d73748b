"""The --model options of ``vae-ext train`` (TrainConfig's): the defaults of the hierarchical VAE
(:class:`vae_ext.models.HVAE`) and the one-line refusal of each option it cannot take, kept out of
config.py."""
from __future__ import annotations

from ..models.hvae import DEFAULT_LAYERS, DEFAULT_WIDTH, DEFAULT_ZDIM
from .errors import ConfigError
from .limits import MAX_INT

__all__ = ["MODELS", "DEFAULT_EVAL_K", "check_model_options"]

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
