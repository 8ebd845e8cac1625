"""Local routing plan: which token copy goes to which expert, in expert order, with optional capacity.

Legend: T tokens on this rank, D model dim, E experts (global), K top-k, R routed rows (kept copies + padding).

Every dispatcher starts from the same plan:
    order_R     = the kept (token, k) copies sorted by expert id (stable: token order inside an expert)
    token_idx_R = order_R // K          source token of each routed row; T marks a padding row (zero input)
    gates_R     = gates_TK.flatten()[order_R]   (0 for padding)
    tokens_per_expert_E = rows per expert (kept copies, plus padding in pad mode)

Capacity mode (capacity_factor c): capacity = ceil(T*K/E * c) per expert on this rank; an expert with more copies keeps
the `capacity` with the highest gate and drops the rest (dropped copies contribute nothing to the output; the residual
stream carries the token). With pad_to_capacity every expert gets exactly `capacity` rows (static shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class RoutingPlan:
    token_idx_R: torch.Tensor
    gates_R: torch.Tensor
    tokens_per_expert_E: torch.Tensor  # int64, rows per expert including padding
    num_tokens: int  # T
    num_dropped: int  # dropped (token, k) copies
    padded: bool

    @property
    def num_rows(self) -> int:
        return int(self.token_idx_R.shape[0])


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """capacity = ceil(T*K/E * capacity_factor)."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def build_plan(topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor, num_experts: int,
               capacity_factor: Optional[float] = None, pad_to_capacity: bool = False) -> RoutingPlan:
    T, K = topk_idx_TK.shape
    expert_R = topk_idx_TK.flatten()
    gates_flat = gates_TK.flatten()
    if capacity_factor is None:
        order_R = torch.argsort(expert_R, stable=True)
        counts_E = torch.bincount(expert_R, minlength=num_experts)
        return RoutingPlan(order_R // K, gates_flat[order_R], counts_E, T, 0, False)

    capacity = capacity_for(T, K, num_experts, capacity_factor)
    # Sort by gate (descending), then stably by expert: inside each expert the highest gates come first.
    by_gate = torch.argsort(gates_flat.detach(), descending=True, stable=True)
    order_R = by_gate[torch.argsort(expert_R[by_gate], stable=True)]
    counts_E = torch.bincount(expert_R, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    sorted_expert_R = expert_R[order_R]
    rank_in_expert_R = torch.arange(order_R.numel(), device=order_R.device) - starts_E[sorted_expert_R]
    keep_R = rank_in_expert_R < capacity
    # Keep token order inside an expert for the kept copies (the same order as dropless when nothing is dropped).
    kept = order_R[keep_R]
    kept = kept[torch.argsort(expert_R[kept] * (T * K) + kept)]
    kept_counts_E = counts_E.clamp(max=capacity)
    num_dropped = int(order_R.numel() - kept.numel())
    token_idx_R, gates_R = kept // K, gates_flat[kept]
    if not pad_to_capacity:
        return RoutingPlan(token_idx_R, gates_R, kept_counts_E, T, num_dropped, False)

    # Pad every expert to exactly `capacity` rows: padding rows read token T (a zero row) with gate 0.
    slot_E = torch.arange(num_experts, device=kept.device) * capacity
    kept_starts_E = torch.cumsum(kept_counts_E, 0) - kept_counts_E
    dest_R = slot_E[expert_R[kept]] + torch.arange(kept.numel(), device=kept.device) - kept_starts_E[expert_R[kept]]
    padded_idx = torch.full((num_experts * capacity,), T, dtype=torch.long, device=kept.device)
    padded_gates = gates_R.new_zeros(num_experts * capacity)
    padded_idx[dest_R] = token_idx_R
    padded_gates = padded_gates.index_put((dest_R,), gates_R)
    full_E = torch.full_like(counts_E, capacity)
    return RoutingPlan(padded_idx, padded_gates, full_E, T, num_dropped, True)


class _PermuteRows(torch.autograd.Function):
    """out = x[idx] for a permutation idx; backward is the gather by its inverse (no zero-fill + scatter-add)."""

    @staticmethod
    def forward(ctx, x_RD, idx_R, inv_idx_R):
        ctx.save_for_backward(inv_idx_R)
        return x_RD.index_select(0, idx_R)

    @staticmethod
    def backward(ctx, dout_RD):
        (inv_idx_R,) = ctx.saved_tensors
        return dout_RD.index_select(0, inv_idx_R), None, None


def permute_rows(x_RD: torch.Tensor, idx_R: torch.Tensor, inv_idx_R: torch.Tensor) -> torch.Tensor:
    """x_RD[idx_R] where idx_R is a permutation of the rows and inv_idx_R its inverse."""
    return _PermuteRows.apply(x_RD, idx_R, inv_idx_R)


_CHUNK_BYTES = 4 << 20


class _Unpermute(torch.autograd.Function):
    """out_TD = index_add(zeros, token_idx_R, y_RD * gates_R[:, None]) with a fused backward:
    g_RD = dout[token_idx_R] is gathered once, d gates = rowwise <g, y> (a batched dot, no R x D temporary) and
    d y = g * gates in place."""

    @staticmethod
    def forward(ctx, y_RD, gates_R, token_idx_R, num_out: int):
        gates_R1 = gates_R.to(y_RD.dtype)[:, None]
        R, D = y_RD.shape
        out_TD = y_RD.new_zeros(num_out, D)
        # Weight and scatter in row chunks: the weighted temporary stays small (a full R x D one is a fresh large
        # allocation, which glibc maps and page-faults in anew every step).
        step = max(1, _CHUNK_BYTES // max(1, D * y_RD.element_size()))
        buf = y_RD.new_empty(min(step, R), D)
        for s in range(0, R, step):
            n = min(step, R - s)
            torch.mul(y_RD[s:s + n], gates_R1[s:s + n], out=buf[:n])
            out_TD.index_add_(0, token_idx_R[s:s + n], buf[:n])
        ctx.save_for_backward(y_RD if ctx.needs_input_grad[1] else None, gates_R1, token_idx_R)
        ctx.gates_dtype = gates_R.dtype
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        y_RD, gates_R1, token_idx_R = ctx.saved_tensors
        g_RD = dout_TD.index_select(0, token_idx_R)
        dgates = None
        if ctx.needs_input_grad[1]:
            R, D = g_RD.shape
            dgates = torch.bmm(g_RD.view(R, 1, D), y_RD.reshape(R, D, 1)).view(R).to(ctx.gates_dtype)
        dy = g_RD.mul_(gates_R1) if ctx.needs_input_grad[0] else None
        return dy, dgates, None, None


def permute(x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """x_RD = x_TD[token_idx_R] (padding rows are zeros)."""
    if plan.padded:
        x_TD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])
    return x_TD.index_select(0, plan.token_idx_R)


def unpermute(y_RD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """y_TD[t] = sum over rows r of token t of gates_R[r] * y_RD[r]."""
    if hasattr(y_RD, "trigger_wait"):  # an in-flight all-to-all result (AsyncCollectiveTensor): wait for it here
        y_RD = y_RD.wait()
    out_TD = _Unpermute.apply(y_RD, plan.gates_R, plan.token_idx_R, plan.num_tokens + int(plan.padded))
    return out_TD[: plan.num_tokens] if plan.padded else out_TD
