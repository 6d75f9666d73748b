"""How much memory training a model takes, found from its options before anything is allocated.

The model is built on the meta device (shapes, no storage): its parameters are counted, and one
forward pass of a meta batch through the encoder and the decoder measures the activations. The
command refuses a model that cannot fit with one line naming its options; without this check the
allocator raises a traceback, or worse, with memory overcommit the allocation succeeds, the weights'
initialization touches the pages and the OOM killer ends the run.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..models import VAE

__all__ = ["BYTES_PER_PARAMETER", "ACTIVATION_COPIES", "training_bytes", "is_out_of_memory", "first_line"]

# Memory per parameter a training run takes: the float32 weights, their gradients, Adam's two moments.
BYTES_PER_PARAMETER = 16
# Every layer's output is kept for the backward pass and gets a gradient of its size; a temporary
# around the loss and the activation functions: three copies bound it.
ACTIVATION_COPIES = 3


def activation_bytes(meta: VAE, batch: int) -> int:
    """Bytes of the layer outputs of one forward pass of ``batch`` images (``meta`` on the meta device)."""
    sizes = []

    def record(module, inputs, output):
        sizes.append(output.numel() * output.element_size())

    leaves = [m for m in meta.modules() if next(m.children(), None) is None and not isinstance(m, nn.Embedding)]
    hooks = [m.register_forward_hook(record) for m in leaves]
    try:
        with torch.no_grad():
            if hasattr(meta, "trace_forward"):  # a model whose forward is its loss (HVAE)
                meta.trace_forward(batch)
                return sum(sizes) + 4 * batch * meta.in_features
            x = torch.empty(batch, *meta.input_shape, device="meta")
            # the one-hot labels, directly: checking label values is impossible on the meta device
            c = torch.empty(batch, meta.num_classes, device="meta") if meta.conditional else None
            h = meta._features(x, c)
            mu, _ = meta.fc_mu(h), meta.fc_logvar(h)
            z = mu if c is None else torch.cat([mu, c], dim=1)
            meta._decode(z)
    finally:
        for hook in hooks:
            hook.remove()
    return sum(sizes) + 4 * batch * meta.in_features  # and the batch itself


def training_bytes(meta: VAE, batch: int) -> int:
    """Memory a training step of ``batch`` images takes with the model ``meta`` (built on the meta
    device): parameters, gradients and Adam's state, and the activations and their gradients."""
    return meta.num_parameters() * BYTES_PER_PARAMETER + ACTIVATION_COPIES * activation_bytes(meta, batch)


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation the allocator refused (CPU: a RuntimeError; CUDA: torch.OutOfMemoryError)."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg.lower())


def first_line(e: BaseException) -> str:
    """An error's message on one line, without the "[enforce fail at alloc_cpu.cpp:127] err == 0. "
    that PyTorch's C++ checks put first."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", line)[:200]
