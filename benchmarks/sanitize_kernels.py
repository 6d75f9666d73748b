"""Runs every CUDA kernel forward and backward on odd sizes: the workload for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py
    python benchmarks/sanitize_kernels.py --device cpu   # the same calls on CPU (a smoke test)

Each path of the ops gets a call: every dtype, recon mode and reduction; a recon_x that starts off a
16-byte boundary (the scalar head), a channels_last one (read in place), an incoming gradient of 1
(the backward's scale kernel exits at once) and of 1.5 (it scales), total=True (beta 1) and the
separate terms (return_terms, beta != 1); reparameterize with one sample and with several.
"""
import argparse

import torch

from checkout import prefer_built_checkout

prefer_built_checkout()  # as run.py: this checkout's vae_ext when it is built in place

import vae_ext  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    dev = p.parse_args().device
    if dev == "cuda":
        assert torch.cuda.is_available() and vae_ext.build_info()["cuda_kernels"], "needs a GPU and the CUDA kernels"
    g = torch.Generator(device=dev).manual_seed(0)
    calls = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for n, d, l in ((1, 1, 1), (3, 7, 5), (37, 1271, 13), (5, 20001, 3), (0, 9, 4)):
            for recon in ("bce", "bce_logits", "mse"):
                for reduction in ("sum", "mean", "none"):
                    r = torch.rand(n, d, device=dev, generator=g).to(dtype)
                    x = torch.rand(n, d, device=dev, generator=g).to(dtype)
                    # a view that starts off a 16-byte boundary exercises the scalar head
                    r_off = torch.rand(n * d + 1, device=dev, generator=g).to(dtype)[1:].view(n, d)
                    mu = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
                    lv = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
                    for rr, scale in ((r, 1.0), (r_off, 1.5)):
                        rr = rr.detach().requires_grad_()
                        out = vae_ext.elbo_loss(rr, x, mu, lv, recon=recon, reduction=reduction, validate=True)
                        (out.sum() * scale).backward()
                        calls += 1
                    rr = r.detach().requires_grad_()
                    loss, rec, kl = vae_ext.elbo_loss(rr, x, mu, lv, recon=recon, reduction=reduction, beta=0.5,
                                                      return_terms=True)
                    (loss.sum() * 1.5).backward()
                    calls += 1
            # channels_last: (n, 3, h, w) with h * w near d
            h = max(1, int((d / 3) ** 0.5))
            r4 = torch.rand(n, 3, h, h + 1, device=dev, generator=g).to(dtype)
            r4 = r4.contiguous(memory_format=torch.channels_last).requires_grad_()
            x4 = torch.rand(r4.shape, device=dev, generator=g).to(dtype)  # contiguous: copied into r4's layout
            mu = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
            lv = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
            (vae_ext.elbo_loss(r4, x4, mu, lv, recon="bce_logits") * 1.5).backward()
            calls += 1
            for k in (None, 3):
                mu = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
                lv = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
                z, eps = vae_ext.reparameterize(mu, lv, num_samples=k, return_eps=True, generator=g)
                (z.sum() * 1.5).backward()
                calls += 1
    torch.ops.vae_ext.philox_normal(torch.empty(1001, device=dev), 7, 4)
    if dev == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_kernels: every kernel ran ({calls} op calls with backward, on {dev})")


if __name__ == "__main__":
    main()
