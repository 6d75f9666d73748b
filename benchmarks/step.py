"""One training step (Adam) of a VAE: fused (``vae_ext`` kernels) vs reference (plain PyTorch), eager and compiled.

Models (``vae_ext.VAE``):

- ``mlp``: 784-400-20 (pytorch/examples), inputs (N, 1, 28, 28) MNIST-like (80% zeros, ink near 1),
  once with ``recon="bce"`` (pytorch/examples: a sigmoid on the decoder, then binary cross-entropy on
  probabilities, the loss ``FusedELBOLoss`` replaces as a drop-in) and once with ``"bce_logits"``
  (the decoder's logits, PyTorch's fused ``binary_cross_entropy_with_logits`` in the reference);
- ``conv``: ``ConvVAE`` on (N, 3, 64, 64) inputs uniform in [0, 1], latent 128, default channels/hidden,
  ``recon="bce_logits"``.

One call = ``opt.zero_grad(set_to_none=True); loss = model.loss(x); loss.backward(); opt.step()`` with
``torch.optim.Adam(lr=1e-3)`` (PyTorch's default implementation for the device; ``--adam fused`` or
``foreach`` to choose). ``fused=True`` draws z
with ``vae_ext.reparameterize`` and scores with ``FusedELBOLoss``; ``fused=False`` uses
``vae_ext.reference``. The compiled variants wrap ``model.loss`` (forward + loss; the backward through
AOTAutograd) in ``torch.compile``; the optimizer step stays eager in all four, so they differ only in
the model and loss. All four models start from the same weights.
"""
from __future__ import annotations

import re
import sys

import torch

import vae_ext

import measure
from inputs import mnist_like
from settings import Settings, dtype_name

NAME = "step"
TITLE = "Training step (forward + loss + backward + Adam)"
IMPLS = ("ref_eager", "fused_eager", "ref_compile", "fused_compile")
BASELINES = ("ref_eager", "ref_compile")
# the fused variant and its reference, eager and compiled: the keys of speedup and mem_fused_le
PAIRS = {"eager": ("fused_eager", "ref_eager"), "compile": ("fused_compile", "ref_compile")}

BATCHES = {"mlp": [128, 1024], "conv": [128, 1024]}
QUICK_BATCHES = {"mlp": [128], "conv": [8]}  # --quick runs the MLP only unless --models says otherwise

# recon modes per model (those of --recon that the model runs)
RECONS = {"mlp": ("bce", "bce_logits"), "conv": ("bce_logits",)}

MODELS = {
    "mlp": {"arch": "mlp", "input_shape": (1, 28, 28), "latent_size": 20, "hidden_sizes": (400,)},
    "conv": {"arch": "conv", "input_shape": (3, 64, 64), "latent_size": 128},
}


_ADAM = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parse_size(text: str) -> int:
    """A batch size; ``mlp:128`` or ``conv:16`` restricts it to one model."""
    m = re.fullmatch(r"\s*(?:(mlp|conv)\s*:)?\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"step size: expected BATCH or MODEL:BATCH (e.g. 128 or conv:16), got {text!r}")
    return (m.group(1), int(m.group(2)))  # type: ignore[return-value]


def cases(settings: Settings) -> list:
    override = settings.sizes.get(NAME)
    out = []
    for dtype in settings.dtypes:
        for model in settings.models:
            if model not in MODELS:
                raise ValueError(f"--models: expected mlp or conv, got {model!r}")
            if override:
                batches = [b for (m, b) in override if m in (None, model)]
            else:
                batches = (QUICK_BATCHES if settings.quick else BATCHES)[model]
            recons = [r for r in RECONS[model] if r in settings.recon_modes] or [RECONS[model][-1]]
            out += [{"model": model, "recon": r, "batch": b, "dtype": dtype} for r in recons for b in batches]
    return out


def case_label(c: dict) -> str:
    return f"{c['model']} {c['recon']} batch {c['batch']}"


def _inputs(c: dict, settings: Settings, g: torch.Generator) -> torch.Tensor:
    shape = (c["batch"], *MODELS[c["model"]]["input_shape"])
    if c["model"] == "mlp":
        return mnist_like(shape, device=settings.device, dtype=c["dtype"], generator=g)
    return torch.rand(shape, generator=g).to(device=settings.device, dtype=c["dtype"])


def run_case(c: dict, settings: Settings) -> dict:
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    cfg = dict(MODELS[c["model"]])
    x = _inputs(c, settings, g)

    base = vae_ext.VAE(**cfg, recon=c["recon"], fused=False)
    state = base.state_dict()
    opts, fns, fwd_bwd = {}, {}, {}
    for impl in IMPLS:
        model = vae_ext.VAE(**cfg, recon=c["recon"], fused=impl.startswith("fused"))
        model.load_state_dict(state)
        model.to(device=settings.device, dtype=c["dtype"]).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **_ADAM[settings.adam])
        loss_fn = measure.compile_fn(model.loss, settings) if impl.endswith("compile") else model.loss

        def step(opt=opt, loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x)
            loss.backward()
            opt.step()

        def forward_backward(loss_fn=loss_fn):
            loss_fn(x).backward()

        opts[impl], fns[impl], fwd_bwd[impl] = opt, step, forward_backward

    def reset():
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)

    # Peak memory of forward + backward (where fused and reference differ: activations, loss
    # temporaries), and of the whole step (usually Adam's temporaries on the largest weight).
    m = measure.measure_impls(settings, case_label(c), fns, reset=reset, graphable=False,
                             mem_fns={"peak_mem_bytes": fwd_bwd, "peak_mem_step_bytes": fns})
    times, peak = m["times"], m["peak_mem_bytes"]
    rec = {
        "model": c["model"],
        "recon": c["recon"],
        "batch": c["batch"],
        "dtype": dtype_name(c["dtype"]),
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "parameters": sum(p.numel() for p in base.parameters()),
        "times": times,
        "first_call_s": m["first_call_s"],
        "other_cpu_load": m["other_cpu_load"],
        "speedup": {
            **{k: measure.ratio(times[ref], times[fused]) for k, (fused, ref) in PAIRS.items()},
            "fused_eager_vs_ref_compile": measure.ratio(times["ref_compile"], times["fused_eager"]),
        },
        "peak_mem_bytes": peak,
        "peak_mem_step_bytes": m["peak_mem_step_bytes"],
    }
    if peak:
        step_peak = m["peak_mem_step_bytes"]
        rec["mem_fused_le_step"] = {k: step_peak[fused] <= step_peak[ref] for k, (fused, ref) in PAIRS.items()}
        rec["mem_fused_le"] = {k: peak[fused] <= peak[ref] for k, (fused, ref) in PAIRS.items()}
    return rec


def run(settings: Settings, progress=None) -> dict:
    adam = "".join(f", {k}={v}" for k, v in _ADAM[settings.adam].items())
    return measure.run_benchmark(
        settings, progress, sys.modules[__name__], adam=settings.adam,
        optimizer=f"torch.optim.Adam(lr=1e-3{adam}), eager in every variant",
        call="opt.zero_grad(set_to_none=True); model.loss(x).backward(); opt.step()")
