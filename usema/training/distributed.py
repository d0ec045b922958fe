"""Process-group setup for ``torchrun`` launches (nccl on CUDA, gloo on CPU) and small collectives.

A plain ``usema train`` is a world of one: every helper here is then a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from usema.run.device import resolve_device


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: ``rank`` of ``world_size``, and its torch ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    local_world_size: int = 1
    """Processes of this job on this machine (torchrun's LOCAL_WORLD_SIZE): they share its CPUs."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(requested_device: str | None = None) -> DistContext:
    """Read torchrun's environment and, when WORLD_SIZE > 1, initialise the default process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return DistContext(rank, world_size, local_rank, device, local_world_size)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (moved to the process device for nccl) and return it."""
    if not ctx.distributed:
        return tensor
    on_device = tensor.to(ctx.device)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
    tensor.copy_(on_device.to(tensor.device))
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Picklable ``obj`` from every rank, in rank order (``[obj]`` for a single process)."""
    if not ctx.distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
