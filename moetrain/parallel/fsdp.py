"""FSDP2 (`fully_shard`) for the dense model: each transformer block, then the root, sharded over the dp mesh dim.

Only with ep=1 for now (validated in config/validate.py): experts are then ordinary parameters sharded like the rest.
FSDP2 owns gradient reduction in this mode, so the trainer skips `sync_gradients`.
"""

from __future__ import annotations

from torch import nn

from moetrain.parallel.mesh import ParallelContext


def apply_fsdp(model: nn.Module, ctx: ParallelContext) -> None:
    from torch.distributed.fsdp import fully_shard

    mesh = ctx.mesh["dp"]
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
