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

from . import common

NAME = "loss"
TITLE = "ELBO loss, forward + backward"
IMPLS = ("fused", "eager", "compile")
BASELINES = ("eager", "compile")

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


def _ref_bce(r, x, mu, lv):
    return reference.elbo_loss(r, x, mu, lv, recon="bce")


def _ref_bce_logits(r, x, mu, lv):
    return reference.elbo_loss(r, x, mu, lv, recon="bce_logits")


def _ref_mse(r, x, mu, lv):
    return reference.elbo_loss(r, x, mu, lv, recon="mse")


_REF = {"bce": _ref_bce, "bce_logits": _ref_bce_logits, "mse": _ref_mse}


def _fused(mode):
    def f(r, x, mu, lv):
        return vae_ext.elbo_loss(r, x, mu, lv, recon=mode)

    return f


def cases(ctx: common.Context) -> list:
    sizes = ctx.sizes.get(NAME) or (QUICK_SIZES if ctx.quick else SIZES)
    dtypes = list(ctx.dtypes)
    if ctx.is_cuda and torch.bfloat16 not in dtypes and NAME not in ctx.sizes and not ctx.quick:
        dtypes.append(torch.bfloat16)
    out = []
    for dtype in dtypes:
        for mode in ctx.recon_modes:
            for n, d, lat in sizes:
                out.append({"recon": mode, "dtype": dtype, "N": n, "D": d, "L": lat})
    return out


def case_label(c: dict) -> str:
    return f"{c['recon']} {common.dtype_name(c['dtype'])} {c['N']}x{c['D']}:{c['L']}"


def make_inputs(c: dict, ctx: common.Context):
    g = torch.Generator().manual_seed(ctx.seed)
    n, d, lat, dtype, dev = c["N"], c["D"], c["L"], c["dtype"], ctx.device
    if c["recon"] == "bce":
        recon = torch.sigmoid(torch.randn(n, d, generator=g)).to(device=dev, dtype=dtype)
    else:  # logits (bce_logits) or values (mse)
        recon = common.randn((n, d), device=dev, dtype=dtype, generator=g)
    x = common.mnist_like((n, d), device=dev, dtype=dtype, generator=g)
    mu = common.randn((n, lat), device=dev, dtype=dtype, generator=g)
    logvar = common.randn((n, lat), device=dev, dtype=dtype, generator=g, scale=0.5)
    return common.leaf(recon), x, common.leaf(mu), common.leaf(logvar), g


def run_case(c: dict, ctx: common.Context) -> dict:
    common.reset_compiled()
    recon, x, mu, logvar, g = make_inputs(c, ctx)
    inputs, leaves = (recon, x, mu, logvar), (recon, mu, logvar)
    fused_fn, ref_fn = _fused(c["recon"]), _REF[c["recon"]]
    fns = {
        "fused": common.backward_step(fused_fn, inputs, leaves),
        "eager": common.backward_step(ref_fn, inputs, leaves),
        "compile": common.backward_step(common.compile_fn(ref_fn, ctx), inputs, leaves),
    }

    # Sanity: the fused op computes what the reference computes (value and gradients).
    lf = fused_fn(*inputs)
    gf = torch.autograd.grad(lf, leaves)
    lr = ref_fn(*inputs)
    gr = torch.autograd.grad(lr, leaves)
    check = {
        "loss_rel_err": common.rel_err(lf, lr),
        "grad_rel_err": max(common.rel_err(a, b) for a, b in zip(gf, gr)),
    }
    del lf, gf, lr, gr

    def reset():
        for t in leaves:
            t.grad = None

    nbytes = fused_bytes(c["N"], c["D"], c["L"], recon.element_size())
    m = common.measure_impls(ctx, case_label(c), fns, reset=reset, floor_bytes=nbytes, generator=g)
    return _record(c, nbytes, m, check)


def _record(c: dict, nbytes: int, m: dict, check: dict) -> dict:
    times, peak = m["times"], m["peak_mem_bytes"]
    floor = times.get("floor")
    fields = {"recon": c["recon"], "dtype": common.dtype_name(c["dtype"]), "N": c["N"], "D": c["D"],
              "L": c["L"], "elements": c["N"] * c["D"]}
    return common.op_record(fields, times=times, measured=m, floor=floor, nbytes=nbytes, peak=peak,
                            check=check, impls=IMPLS, baselines=BASELINES)


def run(ctx: common.Context, progress=None) -> dict:
    return common.run_benchmark(
        ctx, progress, sys.modules[__name__], bytes_formula=BYTES_FORMULA,
        call="loss = op(recon, x, mu, logvar, recon=mode, reduction='sum'); loss.backward()")
