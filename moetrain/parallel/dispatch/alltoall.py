"""Expert-parallel dispatcher: tokens travel to their experts' ranks with one uneven all-to-all, and back.

Legend: T tokens on this rank, D model dim, E experts, W ranks in the ep group, L = E / W local experts,
R rows leaving this rank, Rr rows arriving.

Rank w of the ep group owns experts [w*L, (w+1)*L). Rows are already in expert order after the local plan, hence also in
destination-rank order, so:
    send_splits_W[w] = sum of tokens_per_expert_E over w's experts
    counts_WL = all_to_all(tokens_per_expert_E.view(W, L))       # rows each source sends to each of my experts
    recv_splits_W = counts_WL.sum(1);   tokens_per_local_expert_L = counts_WL.sum(0)
Arriving rows are ordered (source, local expert); `regroup_idx_Rr` reorders them to (local expert, source) for the
grouped GEMM, and its inverse restores the order for the combine. Zero-size splits (a rank that sends or receives
nothing, an expert nobody picks) are ordinary. The token all-to-all is torch's functional collective, which is
autograd-aware (its backward is the reverse all-to-all) and asynchronous: it returns at once and the result is
waited for on first use, which is what lets shared experts run while tokens are in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moetrain.parallel.dispatch.plan import RoutingPlan, build_plan, permute, unpermute


@dataclass
class AllToAllPlan:
    local: RoutingPlan
    send_splits: list[int]
    recv_splits: list[int]
    regroup_idx_Rr: torch.Tensor  # arrival order -> (local expert, source) order
    restore_idx_Rr: torch.Tensor  # inverse permutation
    tokens_per_local_expert_L: torch.Tensor

    @property
    def num_dropped(self) -> int:
        return self.local.num_dropped


def regroup_index(counts_WL: torch.Tensor) -> torch.Tensor:
    """Row permutation taking blocks ordered (w, l) to blocks ordered (l, w); block (w, l) has counts_WL[w, l] rows."""
    W, L = counts_WL.shape
    c = counts_WL.flatten()
    src_start = torch.cumsum(c, 0) - c
    order = torch.arange(W * L, device=c.device).view(W, L).t().flatten()
    c_ord, s_ord = c[order], src_start[order]
    dst_start = torch.cumsum(c_ord, 0) - c_ord
    total = int(c.sum())
    return torch.arange(total, device=c.device) + torch.repeat_interleave(s_ord - dst_start, c_ord, output_size=total)


class AllToAllDispatcher:
    def __init__(self, num_experts: int, group: dist.ProcessGroup, capacity_factor=None, pad_to_capacity=False):
        self.group = group
        self.world = dist.get_world_size(group)
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel size {self.world}")
        self.num_experts, self.num_local_experts = num_experts, num_experts // self.world
        self.capacity_factor, self.pad_to_capacity = capacity_factor, pad_to_capacity

    def plan(self, topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor) -> AllToAllPlan:
        local = build_plan(topk_idx_TK, gates_TK, self.num_experts, self.capacity_factor, self.pad_to_capacity)
        W, L = self.world, self.num_local_experts
        send_counts_WL = local.tokens_per_expert_E.view(W, L)
        recv_counts_WL = torch.empty_like(send_counts_WL)
        dist.all_to_all_single(recv_counts_WL, send_counts_WL, group=self.group)
        regroup = regroup_index(recv_counts_WL)
        return AllToAllPlan(
            local=local,
            send_splits=send_counts_WL.sum(1).tolist(),
            recv_splits=recv_counts_WL.sum(1).tolist(),
            regroup_idx_Rr=regroup,
            restore_idx_Rr=torch.argsort(regroup),
            tokens_per_local_expert_L=recv_counts_WL.sum(0),
        )

    def dispatch_preprocess(self, x_TD, plan: AllToAllPlan):
        return permute(x_TD, plan.local)

    def dispatch_comm(self, x_RD, plan: AllToAllPlan):
        return all_to_all_single_autograd(x_RD.contiguous(), plan.recv_splits, plan.send_splits, self.group)

    def dispatch_postprocess(self, x_RrD, plan: AllToAllPlan):
        return x_RrD.index_select(0, plan.regroup_idx_Rr), plan.tokens_per_local_expert_L

    def combine_preprocess(self, y_RrD, plan: AllToAllPlan):
        return y_RrD.index_select(0, plan.restore_idx_Rr)

    def combine_comm(self, y_RrD, plan: AllToAllPlan):
        return all_to_all_single_autograd(y_RrD.contiguous(), plan.send_splits, plan.recv_splits, self.group)

    def combine_postprocess(self, y_RD, plan: AllToAllPlan):
        return unpermute(y_RD, plan.local)
