"""One training step (Adam) of a VAE: fused (``vae_ext`` kernels) vs reference (plain PyTorch), eager and compiled.

Models (``vae_ext.VAE``):

- ``mlp``: 784-400-20 (pytorch/examples), inputs (N, 1, 28, 28) MNIST-like (80% zeros, ink near 1),
  once with ``recon="bce"`` (pytorch/examples: a sigmoid on the decoder, then binary cross-entropy on
  probabilities, the loss ``FusedELBOLoss`` replaces as a drop-in) and once with ``"bce_logits"``
  (the decoder's logits, PyTorch's fused ``binary_cross_entropy_with_logits`` in the reference);
- ``conv``: ``ConvVAE`` on (N, 3, 64, 64) inputs uniform in [0, 1], latent 128, default channels/hidden,
  ``recon="bce_logits"``.
- ``hvae`` (``vae_ext.models.HVAE``, opt-in with ``--models``): the VDVAE-style hierarchical VAE on
  (N, 1, 32, 32) images on the 8-bit grid in [-1, 1] (MNIST-like ink), its default size (width 16,
  one latent layer per resolution) at batch 128 and a wider, deeper one (width 64, three layers per
  resolution) at batch 16; ``fused=False`` runs its objectives through ``vae_ext.reference``. Its
  loss is ``model.loss(x)[0]`` (``recon`` does not apply: the likelihood is the DMoL, "dmol" in the
  record). Each record adds ``objective_share``: the part of the step spent in the latent layers and
  the likelihood, by ``torch.profiler`` (step_profile.py says how). Compiling the wide model takes
  tens of minutes on a small CPU, so by default its row is eager only (a size ending ``:eager``).

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
import vae_ext.models

import measure
import step_profile
from inputs import mnist_like
from settings import Settings, dtype_name

NAME = "step"
TITLE = "Training step (forward + loss + backward + Adam)"
IMPLS = ("ref_eager", "fused_eager", "ref_compile", "fused_compile")
BASELINES = ("ref_eager", "ref_compile")
# the fused variant and its reference, eager and compiled: the keys of speedup and mem_fused_le
PAIRS = {"eager": ("fused_eager", "ref_eager"), "compile": ("fused_compile", "ref_compile")}

# a size: (batch, width and layers of the hvae or None, run the compiled pair too)
BATCHES = {"mlp": [(128, None, True), (1024, None, True)], "conv": [(128, None, True), (1024, None, True)],
           "hvae": [(128, (16, 1), True), (16, (64, 3), False)]}
# --quick runs the MLP only unless --models says otherwise
QUICK_BATCHES = {"mlp": [(128, None, True)], "conv": [(8, None, True)], "hvae": [(4, (16, 1), True)]}

# recon modes per model (those of --recon that the model runs)
RECONS = {"mlp": ("bce", "bce_logits"), "conv": ("bce_logits",), "hvae": ("dmol",)}

MODELS = {
    "mlp": {"arch": "mlp", "input_shape": (1, 28, 28), "latent_size": 20, "hidden_sizes": (400,)},
    "conv": {"arch": "conv", "input_shape": (3, 64, 64), "latent_size": 128},
    "hvae": {"input_shape": (1, 32, 32)},
}


_ADAM = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def parse_size(text: str) -> tuple:
    """A batch size; ``mlp:128`` or ``conv:16`` restricts it to one model; ``hvae:16:64x3`` is the
    hierarchical VAE at width 64 with 3 layers per resolution, ``hvae:16:64x3:eager`` without the
    compiled pair. Returns (model or None, batch, (width, layers) or None, compiled too)."""
    m = re.fullmatch(r"\s*(?:(mlp|conv|hvae)\s*:)?\s*(\d+)\s*(?::\s*(\d+)x(\d+)\s*)?(:\s*eager\s*)?", text)
    if not m or (m.group(1) != "hvae" and (m.group(3) or m.group(5))):
        raise ValueError(f"step size: expected BATCH, MODEL:BATCH or hvae:BATCH[:WIDTHxLAYERS][:eager] "
                         f"(e.g. 128, conv:16 or hvae:16:64x3), got {text!r}")
    arch = (int(m.group(3)), int(m.group(4))) if m.group(3) else ((16, 1) if m.group(1) == "hvae" else None)
    return (m.group(1), int(m.group(2)), arch, not m.group(5))


def cases(settings: Settings) -> list:
    override = settings.sizes.get(NAME)
    out = []
    for dtype in settings.dtypes:
        for model in settings.models:
            if model not in MODELS:
                raise ValueError(f"--models: expected mlp, conv or hvae, got {model!r}")
            if override:
                sizes = [(b, (a or (16, 1)) if model == "hvae" else None, comp)
                         for (m, b, a, comp) in override if m in (None, model)]
            else:
                sizes = (QUICK_BATCHES if settings.quick else BATCHES)[model]
            recons = [r for r in RECONS[model] if r in settings.recon_modes] or [RECONS[model][-1]]
            out += [{"model": model, "recon": r, "batch": b, "dtype": dtype, "arch": a, "compile": comp}
                    for r in recons for (b, a, comp) in sizes]
    return out


def case_label(c: dict) -> str:
    arch = f" width {c['arch'][0]} layers {c['arch'][1]}" if c.get("arch") else ""
    return f"{c['model']} {c['recon']}{arch} batch {c['batch']}" + ("" if c.get("compile", True) else " (eager)")


def _config(c: dict) -> dict:
    cfg = dict(MODELS[c["model"]])
    if c["model"] == "hvae":
        cfg["width"], cfg["layers"] = c["arch"]
    return cfg


def _new_model(c: dict, fused: bool) -> torch.nn.Module:
    if c["model"] == "hvae":
        return vae_ext.models.HVAE(**_config(c), fused=fused)
    return vae_ext.VAE(**_config(c), recon=c["recon"], fused=fused)


def _loss_fn(model) -> callable:
    if getattr(model, "hierarchical", False):
        return lambda x: model.loss(x)[0]  # (loss, stats)
    return model.loss


def _inputs(c: dict, settings: Settings, g: torch.Generator) -> torch.Tensor:
    shape = (c["batch"], *MODELS[c["model"]]["input_shape"])
    if c["model"] == "mlp":
        return mnist_like(shape, device=settings.device, dtype=c["dtype"], generator=g)
    if c["model"] == "hvae":  # on the 8-bit grid in [-1, 1], as the model's data
        x = mnist_like(shape, device=settings.device, dtype=torch.float32, generator=g)
        return (torch.round(x * 255) / 127.5 - 1).to(c["dtype"])
    return torch.rand(shape, generator=g).to(device=settings.device, dtype=c["dtype"])


def run_case(c: dict, settings: Settings) -> dict:
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    cfg = _config(c)
    x = _inputs(c, settings, g)

    base = _new_model(c, fused=False)
    state = base.state_dict()
    opts, fns, fwd_bwd = {}, {}, {}
    impls = IMPLS if c.get("compile", True) else tuple(i for i in IMPLS if i.endswith("eager"))
    for impl in impls:
        model = _new_model(c, fused=impl.startswith("fused"))
        model.load_state_dict(state)
        model.to(device=settings.device, dtype=c["dtype"]).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, **_ADAM[settings.adam])
        loss_fn = _loss_fn(model)
        loss_fn = measure.compile_fn(loss_fn, settings) if impl.endswith("compile") else loss_fn

        def step(opt=opt, loss_fn=loss_fn):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(x)
            loss.backward()
            opt.step()

        def forward_backward(loss_fn=loss_fn):
            loss_fn(x).backward()

        opts[impl], fns[impl], fwd_bwd[impl] = opt, step, forward_backward

    if settings.glibc_child:  # glibc_process.py: the timings alone
        return measure.child_times(fns, settings, case_label(c), {k: p for k, p in PAIRS.items() if p[0] in fns})

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
            **{k: measure.ratio(times.get(ref), times.get(fused)) for k, (fused, ref) in PAIRS.items()},
            "fused_eager_vs_ref_compile": measure.ratio(times.get("ref_compile"), times["fused_eager"]),
        },
        "peak_mem_bytes": peak,
        "peak_mem_step_bytes": m["peak_mem_step_bytes"],
    }
    pairs = {k: p for k, p in PAIRS.items() if p[0] in fns}
    if peak:
        step_peak = m["peak_mem_step_bytes"]
        rec["mem_fused_le_step"] = {k: step_peak[fused] <= step_peak[ref] for k, (fused, ref) in pairs.items()}
        rec["mem_fused_le"] = {k: peak[fused] <= peak[ref] for k, (fused, ref) in pairs.items()}
    if c["model"] == "hvae" and not settings.is_cuda:
        # eager: record_function ranges (the module names the model calls, replaced while profiling);
        # compiled fused: its vae_ext:: ops; compiled reference: fused with its neighbours, not attributable
        rec["objective_share"] = {impl: None if impl == "ref_compile" else step_profile.objective_share(
            fns[impl], ranged=impl.endswith("eager")) for impl in fns}
        rec["objective_share_ops"] = {"fused_eager": step_profile.objective_share(fns["fused_eager"], ranged=False)}
        reset()
    measure.add_fresh_process(rec, settings)
    return rec


def run(settings: Settings, progress=None) -> dict:
    adam = "".join(f", {k}={v}" for k, v in _ADAM[settings.adam].items())
    extra = {"objective_method": step_profile.METHOD} if "hvae" in settings.models else {}
    return measure.run_benchmark(
        settings, progress, sys.modules[__name__], adam=settings.adam, **extra,
        optimizer=f"torch.optim.Adam(lr=1e-3{adam}), eager in every variant",
        call="opt.zero_grad(set_to_none=True); model.loss(x).backward(); opt.step()")
