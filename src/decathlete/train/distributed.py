"""Distributed data parallel through ``torchrun``: gloo on CPU, NCCL on GPUs; rank 0 alone writes files.

``torchrun --nproc_per_node N -m decathlete.cli train ...`` (or ``--nnodes`` with a rendezvous endpoint for several
machines) starts one process per device and sets the standard ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables that
``torch.distributed`` reads; a plain ``decathlete train`` runs as a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """Where this process stands: ``rank`` of ``size`` processes; ``local_rank`` picks the GPU."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world(device_type: str) -> World:
    """Join the process group when launched by torchrun; a world of one otherwise."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    world = World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if device_type == "cuda":
        torch.cuda.set_device(world.local_rank)
    return world


def local_batch_size(batch_size: int, world: World) -> int:
    """Split the global batch over ranks; the first ``batch_size % size`` ranks take one more (at least 1 each)."""
    share, extra = divmod(batch_size, world.size)
    return max(1, share + (1 if world.rank < extra else 0))


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over ranks (in place); a no-op in a world of one."""
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
