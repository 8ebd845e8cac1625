"""Build an MoE layer for a parallel layout: the layer (moe/) gets the dispatcher and experts of the layout here.

    local (no group or a group of one):  LocalDispatcher + GroupedExperts holding all E experts
    expert parallelism (ep group of W):   AllToAllDispatcher over the contiguous placement + GroupedExperts holding
                                          experts [r*E/W, (r+1)*E/W) of ep rank r
    FSSDP (fssdp config, group of W):     AllToAllDispatcher over the step's placement + ShardedExperts, both sharing
                                          one FSSDPLayerState (owners, load window, replicas)

The all-to-all dispatchers take the pipeline degree ("auto" tunes it); the local one always uses one chunk.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from moetrain.config.schema import FSSDPConfig, RouterConfig
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.layer import MoELayer
from moetrain.parallel.dispatch.alltoall import AllToAllDispatcher


def build_moe_layer(dim: int, hidden: int, num_experts: int, num_shared: int, router_cfg: RouterConfig,
                    layer_id: int, ep_group: Optional[dist.ProcessGroup] = None,
                    dp_group: Optional[dist.ProcessGroup] = None, backend: str = "auto",
                    fssdp: Optional[FSSDPConfig] = None, pipeline_degree: str = "1", shared_hidden: int = 0,
                    shared_gate: bool = False, pipeline_split: str = "experts") -> MoELayer:
    """The MoE layer of the layout given by `ep_group` (experts spread over it) and `fssdp` (sharded instead);
    `shared_hidden`, `shared_gate`: the shared experts' size and gate (MoELayer)."""
    capacity, pad = router_cfg.capacity_factor, router_cfg.pad_to_capacity
    shared = {"shared_hidden": shared_hidden, "shared_gate": shared_gate}
    if ep_group is None or dist.get_world_size(ep_group) == 1:
        return MoELayer(dim, hidden, num_experts, num_shared, router_cfg, layer_id, dp_group=dp_group, backend=backend,
                        **shared)
    if fssdp is not None:
        from moetrain.parallel.fssdp.experts import ShardedExperts
        from moetrain.parallel.fssdp.state import FSSDPLayerState

        state = FSSDPLayerState(num_experts, ep_group, fssdp)
        dispatcher = AllToAllDispatcher(num_experts, ep_group, capacity, pad, placement_source=state,
                                        pipeline_degree=pipeline_degree, pipeline_split=pipeline_split)
        experts = ShardedExperts(dim, hidden, state, backend, fssdp.rematerialize)
    else:
        dispatcher = AllToAllDispatcher(num_experts, ep_group, capacity, pad, pipeline_degree=pipeline_degree,
                                        pipeline_split=pipeline_split)
        L, ep_rank = dispatcher.num_local_experts, dist.get_rank(ep_group)
        experts = GroupedExperts(dim, hidden, list(range(ep_rank * L, (ep_rank + 1) * L)), backend)
    return MoELayer(dim, hidden, num_experts, num_shared, router_cfg, layer_id, dispatcher, experts, dp_group, backend,
                    **shared)


def moe_layer_factory(router_cfg: RouterConfig, ep_group=None, dp_group=None, fssdp=None, pipeline_degree="1",
                      pipeline_split="experts"):
    """`TransformerLM`'s `moe_layer` argument for this layout: (dim, hidden, E, shared, layer_id, shared_hidden=0,
    shared_gate=False) -> MoELayer."""
    def make(dim: int, hidden: int, num_experts: int, num_shared: int, layer_id: int, shared_hidden: int = 0,
             shared_gate: bool = False) -> MoELayer:
        return build_moe_layer(dim, hidden, num_experts, num_shared, router_cfg, layer_id, ep_group, dp_group,
                               fssdp=fssdp, pipeline_degree=pipeline_degree, shared_hidden=shared_hidden,
                               shared_gate=shared_gate, pipeline_split=pipeline_split)

    return make
