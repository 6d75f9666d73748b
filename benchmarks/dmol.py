"""Discretized mixture of logistics NLL, forward + backward: fused ``vae_ext.dmol_nll`` vs the eager
reference vs ``torch.compile`` of it vs the copy floor.

Per case: x (N, C, *S), M components, ``params`` (N, P, *S) with P = 10 M (RGB) or 3 M (one channel),
channels-first and contiguous (NVAE's layout). Inputs as a decoder early in training gives them:
logits ~ N(0, 1), means ~ N(0, 0.25), log-scales uniform in [-5, -1], coefficients ~ N(0, 0.25);
``x`` on the ``num_bits`` grid scaled to [-1, 1] (8-bit images, 16-bit audio), uniform over the
levels, with 5 % of it on each edge. Only ``params`` requires grad. One call = the loss
(``reduction="sum"``) then ``.backward()``.

The floor is a copy of the bytes any forward + backward must move: read ``params`` and ``x``, write
the gradient of ``params``. Where this build has no ``vae_ext.dmol_nll`` the baselines and the floor
are timed alone (the record says ``fused_available: false``).
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
from inputs import leaf
from settings import Settings, dtype_name

NAME = "dmol"
TITLE = "Discretized mixture of logistics NLL, forward + backward"
IMPLS, BASELINES = measure.OP_IMPLS, measure.OP_BASELINES

# (x's shape, M): CIFAR-10 as VDVAE trains it, 64x64 RGB, MNIST grayscale, one second of 16 kHz audio
SIZES: List[Tuple[Tuple[int, ...], int]] = [((16, 3, 32, 32), 10), ((4, 3, 64, 64), 10), ((64, 1, 28, 28), 5),
                                            ((8, 1, 16000), 10)]
QUICK_SIZES: List[Tuple[Tuple[int, ...], int]] = [((4, 3, 16, 16), 10), ((2, 1, 2000), 10)]

BYTES_FORMULA = "(2 * numel(params) + numel(x)) * element_size"


def parse_size(text: str) -> Tuple[Tuple[int, ...], int]:
    """``"NxCx...:M"``, x's shape and the number of components (e.g. ``16x3x32x32:10``, ``8x1x16000:10``)."""
    m = re.fullmatch(r"\s*(\d+(?:\s*[xX*]\s*\d+)+)\s*:\s*(\d+)\s*", text)
    dims = tuple(int(d) for d in re.split(r"\s*[xX*]\s*", m.group(1))) if m else ()
    if not m or dims[1] not in (1, 3) or int(m.group(2)) < 1:
        raise ValueError(f"dmol size: expected NxCx...:M with C = 1 or 3 and M >= 1 (e.g. 16x3x32x32:10), got {text!r}")
    return dims, int(m.group(2))


def num_params(c: int, m: int) -> int:
    return (10 if c == 3 else 3) * m


def num_bits(shape: Tuple[int, ...]) -> int:
    """16 for one-channel 1-D data (audio), else 8."""
    return 16 if shape[1] == 1 and len(shape) == 3 else 8


def fused_bytes(shape: Tuple[int, ...], m: int, element_size: int) -> int:
    pixels = shape[0] * math.prod(shape[2:])
    return (2 * num_params(shape[1], m) + shape[1]) * pixels * element_size


def _fns(bits: int):
    def ref(params, x):
        return reference.dmol_nll(params, x, num_bits=bits)

    if not hasattr(vae_ext, "dmol_nll"):
        return None, ref

    def fused(params, x):
        return vae_ext.dmol_nll(params, x, num_bits=bits)

    return fused, ref


def cases(settings: Settings) -> list:
    sizes = settings.sizes.get(NAME) or (QUICK_SIZES if settings.quick else SIZES)
    return [{"dtype": dtype, "shape": tuple(shape), "M": m} for dtype in settings.dtypes for shape, m in sizes]


def size_label(shape, m) -> str:
    return f"{'x'.join(map(str, shape))}, M={m}"


def case_label(c: dict) -> str:
    return f"{dtype_name(c['dtype'])} {size_label(c['shape'], c['M'])}"


def make_inputs(c: dict, settings: Settings):
    """(params, x, generator) of a case."""
    g = torch.Generator().manual_seed(settings.seed)
    shape, m, dtype, dev = c["shape"], c["M"], c["dtype"], settings.device
    n, ch, spatial = shape[0], shape[1], shape[2:]
    logits = torch.randn((n, m, *spatial), generator=g)
    means = torch.randn((n, ch, m, *spatial), generator=g) * 0.5
    log_scales = torch.rand((n, ch, m, *spatial), generator=g) * 4.0 - 5.0
    blocks = [means, log_scales]
    if ch == 3:
        blocks.append(torch.randn((n, ch, m, *spatial), generator=g) * 0.5)
    rest = torch.stack(blocks, dim=2).reshape(n, len(blocks) * ch * m, *spatial)
    params = torch.cat([logits, rest], dim=1).to(device=dev, dtype=dtype)
    levels = 2 ** num_bits(shape) - 1
    k = torch.randint(0, levels + 1, shape, generator=g)
    r = torch.rand(shape, generator=g)
    k = torch.where(r < 0.05, torch.zeros_like(k), torch.where(r > 0.95, torch.full_like(k, levels), k))
    x = (k.double() * (2.0 / levels) - 1.0).to(device=dev, dtype=dtype)
    return leaf(params), x, g


def run_case(c: dict, settings: Settings) -> dict:
    shape, m = c["shape"], c["M"]
    params, x, g = make_inputs(c, settings)
    bits = num_bits(shape)
    fused_fn, ref_fn = _fns(bits)
    check = measure.agreement(fused_fn, ref_fn, (params, x), (params,)) if fused_fn is not None else {}

    fields = {"dtype": dtype_name(c["dtype"]), "shape": list(shape), "M": m, "num_bits": bits,
              "N": shape[0], "C": shape[1], "P": num_params(shape[1], m),
              "pixels": shape[0] * math.prod(shape[2:]), "elements": params.numel(),
              "fused_available": fused_fn is not None}
    return measure.op_case(settings, case_label(c), fused_fn, ref_fn, (params, x), (params,), generator=g,
                           fields=fields, nbytes=fused_bytes(shape, m, params.element_size()), check=check)


def run(settings: Settings, progress=None) -> dict:
    return measure.run_benchmark(
        settings, progress, sys.modules[__name__], bytes_formula=BYTES_FORMULA,
        call="loss = op(params, x, num_bits=num_bits, reduction='sum'); loss.backward()")
