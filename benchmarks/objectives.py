"""The objectives beyond the textbook VAE, forward + backward: the fused op vs the eager reference vs
``torch.compile`` of it vs the copy floor.

Four kinds of case (``case`` in the JSON):

- ``kl_prior``: ``gaussian_kl(mu, logvar, prior_mu, prior_logvar)`` with a learned per-sample prior
  (a conditional or hierarchical VAE's prior network output, mu's shape), conv-shaped latents
  (N, C, H, W); gradients to all four. Inputs: ``mu``, ``prior_mu`` = randn, ``logvar``,
  ``prior_logvar`` = 0.5 * randn.
- ``l1``: ``elbo_loss(recon="l1")`` (a latent-diffusion autoencoder's pixel loss).
- ``gaussian``: ``elbo_loss(recon="gaussian", recon_logvar=<0-d>)``, one learned log-variance.
- ``gaussian_pixel``: ``elbo_loss(recon="gaussian", recon_logvar=<recon's shape>)``, one per pixel.

The ELBO cases take (N x D, L) latents and a standard-normal prior as the ``loss`` benchmark does;
``recon`` = randn, ``x`` MNIST-like, ``mu`` = randn, ``logvar`` = 0.5 * randn, ``recon_logvar`` =
0.5 * randn; every input but ``x`` requires grad. One call = the op (``reduction="sum"``) then
``.backward()``.

The floor is a copy of the bytes any forward + backward must move (:func:`fused_bytes`): the KL reads
four tensors of mu's size and writes their four gradients; an ELBO case reads ``recon`` and ``x``
and writes the gradient of ``recon`` (3 N x D), reads ``mu`` and ``logvar`` and writes their
gradients (4 N x L), and ``recon_logvar`` adds its read and its gradient's write (2 elements for a
scalar, 2 N x D per pixel). As in ``loss``, the backward's scaling pass by ``grad_output`` is not
counted: it is exactly 1 for ``loss.backward()`` and can be skipped.
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
from inputs import leaf, mnist_like, randn
from settings import Settings, dtype_name

NAME = "objectives"
TITLE = "Learned-prior KL and ELBO objectives, forward + backward"
IMPLS, BASELINES = measure.OP_IMPLS, measure.OP_BASELINES

# A size is a KL latent shape (N, ...) or an ELBO size (N, D, L); each ELBO size runs every ELBO case.
KL_SIZES: List[Tuple[int, ...]] = [(256, 4, 32, 32), (64, 16, 64, 64)]
ELBO_SIZES: List[Tuple[int, int, int]] = [(1024, 784, 32), (256, 12288, 128)]
# On a GPU the largest ELBO size above is 3M elements, a floor of ~13 us: two kernel launches cost a
# good part of that, so a CUDA run adds the loss benchmark's largest size (16M elements).
CUDA_ELBO_SIZES: List[Tuple[int, int, int]] = [(4096, 4096, 256)]
QUICK_KL_SIZES: List[Tuple[int, ...]] = [(64, 4, 16, 16)]
QUICK_ELBO_SIZES: List[Tuple[int, int, int]] = [(128, 784, 20)]

ELBO_CASES = ("l1", "gaussian", "gaussian_pixel")
# case: (the fused op's name, recon mode, recon_logvar kind)
CASES = {
    "kl_prior": ("gaussian_kl", None, None),
    "l1": ("elbo_loss", "l1", None),
    "gaussian": ("elbo_loss", "gaussian", "scalar"),
    "gaussian_pixel": ("elbo_loss", "gaussian", "per_pixel"),
}
BYTES_FORMULA = {
    "kl_prior": "8 * numel(mu) * element_size",
    "l1": "(3*N*D + 4*N*L) * element_size",
    "gaussian": "(3*N*D + 4*N*L + 2) * element_size",
    "gaussian_pixel": "(5*N*D + 4*N*L) * element_size",
}


def parse_size(text: str) -> Tuple[str, tuple]:
    """``"NxD:L"`` (an ELBO size, e.g. ``1024x784:32``) or ``"NxCx..."`` without ``:L`` (a KL latent
    shape, e.g. ``256x4x32x32``; at least N and one more dimension). Returns ``("elbo", (N, D, L))``
    or ``("kl", shape)``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*:\s*(\d+)\s*", text)
    if m:
        return "elbo", tuple(int(v) for v in m.groups())
    dims = re.split(r"\s*[xX*]\s*", text.strip())
    if len(dims) >= 2 and all(d.isdigit() for d in dims):
        return "kl", tuple(int(d) for d in dims)
    raise ValueError(f"objectives size: expected NxD:L (an ELBO size, e.g. 1024x784:32) or a latent shape "
                     f"NxCx... (a KL size, e.g. 256x4x32x32), got {text!r}")


def fused_bytes(case: str, shape: tuple, element_size: int) -> int:
    """The bytes any forward + backward of ``case`` must read and write; ``shape`` is mu's shape for
    ``kl_prior``, (N, D, L) for the ELBO cases."""
    if case == "kl_prior":
        return 8 * math.prod(shape) * element_size
    n, d, lat = shape
    extra = {"l1": 0, "gaussian": 2, "gaussian_pixel": 2 * n * d}[case]
    return (3 * n * d + 4 * n * lat + extra) * element_size


def _kl(ops):
    def f(mu, lv, pmu, plv):
        return ops.gaussian_kl(mu, lv, pmu, plv)

    return f


def _elbo(ops, mode):
    if mode == "gaussian":
        def f(r, x, mu, lv, rlv):
            return ops.elbo_loss(r, x, mu, lv, recon="gaussian", recon_logvar=rlv)
    else:
        def f(r, x, mu, lv):
            return ops.elbo_loss(r, x, mu, lv, recon=mode)
    return f


def _fns(case: str):
    """(fused, reference) functions of a case."""
    op, mode, _ = CASES[case]
    if op == "gaussian_kl":
        return _kl(vae_ext), _kl(reference)
    return _elbo(vae_ext, mode), _elbo(reference, mode)


def cases(settings: Settings) -> list:
    given = settings.sizes.get(NAME)
    if given:
        kl_sizes = [s for kind, s in given if kind == "kl"]
        elbo_sizes = [s for kind, s in given if kind == "elbo"]
    elif settings.quick:
        kl_sizes, elbo_sizes = QUICK_KL_SIZES, QUICK_ELBO_SIZES
    else:
        kl_sizes, elbo_sizes = KL_SIZES, ELBO_SIZES + (CUDA_ELBO_SIZES if settings.is_cuda else [])
    dtypes = list(settings.dtypes)
    if settings.is_cuda and torch.bfloat16 not in dtypes and not given and not settings.quick:
        dtypes.append(torch.bfloat16)  # as the loss benchmark: a full CUDA run adds bfloat16
    out = []
    for dtype in dtypes:
        out += [{"case": "kl_prior", "dtype": dtype, "shape": tuple(s)} for s in kl_sizes]
        out += [{"case": case, "dtype": dtype, "shape": tuple(s)} for case in ELBO_CASES for s in elbo_sizes]
    return out


def size_label(case: str, shape) -> str:
    return "x".join(map(str, shape)) if case == "kl_prior" else f"{shape[0]}x{shape[1]}:{shape[2]}"


def case_label(c: dict) -> str:
    return f"{c['case']} {dtype_name(c['dtype'])} {size_label(c['case'], c['shape'])}"


def make_inputs(c: dict, settings: Settings):
    """(inputs, the leaves among them, generator) of a case."""
    g = torch.Generator().manual_seed(settings.seed)
    dtype, dev = c["dtype"], settings.device
    if c["case"] == "kl_prior":
        shape = c["shape"]
        mu = leaf(randn(shape, device=dev, dtype=dtype, generator=g))
        lv = leaf(randn(shape, device=dev, dtype=dtype, generator=g, scale=0.5))
        pmu = leaf(randn(shape, device=dev, dtype=dtype, generator=g))
        plv = leaf(randn(shape, device=dev, dtype=dtype, generator=g, scale=0.5))
        inputs = (mu, lv, pmu, plv)
        return inputs, inputs, g
    n, d, lat = c["shape"]
    recon = leaf(randn((n, d), device=dev, dtype=dtype, generator=g))
    x = mnist_like((n, d), device=dev, dtype=dtype, generator=g)
    mu = leaf(randn((n, lat), device=dev, dtype=dtype, generator=g))
    lv = leaf(randn((n, lat), device=dev, dtype=dtype, generator=g, scale=0.5))
    inputs = (recon, x, mu, lv)
    rlv_kind = CASES[c["case"]][2]
    if rlv_kind is not None:
        rlv = leaf(randn(() if rlv_kind == "scalar" else (n, d), device=dev, dtype=dtype, generator=g, scale=0.5))
        inputs += (rlv,)
    return inputs, tuple(t for t in inputs if t is not x), g


def run_case(c: dict, settings: Settings) -> dict:
    case, shape = c["case"], c["shape"]
    inputs, leaves, g = make_inputs(c, settings)
    fused_fn, ref_fn = _fns(case)

    check = measure.agreement(fused_fn, ref_fn, inputs, leaves)

    op, mode, rlv = CASES[case]
    fields = {"case": case, "op": op, "recon": mode, "recon_logvar": rlv, "dtype": dtype_name(c["dtype"]),
              "shape": list(shape), "N": shape[0]}
    if case == "kl_prior":
        fields.update({"L": math.prod(shape[1:]), "elements": math.prod(shape)})
    else:
        fields.update({"D": shape[1], "L": shape[2], "elements": shape[0] * shape[1]})
    return measure.op_case(settings, case_label(c), fused_fn, ref_fn, inputs, leaves, generator=g, fields=fields,
                           nbytes=fused_bytes(case, shape, inputs[0].element_size()), check=check)


def run(settings: Settings, progress=None) -> dict:
    return measure.run_benchmark(
        settings, progress, sys.modules[__name__], bytes_formula=dict(BYTES_FORMULA),
        call={"kl_prior": "kl = op(mu, logvar, prior_mu, prior_logvar); kl.backward()",
              "l1": "loss = op(recon, x, mu, logvar, recon='l1'); loss.backward()",
              "gaussian": "loss = op(recon, x, mu, logvar, recon='gaussian', recon_logvar=<0-d>); loss.backward()",
              "gaussian_pixel": "loss = op(recon, x, mu, logvar, recon='gaussian', "
                                "recon_logvar=<recon's shape>); loss.backward()"})
