"""Data-parallel training under ``torchrun``: process-group setup and the few collectives the trainer uses.

``torchrun --nproc_per_node=N -m vae_ext train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` sees them and joins the group
(gloo on CPU, nccl on CUDA, one GPU per process: ``cuda:LOCAL_RANK``). Without them everything here
is a no-op and the trainer runs as one process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DeviceError

__all__ = ["DistributedContext", "resolve_device", "setup"]


def resolve_device(name: str, *, fused: bool = True, local_rank: int = 0) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when there is one) -> a usable torch.device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            why = "this PyTorch has no CUDA" if not torch.version.cuda else "no CUDA device is visible"
            raise DeviceError(f"--device {name}: CUDA is not available ({why}); use --device cpu")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise DeviceError(f"--device {name}: not a device name (expected cpu, cuda, cuda:N or auto)") from None
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
        if fused:
            from .. import build_info

            if not build_info()["cuda_kernels"]:
                raise DeviceError(f"--device {name}: vae_ext was built without CUDA kernels; "
                                  f"rebuild it with a CUDA toolkit, or pass --reference")
        return dev
    raise DeviceError(f"--device {name}: expected cpu, cuda, cuda:N or auto")


@dataclass
class DistributedContext:
    """This process's place in the job: rank 0 of 1 when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we called init_process_group, so we destroy it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device: str = "auto", *, fused: bool = True, timeout_s: float = 600.0) -> DistributedContext:
    """Join the torchrun job described by the environment, if any, and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, fused=fused, local_rank=local_rank)
    if world <= 1:
        return DistributedContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s))
        owns = True
    return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   device=dev, owns_group=owns)
