"""The dispatcher interface: local pre-processing, communication, local post-processing, for both directions.

Legend: T tokens on this rank, D model dim, R routed rows leaving this rank, Rr rows arriving, L local experts.

    plan  = plan(topk_idx_TK, gates_TK, num_chunks)   # local routing plan, destinations, count exchange
    x_RD  = dispatch_preprocess(x_TD, plan)        # permute into (chunk, destination, expert) order (local)
    for each chunk c:
        x_c = dispatch_comm(x_RD, plan, c)         # send the chunk's rows (returns before the transfer is done)
    for each chunk c:
        x_c, tokens_per_expert_c, experts_c = dispatch_postprocess(x_c, plan, c)   # wait, regroup by expert
        y_c = experts[experts_c](x_c)
        y_c = combine_comm(combine_preprocess(y_c, plan, c), plan, c)             # send results back (async)
    y_TD  = combine_postprocess(cat(y_c), plan)    # wait, weight by gates, sum the K copies of each token

Splitting the steps lets the layer compute shared experts while the dispatch is in flight, and lets the pipeline
overlap the transfer of chunk c+1 and the combine of chunk c-1 with the expert compute of chunk c. Every step is
autograd-correct.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moetrain.parallel.dispatch.plan import RoutingPlan


class Dispatcher(Protocol):
    num_local_experts: int

    def plan(self, topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor, num_chunks: int = 1) -> RoutingPlan: ...

    def dispatch_preprocess(self, x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...

    def dispatch_comm(self, x_RD: torch.Tensor, plan: RoutingPlan, chunk: int = 0) -> torch.Tensor: ...

    def dispatch_postprocess(self, x_RrD: torch.Tensor, plan: RoutingPlan,
                             chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, slice]: ...

    def combine_preprocess(self, y_RrD: torch.Tensor, plan: RoutingPlan, chunk: int = 0) -> torch.Tensor: ...

    def combine_comm(self, y_RrD: torch.Tensor, plan: RoutingPlan, chunk: int = 0) -> torch.Tensor: ...

    def combine_postprocess(self, y_RD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...
