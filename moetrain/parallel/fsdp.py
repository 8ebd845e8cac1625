"""FSDP2 (`fully_shard`) for the dense parameters, composed with expert parallelism, FSSDP and HSDP.

One FSDP unit per transformer block, then the root (embeddings, final norm, output). Inside a unit the parameters are
sharded over two meshes (views of the one root mesh; `moetrain.parallel.mesh.fsdp_meshes`):

    dense parameters (attention, norms, routers, shared experts, embeddings)  -> the dense mesh: all W ranks, or
                                                                                (R, W/R) with HSDP (dp_replicate=R)
    expert parameters, mode=ep, expert-data-parallel group of > 1 rank      -> the experts mesh: the "dp" ranks holding
                                                                                the same experts (inside one replica)
    expert parameters otherwise (ep = W, or FSSDP: one owner per expert)     -> ignored by FSDP: plain tensors,
                                                                                reduced by `sync_gradients`

The experts share their block's unit (FSDP2's per-parameter mesh: `shard_placement_fn` returning a
`ShardPlacementResult` with the experts' mesh) rather than forming a unit of their own, because the MoE layer calls
its experts' `materialize`/`compute`, never their `forward`, so FSDP's forward hooks would not run on them. Expert
parameters stay sharded on dim 0, i.e. by whole experts: the checkpoint keys experts by global id and saves each
rank's rows.

Gradient scaling: the loss is the mean over the W ranks' losses, so every gradient is (sum over the ranks holding
that shard) / W: every unit divides by W (`set_gradient_divide_factor`), not by its own mesh's size (which would be
wrong for the experts, whose local gradient already sums all ranks' tokens through the all-to-all). On CPU (gloo has
no PREMUL_SUM) the reductions are forced to plain sums followed by the division.

Mixed precision: with `parallel.mixed_precision` resolving to bf16 (moetrain/train/precision.py; auto: bf16 on CUDA,
fp32 on CPU) FSDP2 gathers parameters in bf16 and reduces gradients in fp32 (`MixedPrecisionPolicy(
param_dtype=bfloat16, reduce_dtype=float32)`); the sharded parameters and the optimizer state stay fp32.

FSDP2 replaces the parameters by DTensors and drops custom attributes; `expert_ids` is put back on the new expert
parameters so that gradient sync, clipping, checkpoints and memory accounting still recognise them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moetrain.parallel.grad_sync import is_expert_param
from moetrain.parallel.mesh import FSDPMeshes, ParallelContext, fsdp_meshes


def mixed_precision_policy(param_dtype: Optional[torch.dtype]):
    """FSDP2's policy for the run's compute dtype (`moetrain.train.precision.resolve_precision`): bf16 parameters in
    compute with fp32 gradient reduction; the default (no casts) for fp32 (None)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None or param_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def _expert_placement_fn(meshes: FSDPMeshes, expert_params: set[nn.Parameter]):
    """shard_placement_fn: expert parameters -> Shard(0) on the experts' mesh; the rest -> the unit's mesh.
    FSDP2's per-parameter mesh (torch 2.13) takes the mesh as an FSDPMeshInfo, which torch keeps in a private module."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import (FSDPMeshInfo, HSDPMeshInfo,
                                                                  ShardPlacementResult)
    from torch.distributed.tensor import Shard

    mesh = meshes.experts
    info = (FSDPMeshInfo(mesh, shard_mesh_dim=0) if mesh.ndim == 1
            else HSDPMeshInfo(mesh, shard_mesh_dim=1, replicate_mesh_dim=0))
    result = ShardPlacementResult(placement=Shard(0), mesh_info=info)  # one object: FSDP groups params by it

    def placement(param: nn.Parameter):
        return result if param in expert_params else None

    return placement


def apply_fsdp(model: nn.Module, ctx: ParallelContext, dp_replicate: int = 1, fssdp: bool = False,
               param_dtype: Optional[torch.dtype] = None) -> FSDPMeshes:
    """Shard `model` in place (see the module docstring) and return the meshes used. Collective. `param_dtype`:
    the compute dtype of `parallel.mixed_precision` (None: fp32)."""
    from torch.distributed.fsdp import fully_shard

    # Expert parameters and the module attribute that holds each, to restore `expert_ids` after sharding.
    owners = [(module, name, p.expert_ids) for module in model.modules()
              for name, p in module.named_parameters(recurse=False) if is_expert_param(p)]
    experts = {getattr(module, name) for module, name, _ in owners}
    shard_experts = not fssdp and ctx.ep > 1  # ep = 1: experts are held by every rank, sharded like dense ones
    meshes = fsdp_meshes(ctx, dp_replicate, shard_experts=shard_experts)
    ignored: Optional[set[nn.Parameter]] = None
    placement = None
    if shard_experts and meshes.experts is not None:
        placement = _expert_placement_fn(meshes, experts)
    elif shard_experts or fssdp:
        ignored = experts  # one rank per expert shard group (ep = W), or FSSDP's single owners
    kwargs = dict(mesh=meshes.dense, mp_policy=mixed_precision_policy(param_dtype),
                  ignored_params=ignored, shard_placement_fn=placement)
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    for module in (m for m in model.modules() if hasattr(m, "set_gradient_divide_factor")):
        module.set_gradient_divide_factor(float(ctx.world_size))
        if ctx.device.type != "cuda":
            module.set_force_sum_reduction_for_comms(True)
    for module, name, ids in owners:
        getattr(module, name).expert_ids = ids
    return meshes


def fit_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """torch's foreach and fused optimizer kernels take lists that must be all DTensors or all plain tensors. When
    FSDP ignores some parameters (plain experts next to DTensors: ep = W, FSSDP), switch the optimizer to its
    per-tensor implementation (same update, one kernel per tensor instead of one per list)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(hasattr(p, "to_local") for p in params) and not all(hasattr(p, "to_local") for p in params):
        for group in optimizer.param_groups:
            if "foreach" in group:
                group["foreach"] = False
            if group.get("fused"):
                group["fused"] = False
