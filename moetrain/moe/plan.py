"""Local routing plan: which token copy goes to which expert, in expert order, with optional capacity.

Legend: T tokens on this rank, D model dim, E experts (global), K top-k, R routed rows (kept copies + padding).

Every dispatcher starts from the same plan:
    order_R     = the kept (token, k) copies sorted by expert id (stable: token order inside an expert); a copy is
                  kept when the router kept it (`keep_TK`, default all) and the capacity (if any) has room for it
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

from moetrain.kernels import permute as kernels
from moetrain.kernels.grouped_gemm import without_autocast


@dataclass
class RoutingPlan:
    token_idx_R: torch.Tensor
    gates_R: torch.Tensor
    tokens_per_expert_E: torch.Tensor  # int64, rows per expert including padding
    num_tokens: int  # T
    num_dropped: int  # dropped (token, k) copies
    padded: bool
    copy_idx_R: torch.Tensor  # flat copy id t*K + k of each row; -1 for padding
    top_k: int

    @property
    def num_rows(self) -> int:
        return int(self.token_idx_R.shape[0])

    @property
    def num_chunks(self) -> int:
        return 1

    @property
    def row_TK(self) -> torch.Tensor:
        """Inverse map: the row of copy (t, k), -1 if the copy was dropped (used by the gather-only GPU kernels)."""
        R = self.num_rows
        row = torch.full((self.num_tokens * self.top_k,), -1, dtype=torch.long, device=self.copy_idx_R.device)
        valid = self.copy_idx_R >= 0
        row[self.copy_idx_R[valid]] = torch.arange(R, device=row.device)[valid]
        return row.view(self.num_tokens, self.top_k)

    def reordered(self, order_R: torch.Tensor) -> "RoutingPlan":
        """The same plan with its rows taken in `order_R` order."""
        return RoutingPlan(self.token_idx_R[order_R], self.gates_R[order_R], self.tokens_per_expert_E,
                           self.num_tokens, self.num_dropped, self.padded, self.copy_idx_R[order_R], self.top_k)


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """capacity = ceil(T*K/E * capacity_factor)."""
    return math.ceil(num_tokens * top_k / num_experts * capacity_factor)


def build_plan(topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor, num_experts: int,
               capacity_factor: Optional[float] = None, pad_to_capacity: bool = False,
               keep_TK: Optional[torch.Tensor] = None) -> RoutingPlan:
    """The plan of the routed copies (t, k) of `topk_idx_TK`: copy t*K + k goes to expert topk_idx_TK[t, k] with
    gate gates_TK[t, k]. `keep_TK` (bool) marks the copies the router kept: a copy it did not keep (a token given
    fewer than K experts, a null expert, an expert that did not choose the token) computes nothing, exactly like a
    copy dropped by the capacity, but is not counted as dropped. Capacity (if any) applies to the kept copies."""
    T, K = topk_idx_TK.shape
    expert_R = topk_idx_TK.flatten()
    if keep_TK is not None:  # copies the router did not keep go to a sentinel expert E that keeps nothing
        expert_R = torch.where(keep_TK.flatten(), expert_R, torch.full_like(expert_R, num_experts))
    gates_flat = gates_TK.flatten()
    counts_E = torch.bincount(expert_R, minlength=num_experts + 1)[:num_experts]
    num_routed = expert_R.numel() if keep_TK is None else int(counts_E.sum())
    if capacity_factor is None:
        order_R = torch.argsort(expert_R, stable=True)[:num_routed]
        return RoutingPlan(order_R // K, gates_flat[order_R], counts_E, T, 0, False, order_R, K)

    capacity = capacity_for(T, K, num_experts, capacity_factor) if keep_TK is None else \
        math.ceil(num_routed / num_experts * capacity_factor)
    # Sort by gate (descending), then stably by expert: inside each expert the highest gates come first.
    by_gate = torch.argsort(gates_flat.detach(), descending=True, stable=True)
    order_R = by_gate[torch.argsort(expert_R[by_gate], stable=True)][:num_routed]
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
        return RoutingPlan(token_idx_R, gates_R, kept_counts_E, T, num_dropped, False, kept, K)

    # Pad every expert to exactly `capacity` rows: padding rows read token T (a zero row) with gate 0.
    slot_E = torch.arange(num_experts, device=kept.device) * capacity
    kept_starts_E = torch.cumsum(kept_counts_E, 0) - kept_counts_E
    dest_R = slot_E[expert_R[kept]] + torch.arange(kept.numel(), device=kept.device) - kept_starts_E[expert_R[kept]]
    padded_idx = torch.full((num_experts * capacity,), T, dtype=torch.long, device=kept.device)
    padded_gates = gates_R.new_zeros(num_experts * capacity)
    padded_idx[dest_R] = token_idx_R
    padded_gates = padded_gates.index_put((dest_R,), gates_R)
    padded_copy = torch.full((num_experts * capacity,), -1, dtype=torch.long, device=kept.device)
    padded_copy[dest_R] = kept
    full_E = torch.full_like(counts_E, capacity)
    return RoutingPlan(padded_idx, padded_gates, full_E, T, num_dropped, True, padded_copy, K)


class _PermuteRows(torch.autograd.Function):
    """out = x[idx] for a permutation idx; backward is the gather by its inverse (no zero-fill + scatter-add).
    Dtype-preserving both ways (bf16 rows under mixed precision stay bf16; index_select is not autocast)."""

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


def _row_TK(plan: RoutingPlan, device: torch.device) -> torch.Tensor | None:
    return plan.row_TK if kernels.resolve_backend("auto", device) == "triton" else None


def permute(x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """x_RD = x_TD[token_idx_R] (padding rows are zeros); kernels/permute.py picks the backend by device."""
    return kernels.permute(x_TD, plan.token_idx_R, _row_TK(plan, x_TD.device))


def unpermute(y_RD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """y_TD[t] = sum over rows r of token t of gates_R[r] * y_RD[r], accumulated in fp32; the result has the dtype of
    promote(y, gates): fp32 for bf16 rows (the router's gates are fp32)."""
    if hasattr(y_RD, "trigger_wait"):  # an in-flight all-to-all result (AsyncCollectiveTensor): wait for it here
        y_RD = y_RD.wait()
    return kernels.combine(y_RD, plan.gates_R, plan.token_idx_R, plan.num_tokens, _row_TK(plan, y_RD.device))


class _SumUniqueRows(torch.autograd.Function):
    """y_TD[t] = sum over the rows u of token t of y_UD[u] (fp32 accumulation; the result in promote(y, fp32)); the
    backward is the gather dy_UD = dy_TD[token_U] - the adjoint pair of `permute`, in the opposite direction."""

    @staticmethod
    @without_autocast
    def forward(ctx, y_UD, token_U, row_TK, num_tokens, backend):
        ctx.save_for_backward(token_U)
        ctx.backend, ctx.y_dtype = backend, y_UD.dtype
        return kernels.sum_rows_per_token(y_UD, None, token_U, row_TK, num_tokens, backend,
                                          torch.promote_types(y_UD.dtype, torch.float32))

    @staticmethod
    @without_autocast
    def backward(ctx, dy_TD):
        (token_U,) = ctx.saved_tensors
        dy_UD = kernels.gather_rows(dy_TD.contiguous(), token_U, None, ctx.backend).to(ctx.y_dtype)
        return dy_UD, None, None, None, None


def sum_unique_rows(y_UD: torch.Tensor, token_U: torch.Tensor, num_tokens: int,
                    row_TK: torch.Tensor | None = None) -> torch.Tensor:
    """y_TD[t] = sum over the rows u with token_U[u] == t of y_UD[u]: the deduplicated all-to-all's last step, where
    each row already is the gated sum of a token's copies on one rank. The triton backend needs row_TK."""
    return _SumUniqueRows.apply(y_UD, token_U, row_TK, num_tokens, kernels.resolve_backend("auto", y_UD.device))
