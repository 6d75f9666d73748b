"""Reparameterization, forward + backward: fused ``vae_ext.reparameterize`` vs eager reference vs compiled.

Per case (N, L): ``mu`` = randn, ``logvar`` = 0.5 * randn - 1, both requiring grad; one call =
``z = op(mu, logvar)`` then ``z.backward(grad_z)`` with a fixed random ``grad_z``.

The floor is a copy of the bytes any forward + backward must move: the forward reads ``mu`` and
``logvar`` and writes ``z``; the backward reads ``grad_z`` and ``logvar`` and writes the gradient of
``logvar`` (``eps`` recomputed from the Philox stream, never stored); the gradient of ``mu`` is
``grad_z`` itself and need not be copied: 6 tensors of N x L.
"""
from __future__ import annotations

import re
import sys
from typing import List, Tuple

import torch

import vae_ext
from vae_ext import reference

import measure
from inputs import leaf, randn
from settings import Settings, dtype_name

NAME = "reparam"
TITLE = "Reparameterize, forward + backward"
IMPLS, BASELINES = measure.OP_IMPLS, measure.OP_BASELINES

SIZES: List[Tuple[int, int]] = [(128, 20), (1024, 64), (4096, 256), (16384, 1024)]
QUICK_SIZES: List[Tuple[int, int]] = [(128, 20), (1024, 64)]

BYTES_FORMULA = "6 * N * L * element_size"


def parse_size(text: str) -> Tuple[int, int]:
    """``"NxL"`` (e.g. ``1024x64``)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"reparam size: expected NxL (e.g. 1024x64), got {text!r}")
    return tuple(int(v) for v in m.groups())  # type: ignore[return-value]


def fused_bytes(n: int, lat: int, element_size: int) -> int:
    return 6 * n * lat * element_size


def _ref(mu, logvar):
    return reference.reparameterize(mu, logvar)


def _fused(mu, logvar):
    return vae_ext.reparameterize(mu, logvar)


def cases(settings: Settings) -> list:
    sizes = settings.sizes.get(NAME) or (QUICK_SIZES if settings.quick else SIZES)
    return [{"dtype": dtype, "N": n, "L": lat} for dtype in settings.dtypes for n, lat in sizes]


def case_label(c: dict) -> str:
    return f"{dtype_name(c['dtype'])} {c['N']}x{c['L']}"


def run_case(c: dict, settings: Settings) -> dict:
    g = torch.Generator().manual_seed(settings.seed)
    n, lat, dtype, dev = c["N"], c["L"], c["dtype"], settings.device
    mu = leaf(randn((n, lat), device=dev, dtype=dtype, generator=g))
    logvar = leaf(randn((n, lat), device=dev, dtype=dtype, generator=g, scale=0.5, shift=-1.0))
    grad_z = randn((n, lat), device=dev, dtype=dtype, generator=g)

    # Sanity: d/dmu = grad_z and d/dlogvar = 0.5 * grad_z * (z - mu) for the z the fused op drew.
    z = _fused(mu, logvar)
    gmu, glv = torch.autograd.grad(z, (mu, logvar), grad_z)
    with torch.no_grad():
        zf, muf, gzf = z.float(), mu.float(), grad_z.float()
        eps = (zf - muf) * torch.exp(-0.5 * logvar.float())
        check = {
            "grad_mu_rel_err": measure.rel_err(gmu, grad_z),
            "grad_logvar_rel_err": measure.rel_err(glv.float(), 0.5 * gzf * (zf - muf)),
            "eps_mean": eps.mean().item(),
            "eps_std": eps.std().item(),
        }
    del z, gmu, glv, eps

    fields = {"dtype": dtype_name(dtype), "N": n, "L": lat, "elements": n * lat}
    return measure.op_case(settings, case_label(c), _fused, _ref, (mu, logvar), (mu, logvar), grad=grad_z,
                           nbytes=fused_bytes(n, lat, mu.element_size()), generator=g, fields=fields, check=check)


def run(settings: Settings, progress=None) -> dict:
    return measure.run_benchmark(settings, progress, sys.modules[__name__], bytes_formula=BYTES_FORMULA,
                                call="z = op(mu, logvar); z.backward(grad_z)")
