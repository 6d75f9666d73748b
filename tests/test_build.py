"""What the extension was built with, and the run-time choice of the CPU kernel variant.

The rest of the suite runs only the variant this machine picks (AVX512 where available); the
subprocess tests here run the whole elbo_loss / reparameterize surface under every variant the CPU
supports (ATEN_CPU_CAPABILITY=default / avx2 / avx512) and compare each with the float64 reference and
with the others. Different vector widths may sum in different orders: tolerances, not bitwise.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vae_ext
from vae_ext import reference

from helpers import BF16, FLOAT32_MATH_ULP_BOUNDS, TOLS, assert_close

CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(vae_ext.__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))  # helpers.py, for the subprocess


def test_build_info_keys_and_values():
    info = vae_ext.build_info()
    assert set(info) >= {"cuda_kernels", "cpu_capability", "torch"}, f"keys {sorted(info)}"
    assert isinstance(info["cuda_kernels"], bool)
    assert info["torch"] == torch.__version__
    assert info["cpu_capability"] == vae_ext.cpu_capability()
    if not torch.version.cuda:
        assert info["cuda_kernels"] is False, "a CPU-only torch cannot have CUDA kernels"


def test_cpu_capability_value():
    cap = vae_ext.cpu_capability()
    assert cap in CAPABILITIES, f"cpu_capability() = {cap!r}"


# --------------------------------------------------------------------------- per-variant subprocesses
_SCRIPT = textwrap.dedent(
    r"""
    import sys, torch, vae_ext
    torch.set_num_threads(1)
    F64 = torch.float64
    out = {"cap": vae_ext.cpu_capability(), "torch_cap": torch.backends.cpu.get_cpu_capability(),
           "info": vae_ext.build_info(), "elbo": {}, "rep": {}}
    g = torch.Generator().manual_seed(0)
    n, d, L = 5, 1031, 37          # odd sizes: vector bodies and tails of every variant
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for mode in ("bce", "bce_logits", "mse"):
            if mode == "bce":
                r = torch.rand(n, d, generator=g, dtype=F64) * 0.96 + 0.02
                x = torch.rand(n, d, generator=g, dtype=F64)
            elif mode == "bce_logits":
                r = torch.randn(n, d, generator=g, dtype=F64) * 3
                x = torch.rand(n, d, generator=g, dtype=F64)
            else:
                r = torch.randn(n, d, generator=g, dtype=F64)
                x = torch.randn(n, d, generator=g, dtype=F64)
            mu = torch.randn(n, L, generator=g, dtype=F64)
            lv = torch.randn(n, L, generator=g, dtype=F64) * 0.7
            r, x, mu, lv = (t.to(dtype) for t in (r, x, mu, lv))
            for reduction in ("sum", "mean", "none"):
                leaves = [t.clone().requires_grad_(True) for t in (r, mu, lv)]
                loss = vae_ext.elbo_loss(leaves[0], x, leaves[1], leaves[2], recon=mode, reduction=reduction,
                                         beta=0.7)
                w = torch.linspace(-1.0, 2.0, n) if reduction == "none" else torch.tensor(3.7)
                (loss * w.to(loss.dtype)).sum().backward()
                out["elbo"][(str(dtype), mode, reduction)] = dict(
                    inputs=(r, x, mu, lv), w=w, loss=loss.detach(), grads=[t.grad for t in leaves])
    # Each variant's log and exp at their edges. "bce": p = 0 and 1, float32 subnormals, the
    # smallest normals, p next to 1. "bce_logits": exp(-|l|) from 1 down to subnormal and 0.
    # Targets 0, 1 and soft; a NaN in row 3 of a second call.
    edges = {"bce": [0.0, 1.0, 1.4e-45, 1e-40, 1.1754942e-38, 1.2e-38, 1e-30, 1e-7, 0.5, 0.75, 1.5 / 2,
                     1 - 2 ** -24, 2 ** -24, 0.3],
             "bce_logits": [0.0, 1e-3, -1e-3, 0.3466, -0.3467, 20.0, -20.0, 87.0, -87.5, 88.8, -88.8, 100.0,
                            -100.0, 103.9, -104.1, 110.0, -110.0, 200.0, -200.0, 1e4, -1e4]}
    targets = torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0, 0.7, 1.0], dtype=F64)
    n, d = 4, 97
    x = targets.repeat(n * d // len(targets) + 1)[: n * d].reshape(n, d)
    out["edges"] = {}
    for mode, vals in edges.items():
        r = torch.tensor(vals, dtype=F64).repeat(n * d // len(vals) + 1)[: n * d].reshape(n, d)
        for dtype in (torch.float32, torch.bfloat16):
            rr, xx = r.to(dtype), x.to(dtype)
            leaf = rr.clone().requires_grad_(True)
            mu0 = torch.zeros(n, 1, dtype=dtype)
            loss = vae_ext.elbo_loss(leaf, xx, mu0, mu0, recon=mode, reduction="none")
            w = torch.linspace(-1.0, 2.0, n)
            (loss * w.to(loss.dtype)).sum().backward()
            rn = rr.clone()
            rn[3, 50] = float("nan")
            nan_loss = vae_ext.elbo_loss(rn, xx, mu0, mu0, recon=mode, reduction="none")
            # float64 copies made here: a parent process whose MXCSR has DAZ set (torch 2.4's
            # inductor loads code built with -ffast-math, which sets it) would read the float32
            # subnormals as 0 when it converts them itself
            out["edges"][(str(dtype), mode)] = dict(inputs=(rr, xx, mu0, mu0), w=w, loss=loss.detach(),
                                                    grads=[leaf.grad], nan_loss=nan_loss,
                                                    inputs64=(rr.double(), xx.double()))
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        torch.manual_seed(123)
        mu = torch.randn(1003).to(dtype)
        lv = torch.randn(1003).to(dtype)
        m, l = mu.clone().requires_grad_(True), lv.clone().requires_grad_(True)
        torch.manual_seed(321)
        z, eps, state = torch.ops.vae_ext.reparameterize(m, l, 3, True, None)
        up = torch.linspace(-1, 1, 3 * 1003).reshape(3, 1003).to(dtype)
        (z * up).sum().backward()
        out["rep"][str(dtype)] = dict(mu=mu, lv=lv, up=up, z=z.detach(), eps=eps, state=state,
                                      grads=[m.grad, l.grad])
    out["philox"] = torch.ops.vae_ext.philox_normal(torch.empty(4099), 987654321, 12)
    from helpers import float32_math_ulps
    out["ulps"] = float32_math_ulps()
    torch.save(out, sys.argv[1])
    """
)


def _run_variant(tmp_path_factory, env_value):
    path = tmp_path_factory.mktemp("cap") / "out.pt"
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if env_value is not None:
        env["ATEN_CPU_CAPABILITY"] = env_value
    # REPO_ROOT: where this process found vae_ext (site-packages in CI); cwd elsewhere, since
    # `python -c` puts the working folder first on sys.path and a checkout's sources would win
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=path.parent)
    assert proc.returncode == 0, f"ATEN_CPU_CAPABILITY={env_value}: subprocess failed\n{proc.stderr[-3000:]}"
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    """Results per ATEN_CPU_CAPABILITY setting (None = unset), for the settings this CPU can run."""
    res = {None: _run_variant(tmp_path_factory, None)}
    native = res[None]["torch_cap"]
    wanted = ["default"]
    if native in ("AVX2", "AVX512"):
        wanted.append("avx2")
    if native == "AVX512":
        wanted.append("avx512")
    for v in wanted:
        res[v] = _run_variant(tmp_path_factory, v)
    return res


@pytest.mark.slow
def test_capability_follows_aten(variants):
    """Unset: the variant ATen itself picks (when it is one of ours); 'default' -> DEFAULT; 'avx2' ->
    AVX2 on a CPU with AVX2; 'avx512' -> AVX512 on a CPU with AVX-512."""
    expected = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
    for env_value, out in variants.items():
        assert out["info"]["cpu_capability"] == out["cap"]
        if env_value is None:
            if out["torch_cap"] in CAPABILITIES:
                assert out["cap"] == out["torch_cap"], f"vae_ext picked {out['cap']}, ATen {out['torch_cap']}"
            assert out["cap"] == vae_ext.cpu_capability()
        else:
            assert out["cap"] == expected[env_value], f"ATEN_CPU_CAPABILITY={env_value}: got {out['cap']!r}"


@pytest.mark.slow
def test_every_variant_matches_reference(variants):
    failures = []
    for out in variants.values():
        for key, rec in out["elbo"].items():
            dtype_s, mode, reduction = key
            dtype = getattr(torch, dtype_s.replace("torch.", ""))
            tol = TOLS[dtype]
            r, x, mu, lv = rec["inputs"]
            leaves = [t.detach().to(torch.float64, copy=True).requires_grad_(True) for t in (r, mu, lv)]
            ref = reference.elbo_loss(leaves[0], x.double(), leaves[1], leaves[2], recon=mode,
                                      reduction=reduction, beta=0.7)
            (ref * rec["w"].double()).sum().backward()
            try:
                assert_close(rec["loss"], ref, rtol=tol.loss, what="loss")
                for name, gt, lf in zip(("recon_x", "mu", "logvar"), rec["grads"], leaves):
                    assert gt.dtype == dtype
                    assert_close(gt, lf.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name}")
            except AssertionError as e:
                failures.append(f"[{out['cap']}] {key}: {str(e)[:400]}")
        for (dtype_s, mode), rec in out["edges"].items():
            dtype = getattr(torch, dtype_s.replace("torch.", ""))
            tol = TOLS[dtype]
            _, _, mu, lv = rec["inputs"]
            r64, x64 = rec["inputs64"]
            leaf = r64.clone().requires_grad_(True)
            ref = reference.elbo_loss(leaf, x64, mu.double(), lv.double(), recon=mode, reduction="none")
            (ref * rec["w"].double()).sum().backward()
            try:
                assert_close(rec["loss"], ref, rtol=tol.loss, what="loss")
                assert_close(rec["grads"][0], leaf.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what="grad recon_x")
                nan_rows = torch.isnan(rec["nan_loss"]).tolist()
                assert nan_rows == [False, False, False, True], f"NaN in row 3 only: got {nan_rows}"
            except AssertionError as e:
                failures.append(f"[{out['cap']}] {mode} edges {dtype_s}: {str(e)[:400]}")
        for dtype_s, rec in out["rep"].items():
            dtype = getattr(torch, dtype_s.replace("torch.", ""))
            tol = TOLS[dtype]
            seed, offset = (int(v) for v in rec["state"])
            eps32 = torch.ops.vae_ext.philox_normal(rec["eps"], seed, offset)  # this process's own variant
            try:
                assert_close(rec["eps"], eps32.to(dtype), rtol=1e-5 if dtype != BF16 else 8e-3, atol=1e-6,
                             what="eps vs this process's philox_normal")
                m, l = (t.detach().to(torch.float64, copy=True).requires_grad_(True) for t in (rec["mu"], rec["lv"]))
                zr = reference.reparameterize_with_eps(m, l, rec["eps"].double())
                (zr * rec["up"].double()).sum().backward()
                assert_close(rec["z"], zr, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what="z")
                assert_close(rec["grads"][0], m.grad, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what="grad mu")
                assert_close(rec["grads"][1], l.grad, rtol=2 * tol.grad, atol_rel=4 * tol.grad_atol_rel,
                             what="grad logvar")
            except AssertionError as e:
                failures.append(f"[{out['cap']}] reparameterize {dtype_s}: {str(e)[:400]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_variant_float32_log_and_exp_in_ulps(variants):
    """Each variant's float log, log1p and exp within a few float32 ulps of float64 (the loss
    tolerances elsewhere, 1e-5 relative, would let a wrong coefficient of 100 ulps through)."""
    for out in variants.values():
        for name, bound in FLOAT32_MATH_ULP_BOUNDS.items():
            assert out["ulps"][name] <= bound, f"[{out['cap']}] {name}: {out['ulps'][name]:.2f} ulp > {bound}"


@pytest.mark.slow
def test_variants_agree_with_each_other(variants):
    """The DEFAULT (scalar-width) variant against each SIMD variant: same results to float tolerance."""
    base = variants["default"]
    failures = []
    for env_value, out in variants.items():
        if env_value == "default":
            continue
        for key, rec in out["elbo"].items():
            dtype = getattr(torch, key[0].replace("torch.", ""))
            tol = TOLS[dtype]
            other = base["elbo"][key]
            try:
                assert_close(rec["loss"], other["loss"], rtol=tol.loss, what="loss")
                for name, a, b in zip(("recon_x", "mu", "logvar"), rec["grads"], other["grads"]):
                    assert_close(a, b, rtol=tol.grad, atol_rel=tol.grad_atol_rel, what=f"grad {name}")
            except AssertionError as e:
                failures.append(f"[{out['cap']} vs DEFAULT] {key}: {str(e)[:400]}")
        try:
            assert_close(out["philox"], base["philox"], rtol=1e-5, atol=1e-6, what="philox_normal")
            for dtype_s, rec in out["rep"].items():
                assert torch.equal(rec["state"], base["rep"][dtype_s]["state"])
                assert_close(rec["eps"], base["rep"][dtype_s]["eps"], rtol=1e-5 if dtype_s != str(BF16) else 8e-3,
                             atol=1e-6, what=f"eps {dtype_s}")
        except AssertionError as e:
            failures.append(f"[{out['cap']} vs DEFAULT] rng: {str(e)[:400]}")
    assert not failures, "\n".join(failures)
