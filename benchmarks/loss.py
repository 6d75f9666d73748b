"""ELBO loss, forward + backward: fused ``vae_ext.elbo_loss`` vs the eager reference vs ``torch.compile`` of it.

Per case: recon mode, dtype, (N x D, L). Inputs: ``recon`` = sigmoid(randn) probabilities for ``bce``
(randn logits for ``bce_logits``), ``x`` MNIST-like in [0, 1], ``mu`` = randn, ``logvar`` = 0.5 * randn;
``recon``, ``mu``, ``logvar`` require grad. One call = the loss (``reduction="sum"``) then ``.backward()``.

The floor is a copy of the bytes any forward + backward must move: read ``recon`` and ``x``, write the
gradient of ``recon``; read ``mu`` and ``logvar``, write their two gradients. (A backward that scales
the forward's gradient buffer by ``grad_output`` reads and writes it once more, 2*N*D; for
``loss.backward()`` on the summed loss ``grad_output`` is exactly 1 and the pass can be skipped, so
it is not part of the floor.)
"""
from __future__ import annotations

import re
import sys
from typing import List, Tuple

import torch

import vae_ext
from vae_ext import reference

import measure
from inputs import leaf, mnist_like, randn
from settings import Settings, dtype_name

NAME = "loss"
TITLE = "ELBO loss, forward + backward"
IMPLS, BASELINES = measure.OP_IMPLS, measure.OP_BASELINES

# (N, D, L)
SIZES: List[Tuple[int, int, int]] = [(128, 784, 20), (1024, 784, 32), (256, 12288, 128), (4096, 4096, 256)]
QUICK_SIZES: List[Tuple[int, int, int]] = [(128, 784, 20), (1024, 784, 32)]

BYTES_FORMULA = "(3*N*D + 4*N*L) * element_size"


def parse_size(text: str) -> Tuple[int, int, int]:
    """``"NxD:L"`` (e.g. ``128x784:20``)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"loss size: expected NxD:L (e.g. 128x784:20), got {text!r}")
    return tuple(int(v) for v in m.groups())  # type: ignore[return-value]


def fused_bytes(n: int, d: int, lat: int, element_size: int) -> int:
    return (3 * n * d + 4 * n * lat) * element_size


def _ref(mode):
    def f(r, x, mu, lv):
        return reference.elbo_loss(r, x, mu, lv, recon=mode)

    return f


def _fused(mode):
    def f(r, x, mu, lv):
        return vae_ext.elbo_loss(r, x, mu, lv, recon=mode)

    return f


def cases(settings: Settings) -> list:
    sizes = settings.sizes.get(NAME) or (QUICK_SIZES if settings.quick else SIZES)
    dtypes = list(settings.dtypes)
    if settings.is_cuda and torch.bfloat16 not in dtypes and NAME not in settings.sizes and not settings.quick:
        dtypes.append(torch.bfloat16)
    out = []
    for dtype in dtypes:
        for mode in settings.recon_modes:
            for n, d, lat in sizes:
                out.append({"recon": mode, "dtype": dtype, "N": n, "D": d, "L": lat})
    return out


def case_label(c: dict) -> str:
    return f"{c['recon']} {dtype_name(c['dtype'])} {c['N']}x{c['D']}:{c['L']}"


def make_inputs(c: dict, settings: Settings):
    g = torch.Generator().manual_seed(settings.seed)
    n, d, lat, dtype, dev = c["N"], c["D"], c["L"], c["dtype"], settings.device
    if c["recon"] == "bce":
        recon = torch.sigmoid(torch.randn(n, d, generator=g)).to(device=dev, dtype=dtype)
    else:  # logits (bce_logits) or values (mse)
        recon = randn((n, d), device=dev, dtype=dtype, generator=g)
    x = mnist_like((n, d), device=dev, dtype=dtype, generator=g)
    mu = randn((n, lat), device=dev, dtype=dtype, generator=g)
    logvar = randn((n, lat), device=dev, dtype=dtype, generator=g, scale=0.5)
    return leaf(recon), x, leaf(mu), leaf(logvar), g


def run_case(c: dict, settings: Settings) -> dict:
    recon, x, mu, logvar, g = make_inputs(c, settings)
    inputs, leaves = (recon, x, mu, logvar), (recon, mu, logvar)
    fused_fn, ref_fn = _fused(c["recon"]), _ref(c["recon"])

    check = measure.agreement(fused_fn, ref_fn, inputs, leaves)

    fields = {"recon": c["recon"], "dtype": dtype_name(c["dtype"]), "N": c["N"], "D": c["D"],
              "L": c["L"], "elements": c["N"] * c["D"]}
    return measure.op_case(settings, case_label(c), fused_fn, ref_fn, inputs, leaves, generator=g, fields=fields,
                           nbytes=fused_bytes(c["N"], c["D"], c["L"], recon.element_size()), check=check)


def run(settings: Settings, progress=None) -> dict:
    return measure.run_benchmark(
        settings, progress, sys.modules[__name__], bytes_formula=BYTES_FORMULA,
        call="loss = op(recon, x, mu, logvar, recon=mode, reduction='sum'); loss.backward()")
