"""Shared helpers for the vae_ext tests: devices, per-dtype tolerances, input makers, comparisons.

Test modules import them with ``from helpers import ...``, or ``import helpers as h`` where they use
many (``tests/`` has no ``__init__.py``, so pytest puts it on ``sys.path``; conftest.py holds only
pytest's own hooks).
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import vae_ext
from vae_ext import reference

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPES = (F32, F64, F16, BF16)
HALF = (F16, BF16)
RECON_MODES = ("bce", "bce_logits", "mse")
REDUCTIONS = ("sum", "mean", "none")


CUDA_OK = torch.cuda.is_available() and bool(vae_ext.build_info()["cuda_kernels"])
requires_cuda = pytest.mark.skipif(
    not CUDA_OK, reason="needs a CUDA device and vae_ext built with CUDA kernels"
)


def skip_unless_cuda_free(nbytes: int) -> None:
    """Skip a CUDA test that needs nbytes of free device memory (the >2^31-element tests)."""
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes:
        pytest.skip(f"needs {nbytes / 2**30:.0f} GiB of free CUDA memory, {free / 2**30:.0f} GiB free")


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, requires_cuda]),
]


def dtype_id(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------- tolerances
@dataclass(frozen=True)
class Tol:
    loss: float  # relative tolerance of the loss (and terms); they are sums of non-negative values
    grad: float  # relative tolerance of each gradient element
    grad_atol_rel: float  # absolute tolerance of a gradient, as a fraction of max |reference gradient|


# The fused op computes half types in float32 (loss returned in float32) and rounds gradients to the
# half type (plus one more rounding when autograd scales them by grad_output): a few half ulps.
TOLS = {
    F64: Tol(loss=1e-10, grad=1e-10, grad_atol_rel=1e-12),
    F32: Tol(loss=1e-5, grad=1e-5, grad_atol_rel=1e-6),
    F16: Tol(loss=1e-5, grad=2e-3, grad_atol_rel=2e-4),
    BF16: Tol(loss=1e-5, grad=1.6e-2, grad_atol_rel=2e-3),
}


def out_dtype(dt: torch.dtype) -> torch.dtype:
    return F32 if dt in HALF else dt


def ulp_errors(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|got - ref| in units of the float32 spacing at ref (got: float32 results, ref: float64)."""
    r32 = ref.to(F32).abs()
    ulp = (torch.nextafter(r32, torch.full_like(r32, float("inf"))) - r32).double()
    return (got.double() - ref).abs() / ulp


def float32_math_ulps() -> dict:
    """The worst errors, in float32 ulps, of the CPU kernels' float log, log1p and exp, read through
    the ops on the CPU variant this process runs. "bce" with one element per sample: target 1 gives
    -log p exactly, target 0 gives -log1p(-p); reparameterize with mu = 0 gives exp(logvar / 2) * eps
    with one rounding of the product. p spans [1e-43, 1) (no clamp at -100), logvar / 2 [-80, 80]."""
    g = torch.Generator().manual_seed(7)
    p = torch.cat([10 ** (-torch.rand(20000, generator=g, dtype=F64) * 43),
                   1 - torch.rand(2000, generator=g, dtype=F64) * 1e-3,
                   torch.rand(2000, generator=g, dtype=F64)]).to(F32)
    p = p[p < 1].view(-1, 1)
    zeros = torch.zeros(p.shape[0], 1)
    out = {}
    for name, target, ref in (("log", 1.0, -torch.log(p.double())), ("log1p", 0.0, -torch.log1p(-p.double()))):
        _, rec, _ = vae_ext.elbo_loss(p, torch.full_like(p, target), zeros, zeros, recon="bce", reduction="none",
                                      return_terms=True)
        out[name] = ulp_errors(rec, ref.view(-1)).max().item()
    h = torch.cat([torch.linspace(-80, 80, 20001), torch.randn(4000, generator=g) * 3]).to(F32)
    z, eps = vae_ext.reparameterize(torch.zeros_like(h), 2 * h, return_eps=True,
                                    generator=torch.Generator().manual_seed(0))
    out["exp"] = ulp_errors(z, torch.exp(h.double()) * eps.double()).max().item()
    return out


# Bounds for float32_math_ulps(): fast_log is at most 2.14 ulp over every 7th float, its log1p adds
# the rounding of its correction, and fast_exp's 0.93 ulp is followed by the product's 0.5.
FLOAT32_MATH_ULP_BOUNDS = {"log": 2.5, "log1p": 3.0, "exp": 2.0}


def assert_close(got, ref, *, rtol, atol=0.0, atol_rel=0.0, what=""):
    """Compare in float64: |got - ref| <= atol + atol_rel * max|ref| + rtol * |ref| (NaN == NaN)."""
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    assert tuple(got.shape) == tuple(ref.shape), f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    g = got.detach().to("cpu", F64)
    r = ref.detach().to("cpu", F64)
    finite = torch.isfinite(r)
    scale = r[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(
        g, r, rtol=rtol, atol=atol + atol_rel * scale, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def arg_re(name: str) -> str:
    """A pytest.raises(match=...) pattern that finds the argument name as a whole word."""
    return rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])"


# --------------------------------------------------------------------------- inputs
def make_elbo_inputs(mode, shape, latent, dtype=F32, device="cpu", seed=0):
    """(recon_x, x, mu, logvar) drawn in float64 then cast, so a half input is exactly its f64 copy."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0]
    if mode == "bce":
        r = torch.rand(shape, generator=g, dtype=F64) * 0.96 + 0.02
        x = torch.rand(shape, generator=g, dtype=F64)
    elif mode == "bce_logits":
        r = torch.randn(shape, generator=g, dtype=F64) * 3.0
        x = torch.rand(shape, generator=g, dtype=F64)
    elif mode == "mse":
        r = torch.randn(shape, generator=g, dtype=F64)
        x = torch.randn(shape, generator=g, dtype=F64)
    else:
        raise ValueError(mode)
    mu = torch.randn(n, latent, generator=g, dtype=F64)
    lv = torch.randn(n, latent, generator=g, dtype=F64) * 0.7
    return tuple(t.to(dtype).to(device) for t in (r, x, mu, lv))


def upstream_for(reduction, n, seed=1, device="cpu"):
    """A grad_output != 1: 3.7 for scalar losses, a random vector (with a negative entry) for 'none'."""
    if reduction == "none":
        g = torch.Generator().manual_seed(seed)
        w = torch.rand(n, generator=g, dtype=F64) * 2.0 + 0.25
        if n > 1:
            w[1] = -w[1]
        return w.to(device)
    return torch.tensor(3.7, dtype=F64, device=device)


def loss_and_grads(fn, recon_x, x, mu, logvar, *, upstream=None, combo=None, requires=(True, True, True), **kw):
    """Run fn(recon_x, x, mu, logvar, **kw) on leaf copies and backward with `upstream`.

    The leaves are ``t.detach()`` (same storage, same strides): a non-contiguous input stays one.
    ``combo`` maps the outputs of fn (return_terms=True) to the tensor whose weighted sum is
    differentiated. Returns (outputs detached, [grad recon_x, grad mu, grad logvar]).
    """
    leaves = []
    for t, req in zip((recon_x, mu, logvar), requires):
        leaf = t.detach()
        if req:
            leaf.requires_grad_(True)
        leaves.append(leaf)
    r, m, lv = leaves
    out = fn(r, x.detach(), m, lv, **kw)
    target = combo(out) if combo is not None else out
    if upstream is None:
        upstream = torch.ones((), dtype=F64)
    if any(requires):
        (target * upstream.to(target.device, target.dtype)).sum().backward()
    outs = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    return outs, [leaf.grad for leaf in leaves]


def f64_copies(*ts):
    """Float64 copies on the CPU (same strides), for the float64 reference."""
    return tuple(t.detach().to("cpu", F64) for t in ts)


@contextlib.contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def rng_state_kept():
    """Leave the default CPU generator as it was (tests that seed it don't leak into others)."""
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


# --------------------------------------------------------------------------- elbo_loss vs the reference
NAMES = ("recon_x", "mu", "logvar")


def check_against_reference(mode, reduction, dtype, recon_x, x, mu, logvar, *, beta=1.0, upstream=None,
                            requires=(True, True, True), what=""):
    """Fused loss and gradients vs the float64 reference on the same values (every gradient checked
    for dtype, shape and value, grad_output `upstream`)."""
    tol = TOLS[dtype]
    kw = dict(recon=mode, reduction=reduction, beta=beta)
    out, grads = loss_and_grads(vae_ext.elbo_loss, recon_x, x, mu, logvar, upstream=upstream,
                                requires=requires, **kw)
    ref_out, ref_grads = loss_and_grads(reference.elbo_loss, *f64_copies(recon_x, x, mu, logvar),
                                        upstream=None if upstream is None else upstream.cpu(),
                                        requires=requires, **kw)
    n = recon_x.shape[0]
    assert out.dtype == out_dtype(dtype), f"{what}: loss dtype {out.dtype}"
    assert out.device == recon_x.device
    assert tuple(out.shape) == ((n,) if reduction == "none" else ()), f"{what}: loss shape {tuple(out.shape)}"
    assert_close(out, ref_out, rtol=tol.loss, what=f"{what} loss")
    for name, g, rg, t in zip(NAMES, grads, ref_grads, (recon_x, mu, logvar)):
        if rg is None:
            assert g is None, f"{what}: unexpected gradient for {name}"
            continue
        assert_grad_like(g, rg, t, tol, f"{what}: grad {name}")
    return out, grads


def assert_grad_like(g, rg, t, tol, what):
    """A gradient g exists, has the dtype and shape of its tensor t and the reference's values rg."""
    assert g is not None, f"{what}: none"
    assert g.dtype == t.dtype and tuple(g.shape) == tuple(t.shape), (
        f"{what} is {g.dtype}{tuple(g.shape)}, expected {t.dtype}{tuple(t.shape)}")
    assert_close(g, rg, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=what)



def _load_benchmarks_timing():
    """benchmarks/timing.py, loaded by path (the harness is not part of the package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "timing.py")
    spec = importlib.util.spec_from_file_location("_vae_ext_benchmarks_timing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The CUDA-graph capture that the benchmarks' --cuda-graph times: the CUDA tests check that the ops
# capture and replay correctly through this very function.
capture_cuda_graph = _load_benchmarks_timing().capture_cuda_graph


# --------------------------------------------------------------------------- the command
def run_cli(capsys, *argv):
    """``vae-ext ARGV`` in this process (vae_ext.cli.main): (exit status, stdout, stderr)."""
    from vae_ext import cli  # the app: needs the cli extra, which the op tests do not

    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def train_one_epoch(out, *argv):
    """``vae-ext train --epochs 1 --out OUT ARGV`` in this process, on one thread (a tiny model:
    more threads only contend on a shared machine); returns out."""
    from vae_ext import cli

    with num_threads(1):
        assert cli.main(["train", "--epochs", "1", "--out", str(out), *argv]) == 0
    return out


def read_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_one_line_error(rc, err, *matches, status=1):
    """The command failed (exit status ``status``; None: any non-zero one) with one line on stderr,
    "vae-ext ...", that holds every match: no traceback."""
    assert rc != 0 and (status is None or rc == status), f"exit status {rc}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vae-ext") and "Traceback" not in err, err
    for m in matches:
        assert m in lines[0], lines[0]


# --------------------------------------------------------------------------- issue 15: priors, l1, gaussian, free bits
# Every tensor elbo_loss may differentiate, in the order the checks report them.
OBJ_GRAD_NAMES = ("recon_x", "mu", "logvar", "prior_mu", "prior_logvar", "recon_logvar")
_OBJ_KW = ("prior_mu", "prior_logvar", "recon_logvar")


def make_objective_inputs(mode, shape, latent_shape, dtype=F32, device="cpu", seed=0, prior_shape=None, rlv=None):
    """A dict of elbo_loss's tensors by name, drawn in float64 then cast (a half input is exactly its
    float64 copy): recon_x and x of ``shape`` for ``mode`` (any of the five), mu and logvar of
    ``latent_shape``, prior_mu and prior_logvar of ``prior_shape`` (None: no prior), recon_logvar
    0-d (``rlv="scalar"``) or recon_x's shape (``rlv="pixel"``), None otherwise. Log-variances stay
    in [-1.3, 0.7], where every gaussian term is positive (no cancellation in the sums)."""
    g = torch.Generator().manual_seed(seed)
    if mode in RECON_MODES:
        r, x = make_elbo_inputs(mode, shape, 1, F64, seed=seed)[:2]
    else:
        r = torch.randn(shape, generator=g, dtype=F64)
        x = torch.randn(shape, generator=g, dtype=F64)
    mu = torch.randn(latent_shape, generator=g, dtype=F64) * 1.2
    lv = torch.randn(latent_shape, generator=g, dtype=F64) * 0.7
    out = dict(recon_x=r, x=x, mu=mu, logvar=lv, prior_mu=None, prior_logvar=None, recon_logvar=None)
    if prior_shape is not None:
        out["prior_mu"] = torch.randn(prior_shape, generator=g, dtype=F64) * 0.8
        out["prior_logvar"] = torch.rand(prior_shape, generator=g, dtype=F64) * 1.6 - 0.9
    if rlv == "scalar":
        out["recon_logvar"] = torch.rand((), generator=g, dtype=F64) * 2 - 1.3
    elif rlv == "pixel":
        out["recon_logvar"] = torch.rand(shape, generator=g, dtype=F64) * 2 - 1.3
    return {k: None if t is None else t.to(dtype).to(device) for k, t in out.items()}


def kl_as_elbo(fn):
    """gaussian_kl (fused or reference) called the way objective_run calls elbo_loss."""
    def call(recon_x, x, mu, logvar, prior_mu=None, prior_logvar=None, **kw):
        return fn(mu, logvar, prior_mu, prior_logvar, **kw)
    return call


def objective_run(fn, inputs, *, upstream=None, combo=None, requires=OBJ_GRAD_NAMES, **kw):
    """fn(recon_x, x, mu, logvar, prior_mu=..., prior_logvar=..., recon_logvar=..., **kw) on leaf
    copies (``t.detach()``: same storage and strides) of ``inputs``; backward of
    sum(combo(outputs) * upstream). Returns (outputs detached, {name: gradient} for every leaf that
    required grad)."""
    leaves = {}
    for name, t in inputs.items():
        if t is None:
            continue
        leaf = t.detach()
        if name in OBJ_GRAD_NAMES and name in requires:
            leaf.requires_grad_(True)
        leaves[name] = leaf
    out = fn(leaves["recon_x"], leaves["x"], leaves["mu"], leaves["logvar"],
             **{k: leaves[k] for k in _OBJ_KW if k in leaves}, **kw)
    target = combo(out) if combo is not None else out
    if upstream is None:
        upstream = torch.ones((), dtype=F64)
    if target.requires_grad:
        (target * upstream.to(target.device, target.dtype)).sum().backward()
    outs = tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
    return outs, {k: leaf.grad for k, leaf in leaves.items() if leaf.requires_grad}


def check_objective(inputs, *, dtype=None, fused=None, ref=None, upstream=None, combo=None,
                    requires=OBJ_GRAD_NAMES, what="", **kw):
    """The fused function (vae_ext.elbo_loss by default) vs the float64 reference on the same values:
    every output (dtype, shape, value) and every gradient (dtype, shape, value), grad_output
    ``upstream``. Returns the fused (outputs, gradients)."""
    dtype = dtype or inputs["mu"].dtype
    fused = fused or vae_ext.elbo_loss
    ref = ref or reference.elbo_loss
    tol = TOLS[dtype]
    out, grads = objective_run(fused, inputs, upstream=upstream, combo=combo, requires=requires, **kw)
    ref_inputs = {k: None if t is None else t.detach().to("cpu", F64) for k, t in inputs.items()}
    ref_out, ref_grads = objective_run(ref, ref_inputs, upstream=None if upstream is None else upstream.cpu(),
                                       combo=combo, requires=requires, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    ref_outs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    assert len(outs) == len(ref_outs), f"{what}: {len(outs)} outputs, expected {len(ref_outs)}"
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        assert a.dtype == out_dtype(dtype), f"{what}: output {i} dtype {a.dtype}"
        assert a.device == inputs["mu"].device, f"{what}: output {i} on {a.device}"
        # atol: a unit's KL near 0 (unit_kl) is a difference of terms near 1, a few ulps of 1 off
        assert_close(a, b, rtol=tol.loss, atol=16 * torch.finfo(a.dtype).eps, what=f"{what} output {i}")
    assert set(grads) == set(ref_grads), f"{what}: gradients for {sorted(grads)}, expected {sorted(ref_grads)}"
    for name in OBJ_GRAD_NAMES:
        if name not in ref_grads:
            continue
        g, rg, t = grads[name], ref_grads[name], inputs[name]
        if rg is None:
            assert g is None or not g.any(), f"{what}: gradient for {name}, which the reference does not use"
            continue
        assert_grad_like(g, rg, t, tol, f"{what}: grad {name}")
    return out, grads


# The tests on real MNIST read its folder from one variable, $MNIST (a folder of MNIST IDX files,
# such as the t10k pair bundled beside the project: MNIST=../shared/data/mnist pytest tests).
MNIST_VAR = "MNIST"


def mnist_dir(*files: str):
    """The folder $MNIST names, holding ``files``. Without $MNIST the test skips, saying what to
    set; a $MNIST without those files fails it (a folder named on purpose is not silently ignored)."""
    folder = os.environ.get(MNIST_VAR)
    if not folder:
        pytest.skip(f"needs real MNIST: set {MNIST_VAR} to a folder holding {', '.join(files)} "
                    f"(e.g. {MNIST_VAR}=../shared/data/mnist; README: Tests)")
    missing = [f for f in files if not (Path(folder) / f).is_file()]
    if missing:
        pytest.fail(f"{MNIST_VAR}={folder}: no {', '.join(missing)} there")
    return Path(folder).resolve()
