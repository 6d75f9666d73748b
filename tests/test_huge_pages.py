"""The big CPU outputs of the fused ops are advised as transparent huge pages (csrc/grad_block.h,
advise_huge_pages): glibc maps a block of 32 MiB or more afresh on every call, and with 4 KiB pages
each of them faults in again. Checked in the kernel's record of the mappings (/proc/self/smaps:
``hg`` among a mapping's VmFlags is MADV_HUGEPAGE), which holds whether or not the system then
grants huge pages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import vae_ext

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.path.isdir("/sys/kernel/mm/transparent_hugepage"),
    reason="transparent huge pages: Linux with THP in its kernel")

opted_out = pytest.mark.skipif(os.environ.get("VAE_EXT_HUGE_PAGES") == "0", reason="VAE_EXT_HUGE_PAGES=0")
HUGE = 2 << 20
BIG = (1024, 8200)  # 33.6 MB in float32: above glibc's largest mmap threshold, 32 MiB


def vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping that holds addr."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 2 and len(head[1]) == 4:  # a mapping's first line
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("VmFlags:"):
                return head[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


def advised(t: torch.Tensor) -> bool:
    """Whether the first whole 2 MiB page of t's storage is advised as a huge page."""
    start = t.untyped_storage().data_ptr()
    first = (start + HUGE - 1) // HUGE * HUGE
    assert first + HUGE <= start + t.untyped_storage().nbytes()
    return "hg" in vm_flags(first)


@opted_out
def test_elbo_loss_recon_gradient():
    r = torch.rand(BIG).clamp_(0.01, 0.99).requires_grad_(True)
    x = torch.rand(BIG)
    mu, lv = (torch.randn(BIG[0], 8, requires_grad=True) for _ in range(2))
    g_r, g_mu = torch.autograd.grad(vae_ext.elbo_loss(r, x, mu, lv, reduction="mean"), (r, mu))
    assert advised(g_r)
    want = (r - x) / (r * (1 - r)) / BIG[0]
    torch.testing.assert_close(g_r, want.detach(), rtol=1e-5, atol=1e-9)  # advice changes no value


@opted_out
def test_reparameterize_sample_and_gradient():
    mu, lv = (torch.randn(BIG, requires_grad=True) for _ in range(2))
    z = vae_ext.reparameterize(mu, lv)
    assert advised(z)
    g_lv, = torch.autograd.grad(z.sum(), lv)
    assert advised(g_lv)


def test_small_outputs_and_the_opt_out_stay_as_they_are(tmp_path):
    """Below 32 MiB (blocks glibc may keep in its heap) and under VAE_EXT_HUGE_PAGES=0 nothing is
    advised: a fresh process, where no earlier advice can be met."""
    code = """
import sys, torch, vae_ext
sys.path.insert(0, {tests!r})
from test_huge_pages import advised, BIG
mu, lv = (torch.randn(BIG) for _ in range(2))
print(advised(vae_ext.reparameterize(mu, lv)), advised(vae_ext.reparameterize(mu[:200], lv[:200])))
""".format(tests=os.path.dirname(__file__))
    env = {k: v for k, v in os.environ.items() if k != "VAE_EXT_HUGE_PAGES"}
    # the vae_ext this test imported (installed, or the checkout built in place), not the sources
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(vae_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
    # (run elsewhere than the checkout, whose unbuilt sources `python -c` would import first)
    out = [subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True,
                          check=True, cwd=tmp_path).stdout.split() for extra in ({}, {"VAE_EXT_HUGE_PAGES": "0"})]
    assert out == [["True", "False"], ["False", "False"]]
