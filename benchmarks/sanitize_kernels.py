"""Runs every CUDA kernel forward and backward on odd sizes: the workload for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py
"""
import torch

import vae_ext


def main() -> None:
    assert torch.cuda.is_available() and vae_ext.build_info()["cuda_kernels"], "needs a GPU and the CUDA kernels"
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
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
                    for rr in (r, r_off):
                        rr = rr.detach().requires_grad_()
                        out = vae_ext.elbo_loss(rr, x, mu, lv, recon=recon, reduction=reduction, validate=True)
                        out.sum().backward()
            for k in (None, 3):
                mu = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
                lv = torch.randn(n, l, device=dev, generator=g).to(dtype).requires_grad_()
                z, eps = vae_ext.reparameterize(mu, lv, num_samples=k, return_eps=True, generator=g)
                z.sum().backward()
    torch.ops.vae_ext.philox_normal(torch.empty(1001, device=dev), 7, 4)
    torch.cuda.synchronize()
    print("sanitize_kernels: every kernel ran")


if __name__ == "__main__":
    main()
