"""SparseAllGather and SparseReduceScatter of whole experts (FSSDP, Hecate arXiv 2502.02581).

Legend: W ranks, L experts owned by this rank, M experts materialized on this rank (owned ones included),
X elements of one expert (w1, w3 and w2 flattened and concatenated).

    spAG(P0 -> P1):  materialized_MX[slot(e)] = owned_{owner(e)}_LX[row(e)]   for every e that P1 places here
    spRS(P1 -> P0):  grad_owned_LX[row(e)]    = sum over the ranks w materializing e of grad_materialized_w[slot_w(e)]

Each is ONE all-to-all with per-peer splits: an owner sends an expert to exactly the ranks that P1 places it on
(besides itself), so the volume is proportional to the replicas placed, not to all experts as in an FSDP all-gather.
spRS is the transpose of spAG, which makes `SparseAllGather` an autograd function whose backward is spRS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moetrain.parallel.dispatch.placement import Placement


@dataclass
class GatherPlan:
    """What this rank sends and receives for one placement."""

    send_rows: torch.Tensor  # owned row indices to send, grouped by destination rank (ascending), then by expert id
    send_splits: list[int]  # experts sent to each rank
    recv_splits: list[int]  # experts received from each rank
    recv_slots: torch.Tensor  # materialized slot of each received expert, in arrival order
    owned_slots: torch.Tensor  # materialized slot of each owned row
    num_materialized: int

    @property
    def experts_sent(self) -> int:
        return int(sum(self.send_splits))


def build_gather_plan(placement: Placement, owned_ids: list[int], rank: int) -> GatherPlan:
    """`owned_ids[i]` is the global id of owned row i (must equal placement's owners for this rank)."""
    W = placement.world_size
    mine = placement.materialized(rank)
    slot = {e: i for i, e in enumerate(mine)}
    row = {e: i for i, e in enumerate(owned_ids)}
    send_rows, send_splits = [], []
    for dst in range(W):
        experts = [e for e in owned_ids if dst != rank and dst in placement.replicas[e]] if dst != rank else []
        experts.sort()
        send_rows += [row[e] for e in experts]
        send_splits.append(len(experts))
    recv_slots, recv_splits = [], []
    for src in range(W):
        experts = [e for e in mine if src != rank and placement.owner(e) == src]
        recv_slots += [slot[e] for e in experts]
        recv_splits.append(len(experts))
    return GatherPlan(torch.tensor(send_rows, dtype=torch.long), send_splits, recv_splits,
                      torch.tensor(recv_slots, dtype=torch.long),
                      torch.tensor([slot[e] for e in owned_ids], dtype=torch.long), len(mine))


def _all_to_all_rows(send_NX: torch.Tensor, send_splits, recv_splits, group) -> torch.Tensor:
    X = send_NX.shape[1]
    recv = send_NX.new_empty(sum(recv_splits), X)
    if dist.get_world_size(group) > 1:
        dist.all_to_all_single(recv, send_NX.contiguous(), [n for n in recv_splits], [n for n in send_splits],
                               group=group)
    return recv


def sparse_all_gather(owned_LX: torch.Tensor, plan: GatherPlan, group) -> torch.Tensor:
    """materialized_MX from owned_LX (see module docstring)."""
    device = owned_LX.device
    send = owned_LX.index_select(0, plan.send_rows.to(device))
    recv = _all_to_all_rows(send, plan.send_splits, plan.recv_splits, group)
    out = owned_LX.new_empty(plan.num_materialized, owned_LX.shape[1])
    out.index_copy_(0, plan.owned_slots.to(device), owned_LX)
    if recv.shape[0]:
        out.index_copy_(0, plan.recv_slots.to(device), recv)
    return out


def sparse_reduce_scatter(grad_MX: torch.Tensor, plan: GatherPlan, group) -> torch.Tensor:
    """grad_owned_LX: each owned expert's gradient summed over all its replicas (see module docstring)."""
    device = grad_MX.device
    grad_owned = grad_MX.index_select(0, plan.owned_slots.to(device))
    back = grad_MX.index_select(0, plan.recv_slots.to(device))
    recv = _all_to_all_rows(back, plan.recv_splits, plan.send_splits, group)
    if recv.shape[0]:
        grad_owned.index_add_(0, plan.send_rows.to(device), recv)
    return grad_owned


class SparseAllGather(torch.autograd.Function):
    """Autograd pairing: forward spAG, backward spRS. `on_backward` (optional) runs first in backward."""

    @staticmethod
    def forward(ctx, owned_LX, plan, group, on_backward=None):
        ctx.plan, ctx.group, ctx.on_backward = plan, group, on_backward
        return sparse_all_gather(owned_LX, plan, group)

    @staticmethod
    def backward(ctx, grad_MX):
        if ctx.on_backward is not None:
            ctx.on_backward()
        return sparse_reduce_scatter(grad_MX.contiguous(), ctx.plan, ctx.group), None, None, None
