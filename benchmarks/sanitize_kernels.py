"""Runs every CUDA kernel forward and backward on odd sizes: the workload for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_kernels.py
    python benchmarks/sanitize_kernels.py --device cpu   # the same calls on CPU (a smoke test)

Each path of the ops gets a call: every dtype, recon mode and reduction; a recon_x that starts off a
16-byte boundary (the scalar head), a channels_last one (read in place), an incoming gradient of 1
(the backward's scale kernel exits at once) and of 1.5 (it scales), total=True (beta 1) and the
separate terms (return_terms, beta != 1); l1, gaussian, learned priors and free bits
(objective_calls); reparameterize with one sample and with several.
"""
import argparse

import torch

from checkout import prefer_built_checkout

prefer_built_checkout()  # as run.py: this checkout's vae_ext when it is built in place

import vae_ext  # noqa: E402


def objective_calls(n, d, l, dtype, dev, g) -> int:
    """The issue-15 paths: l1; gaussian with a 0-d and a per-element log-variance; a prior per sample
    and one shared (broadcast) by every sample; free bits and the per-unit KL; conv-shaped latents."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(shape, device=dev, generator=g) * scale).to(dtype).requires_grad_()

    calls = 0
    x = torch.rand(n, d, device=dev, generator=g).to(dtype)
    for reduction in ("sum", "mean", "none"):
        for rlv_shape in (None, (), (n, d)):
            r, mu, lv = leaf(n, d), leaf(n, l), leaf(n, l, scale=0.5)
            recon = "l1" if rlv_shape is None else "gaussian"
            rlv = None if rlv_shape is None else leaf(*rlv_shape, scale=0.3)
            for pshape in (None, (n, l), (l,)):
                prior = {} if pshape is None else dict(prior_mu=leaf(*pshape), prior_logvar=leaf(*pshape, scale=0.5))
                fb = 0.5 if reduction != "none" and pshape is not None else 0.0
                loss, rec, kl, units = vae_ext.elbo_loss(r, x, mu, lv, recon=recon, recon_logvar=rlv,
                                                         reduction=reduction, beta=0.7, free_bits=fb,
                                                         return_terms=True, return_unit_kl=True, **prior)
                (loss.sum() * 1.5).backward()
                calls += 1
    # conv latents (n, 2, 3, l) with a (2, 1, 1) prior, the KL alone
    mu, lv, pm, pl = leaf(n, 2, 3, l), leaf(n, 2, 3, l), leaf(2, 1, 1), leaf(2, 1, 1)
    vae_ext.gaussian_kl(mu, lv, pm, pl, reduction="mean", free_bits=0.25).backward()
    return calls + 1


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
            calls += objective_calls(n, d, l, dtype, dev, g)
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
