"""Dispatcher for ep=1: every expert lives on this rank, communication is the identity."""

from __future__ import annotations

import torch

from moetrain.parallel.dispatch.plan import RoutingPlan, build_plan, permute, unpermute


class LocalDispatcher:
    def __init__(self, num_experts: int, capacity_factor=None, pad_to_capacity: bool = False):
        self.num_experts = self.num_local_experts = num_experts
        self.capacity_factor, self.pad_to_capacity = capacity_factor, pad_to_capacity

    def plan(self, topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor, num_chunks: int = 1) -> RoutingPlan:
        """Nothing to overlap without communication: always one chunk."""
        return build_plan(topk_idx_TK, gates_TK, self.num_experts, self.capacity_factor, self.pad_to_capacity)

    def dispatch_preprocess(self, x_TD, plan):
        return permute(x_TD, plan)

    def dispatch_comm(self, x_RD, plan, chunk: int = 0):
        return x_RD

    def dispatch_postprocess(self, x_RD, plan, chunk: int = 0):
        return x_RD, plan.tokens_per_expert_E, slice(None)

    def combine_preprocess(self, y_RD, plan, chunk: int = 0):
        return y_RD

    def combine_comm(self, y_RD, plan, chunk: int = 0):
        return y_RD

    def combine_postprocess(self, y_RD, plan):
        return unpermute(y_RD, plan)
