"""The dispatcher interface: local pre-processing, communication, local post-processing, for both directions.

Legend: T tokens on this rank, D model dim, R routed rows leaving this rank, Rr rows arriving, L local experts.

    x_RD  = dispatch_preprocess(x_TD, plan)        # permute into expert order (local)
    x_RrD = dispatch_comm(x_RD, plan)              # send rows to their experts' ranks (may return before done)
    x_RrD, tokens_per_local_expert_L = dispatch_postprocess(x_RrD, plan)   # wait, regroup by local expert
    ... experts ...
    y_RrD = combine_preprocess(y_RrD, plan)        # undo the regrouping (local)
    y_RD  = combine_comm(y_RrD, plan)              # send results back (may return before done)
    y_TD  = combine_postprocess(y_RD, plan)        # wait, weight by gates, sum the K copies of each token

Splitting the steps lets the layer compute shared experts while the dispatch is in flight and lets the pipeline
interleave the communication of one chunk with the expert compute of another. Every step is autograd-correct.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moetrain.parallel.dispatch.plan import RoutingPlan


class Dispatcher(Protocol):
    num_local_experts: int

    def plan(self, topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor) -> RoutingPlan: ...

    def dispatch_preprocess(self, x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...

    def dispatch_comm(self, x_RD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...

    def dispatch_postprocess(self, x_RrD: torch.Tensor, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]: ...

    def combine_preprocess(self, y_RrD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...

    def combine_comm(self, y_RrD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...

    def combine_postprocess(self, y_RD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor: ...
