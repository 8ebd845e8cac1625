"""Process groups for data x expert parallelism.

World W = dp * ep, laid out as a DeviceMesh of shape (dp, ep) with dims named ("dp", "ep"): ranks that differ only in
their ep coordinate hold different experts (the expert-parallel group); ranks that differ only in their dp coordinate
hold the same experts (the expert-data-parallel group, over which expert gradients are reduced). Dense parameters are
data parallel over the whole world, and so is the data: every rank reads its own micro-batches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Optional[object] = None  # DeviceMesh (dp, ep) when distributed
    world_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    edp_group: Optional[dist.ProcessGroup] = None

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun (single process when unset)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_parallel(ep: int, device_request: str = "auto", backend: str = "auto") -> ParallelContext:
    """Initialise the default process group (if WORLD_SIZE > 1) and the (dp, ep) mesh."""
    rank, world_size, local_rank = env_world()
    device = resolve_device(device_request, local_rank)
    ctx = ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, ep=ep, device=device)
    if world_size == 1 and not dist.is_initialized():
        return ctx
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=10),
                                device_id=device if device.type == "cuda" else None)
    return build_groups(ctx)


def build_groups(ctx: ParallelContext) -> ParallelContext:
    from torch.distributed.device_mesh import init_device_mesh

    ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size // ctx.ep, ctx.ep), mesh_dim_names=("dp", "ep"))
    ctx.mesh = mesh
    ctx.world_group = dist.group.WORLD
    ctx.ep_group = mesh["ep"].get_group()
    ctx.edp_group = mesh["dp"].get_group()
    return ctx
