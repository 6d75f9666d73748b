"""A hierarchical VAE's latent layer, forward + backward: fused ``vae_ext.gaussian_latent`` vs this
package's two-call path (``reparameterize`` + ``gaussian_kl``) vs the eager reference vs
``torch.compile`` of it vs the copy floor.

Per case, a conv latent (N, C, H, W) with a learned per-sample prior, as a VDVAE decoder block has:
``mu``, ``prior_mu`` = randn, ``logvar``, ``prior_logvar`` = 0.5 * randn - 1, all requiring grad,
``scale="logvar"`` (the two-call path's convention). One call = ``z, kl = op(mu, logvar, prior_mu,
prior_logvar)`` (the KL per sample, ``reduction="none"``, as a hierarchical VAE adds it up over its
layers) then the backward of ``(z * grad_z).sum() + kl.sum()`` with a fixed random ``grad_z``.

The floor is a copy of the bytes any forward + backward must move: the forward reads the four inputs
and writes z; the backward reads ``grad_z`` and the four inputs and writes their four gradients
(``eps`` recomputed, never stored): 14 tensors of mu's size.
"""
from __future__ import annotations

import math
import re
import sys
from typing import List, Tuple

import torch

import vae_ext
from vae_ext import reference

import measure
from inputs import leaf, randn
from settings import Settings, dtype_name

NAME = "latent"
TITLE = "Latent layer (z and KL to a learned prior), forward + backward"
IMPLS = ("fused", "two_call", "eager", "compile")
BASELINES = ("two_call", "eager", "compile")

SIZES: List[Tuple[int, ...]] = [(8, 4, 8, 8), (64, 16, 16, 16)]
QUICK_SIZES: List[Tuple[int, ...]] = [(8, 4, 8, 8)]

BYTES_FORMULA = "14 * numel(mu) * element_size"


def parse_size(text: str) -> Tuple[int, ...]:
    """``"NxCxHxW"`` or any latent shape ``NxC...`` (at least two dimensions)."""
    dims = re.split(r"\s*[xX*]\s*", text.strip())
    if len(dims) < 2 or not all(d.isdigit() for d in dims):
        raise ValueError(f"latent size: expected a latent shape NxC... (e.g. 64x16x16x16), got {text!r}")
    return tuple(int(d) for d in dims)


def fused_bytes(shape, element_size: int) -> int:
    return 14 * math.prod(shape) * element_size


def _fused(mu, lv, pmu, plv):
    return vae_ext.gaussian_latent(mu, lv, pmu, plv)


def _two_call(mu, lv, pmu, plv):
    return vae_ext.reparameterize(mu, lv), vae_ext.gaussian_kl(mu, lv, pmu, plv, reduction="none")


def _ref(mu, lv, pmu, plv):
    return reference.gaussian_latent(mu, lv, pmu, plv)


def _step(fn, inputs, grad_z):
    def step():
        for t in inputs:
            t.grad = None
        z, kl = fn(*inputs)
        torch.autograd.backward((z, kl), (grad_z, torch.ones_like(kl)))

    return step


def cases(settings: Settings) -> list:
    sizes = settings.sizes.get(NAME) or (QUICK_SIZES if settings.quick else SIZES)
    return [{"dtype": dtype, "shape": tuple(s)} for dtype in settings.dtypes for s in sizes]


def case_label(c: dict) -> str:
    return f"{dtype_name(c['dtype'])} {'x'.join(map(str, c['shape']))}"


def make_inputs(shape, dtype, device, generator):
    """The leaves ``(mu, logvar, prior_mu, prior_logvar)`` of a case and its ``grad_z``."""
    mu = leaf(randn(shape, device=device, dtype=dtype, generator=generator))
    lv = leaf(randn(shape, device=device, dtype=dtype, generator=generator, scale=0.5, shift=-1.0))
    pmu = leaf(randn(shape, device=device, dtype=dtype, generator=generator))
    plv = leaf(randn(shape, device=device, dtype=dtype, generator=generator, scale=0.5, shift=-1.0))
    return (mu, lv, pmu, plv), randn(shape, device=device, dtype=dtype, generator=generator)


def run_case(c: dict, settings: Settings) -> dict:
    g = torch.Generator().manual_seed(settings.seed)
    shape, dtype, dev = c["shape"], c["dtype"], settings.device
    inputs, grad_z = make_inputs(shape, dtype, dev, g)
    mu, lv, pmu, plv = inputs

    # Sanity: the fused op's KL is the two-call path's, and z is reparameterize's at the same seed.
    with torch.no_grad():
        gen = torch.Generator(device=dev)
        z, kl = vae_ext.gaussian_latent(mu, lv, pmu, plv, generator=gen.manual_seed(1))
        zr = vae_ext.reparameterize(mu, lv, generator=gen.manual_seed(1))
        check = {"kl_rel_err": measure.rel_err(kl, vae_ext.gaussian_kl(mu, lv, pmu, plv, reduction="none")),
                 "z_equal_reparameterize": bool(torch.equal(z, zr))}
    del z, kl, zr

    fns = {"fused": _step(_fused, inputs, grad_z), "two_call": _step(_two_call, inputs, grad_z),
           "eager": _step(_ref, inputs, grad_z),
           "compile": _step(measure.compile_fn(_ref, settings), inputs, grad_z)}

    if settings.glibc_child:  # glibc_process.py: the timings alone
        return measure.child_times(fns, settings, case_label(c), {b: ("fused", b) for b in BASELINES})

    def reset():
        for t in inputs:
            t.grad = None

    nbytes = fused_bytes(shape, mu.element_size())
    m = measure.measure_impls(settings, case_label(c), fns, reset=reset, floor_bytes=nbytes, generator=g)
    times, peak, floor = m["times"], m["peak_mem_bytes"], m["times"].get("floor")
    rec = {"dtype": dtype_name(dtype), "shape": list(shape), "N": shape[0], "elements": math.prod(shape),
           "bytes_fused": nbytes, "times": times, "first_call_s": m["first_call_s"],
           "other_cpu_load": m["other_cpu_load"],
           "speedup": {b: measure.ratio(times.get(b), times["fused"]) for b in BASELINES},
           "pct_floor": {k: 100.0 * measure.ratio(floor, times[k]) for k in IMPLS} if floor else {},
           "GBps": {k: nbytes / (times[k]["median_ms"] * 1e-3) / 1e9 for k in (*IMPLS, "floor")},
           "peak_mem_bytes": peak, "check": check}
    if peak:
        rec["mem_fused_le"] = {b: peak["fused"] <= peak[b] for b in BASELINES}
    measure.add_fresh_process(rec, settings)
    return rec


def run(settings: Settings, progress=None) -> dict:
    return measure.run_benchmark(settings, progress, sys.modules[__name__], bytes_formula=BYTES_FORMULA,
                                 call="z, kl = op(mu, logvar, prior_mu, prior_logvar); "
                                      "torch.autograd.backward((z, kl), (grad_z, ones))")
