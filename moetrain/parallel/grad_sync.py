"""Gradient synchronisation for data x expert parallelism (the "DDP" mode), bucketed.

The global loss is the mean of the per-rank losses: L = (1/W) sum_r L_r. Hence
  dense parameter (replicated on all W ranks):      g = (1/W) sum_r g_r            -> all-reduce over the world, / W
  expert parameter (replicated on the dp ranks of its ep coordinate; its local gradient already sums the
  contributions of the tokens that all ep ranks sent to it through the all-to-all backward):
                                                    g = (1/W) sum_{dp replicas} g_r -> all-reduce over edp, / W
Missing gradients (a parameter that took no part in this step) count as zeros so that every rank issues the same
collectives. Gradients are flattened into buckets of at most `bucket_numel` elements per collective.

Under FSDP2 (parallel/fsdp.py) the parameters it shards are DTensors whose gradients it reduce-scatters in backward
(with the same 1/W); `sync_gradients` skips them and reduces only what FSDP ignores: the experts of an expert-data-
parallel group of one rank (all-reduce over edp, a no-op but for the 1/W) and FSSDP's single-owner experts.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from moetrain.parallel.mesh import ParallelContext


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "expert_ids", None) is not None


def is_dtensor(t: torch.Tensor) -> bool:
    """A DTensor (FSDP2's sharded parameters and their gradients and optimizer state)."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local shard of a DTensor (sharing its storage), `t` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def replication(p: torch.Tensor, ctx: ParallelContext) -> int:
    """How many ranks hold an identical copy of this rank's part of `p` (and, after synchronisation, of its
    gradient): a DTensor's replicated mesh dims; a plain expert parameter's expert-data-parallel ranks; a plain dense
    parameter's whole world."""
    if is_dtensor(p):
        n = 1
        for dim, placement in enumerate(p.placements):
            if placement.is_replicate():
                n *= p.device_mesh.size(dim)
        return n
    return ctx.dp if is_expert_param(p) else ctx.world_size


def _allreduce_buckets(params: Iterable[torch.Tensor], group, scale: float, bucket_numel: int) -> None:
    bucket: list[torch.Tensor] = []
    size = 0

    def flush():
        nonlocal bucket, size
        if not bucket:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat, group=group)
        flat.mul_(scale)
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
        bucket, size = [], 0

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.numel()
        if size >= bucket_numel:
            flush()
    flush()


def sync_gradients(model: nn.Module, ctx: ParallelContext, bucket_numel: int = 25_000_000) -> None:
    if not ctx.is_distributed:
        return
    params = [p for p in model.parameters() if p.requires_grad and not is_dtensor(p)]  # FSDP reduces DTensors
    dense = [p for p in params if not is_expert_param(p)]
    experts = [p for p in params if is_expert_param(p)]
    _allreduce_buckets(dense, ctx.world_group, 1.0 / ctx.world_size, bucket_numel)
    if experts:
        _allreduce_buckets(experts, ctx.edp_group, 1.0 / ctx.world_size, bucket_numel)


def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: ParallelContext) -> torch.Tensor:
    """Global L2 norm over all parameters, each expert counted once: ||g||^2 = dense^2 + sum over ep ranks of expert^2.

    Scales gradients in place when the norm exceeds max_norm (> 0). Returns the norm before clipping.
    Under FSDP2 (some parameters are DTensors) see `_fsdp_norm`.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if any(is_dtensor(p) for p in params):
        norm = _fsdp_norm(params, ctx)
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in params:
                grad = local_tensor(p.grad)
                grad.mul_(coef.to(grad.dtype))
        return norm
    dense_sq = sum((p.grad.float().pow(2).sum() for p in params if not is_expert_param(p)), torch.zeros(()))
    expert_sq = sum((p.grad.float().pow(2).sum() for p in params if is_expert_param(p)), torch.zeros(()))
    dense_sq, expert_sq = dense_sq.to(ctx.device), expert_sq.to(ctx.device)
    if ctx.is_distributed and ctx.ep > 1:
        dist.all_reduce(expert_sq, group=ctx.ep_group)
    norm = (dense_sq + expert_sq).sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm


def _fsdp_norm(params: list[torch.Tensor], ctx: ParallelContext) -> torch.Tensor:
    """Global L2 norm when parameters are split in several ways at once (FSDP shards on one or two meshes, plain
    experts): every rank adds the squares of its local parts, each divided by how many ranks hold the same part
    (`replication`), and one all-reduce over the world sums them, so every element counts once."""
    sq = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for p in params:
        sq += local_tensor(p.grad).double().pow(2).sum() / replication(p, ctx)
    if ctx.is_distributed:
        dist.all_reduce(sq, group=ctx.world_group)
    return sq.sqrt().float()
