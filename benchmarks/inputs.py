"""Benchmark inputs: realistic values (never zeros), drawn on the CPU from a seeded generator."""
from __future__ import annotations

import torch


def mnist_like(shape, *, device, dtype, generator: torch.Generator) -> torch.Tensor:
    """Targets in [0, 1] shaped like MNIST pixels: about 80% exact zeros, the rest in (0, 1], skewed to 1."""
    u = torch.rand(shape, generator=generator)
    v = torch.rand(shape, generator=generator).sqrt()  # ink: mostly near 1
    x = torch.where(u < 0.8, torch.zeros_like(v), v)
    return x.to(device=device, dtype=dtype)


def randn(shape, *, device, dtype, generator: torch.Generator, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * scale + shift).to(device=device, dtype=dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)
