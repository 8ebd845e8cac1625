"""Deduplicated all-to-all: a token travels once per (destination rank, chunk) that computes any of its copies, not
once per routed copy; the destination expands the rows into copies on arrival and sums the copies' gated outputs
before sending them back.

Legend: T tokens on this rank, K top-k, E experts, W ranks, n pipeline chunks, B = W*n blocks b = dest*n + chunk,
R routed copies leaving this rank (the routing plan's rows, padding included, ordered (destination, chunk, expert)),
U unique rows leaving this rank, C copies computed in a chunk here, Ur unique rows arriving in that chunk.

Source (`unique_rows`, `send_rows`). Copy (t, k) of block b_tk shares its row with the other copies of t in b_tk:
    ord_TK[t, k]  = #{k' : b_tk' == b_tk and expert_tk' < expert_tk}     (0: the block's representative of t)
    u_R           = index of the row's representative among all representatives, in copy order
    unique_B[b]   = representatives in block b
    meta_R        = (u_R - first u of its block) * K + ord_R            (-1 for a padding row: it has no token)
The unique rows are sent in (chunk, destination) order, x_UD = x_TD[token_U], so each chunk is one all-to-all;
meta_R and the gates travel in copy order, one all-to-all each for all chunks.
Destination (`expand_index`): the arriving copies are regrouped from (source, expert) to (expert, source) blocks
(the grouped GEMM's layout); copy c of a chunk, from source s:
    uidx_C[c] = meta_C[c] // K_s + (first row of s among the chunk's arrivals)    (Ur for padding: a zero row)
    (K_s: the source's copy width, sent with its counts: ranks may differ, e.g. under expert choice)
    x_CD      = x_UrD[uidx_C]                                     expand: kernels/permute.py permute
    y_UrD[u]  = sum over the copies c of u of gates_C[c] * y_CD[c]       reduce: kernels/permute.py combine
Back at the source: y_TD[t] = sum over the unique rows u of t of y_UD[u] (moe/plan.py sum_unique_rows).
Padding rows (capacity mode with pad_to_capacity) carry no token: they do not travel, the expand gives them zero
rows, so every expert still computes exactly `capacity` rows; their gate is 0 and the reduce drops them.
The inverse maps row_TK / row_UK (row of the k-th copy of a token / unique row, -1 if none) feed the gather-only
Triton kernels; ord is each copy's column there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UniqueRows:
    meta_R: torch.Tensor  # int64, per copy: local unique index * K + ord, -1 for padding
    unique_B: torch.Tensor  # int64, unique rows per block (dest, chunk)
    u_R: torch.Tensor  # int64, global unique index of each copy in block order (-1 for padding)
    rep_R: torch.Tensor  # bool, the copy is its block's representative of its token (it gives the row)


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def unique_rows(copy_idx_R: torch.Tensor, block_R: torch.Tensor, expert_R: torch.Tensor, num_tokens: int,
                top_k: int, num_blocks: int) -> UniqueRows:
    """The shared rows of the copies (module docstring). Rows are in (block, expert, token) order; copy_idx_R is
    t*K + k (-1 for padding). Device-side only: no host synchronisation."""
    T, K, R = num_tokens, top_k, copy_idx_R.shape[0]
    device = copy_idx_R.device
    valid_R = copy_idx_R >= 0
    slot_R = torch.where(valid_R, copy_idx_R, T * K)  # slot T*K: a dump for padding rows
    block_TK = torch.full((T * K + 1,), -1, dtype=torch.long, device=device).index_put_((slot_R,), block_R)
    expert_TK = torch.zeros(T * K + 1, dtype=torch.long, device=device).index_put_((slot_R,), expert_R)
    block_TK, expert_TK = block_TK[:-1].view(T, K), expert_TK[:-1].view(T, K)
    same_TKK = (block_TK[:, :, None] == block_TK[:, None, :]) & (block_TK[:, None, :] >= 0)
    ord_TK = (same_TKK & (expert_TK[:, None, :] < expert_TK[:, :, None])).sum(-1)
    rep_k_TK = (same_TKK & (ord_TK[:, None, :] == 0)).to(torch.uint8).argmax(-1)  # k' of (t, k)'s representative
    ord_R = torch.cat([ord_TK.flatten(), ord_TK.new_full((1,), -1)])[slot_R]
    rep_R = ord_R == 0
    pos_R = _exclusive_cumsum(rep_R.long())  # for a representative: its unique index
    u_of_copy = torch.full((T * K + 1,), -1, dtype=torch.long, device=device).index_put_((slot_R,), pos_R)
    rep_copy_TK = torch.arange(T, device=device)[:, None] * K + rep_k_TK
    rep_copy_R = torch.cat([rep_copy_TK.flatten(), rep_copy_TK.new_full((1,), T * K)])[slot_R]
    u_R = torch.where(valid_R, u_of_copy[rep_copy_R], -1)
    unique_B = torch.zeros(num_blocks, dtype=torch.long, device=device).index_add_(0, block_R, rep_R.long())
    first_B = _exclusive_cumsum(unique_B)
    meta_R = torch.where(valid_R, (u_R - first_B[block_R]) * K + ord_R, -1)
    assert R == meta_R.shape[0]
    return UniqueRows(meta_R, unique_B, u_R, rep_R)


def send_rows(rows: UniqueRows, token_idx_R: torch.Tensor, copy_idx_R: torch.Tensor, block_R: torch.Tensor,
              num_chunks: int, num_unique: int, num_tokens: int, top_k: int, with_row_map: bool):
    """(token_U, row_TK): the source token of each unique row in send order (chunk, destination), and (when
    `with_row_map`, for the Triton kernels) the inverse map row_TK[t, k] = send position of the row whose
    representative is copy (t, k), else -1. `num_unique` = unique_B.sum() as a host int (known from the count
    exchange)."""
    W = rows.unique_B.shape[0] // num_chunks
    unique_WN = rows.unique_B.view(W, num_chunks)
    first_dc_B = _exclusive_cumsum(rows.unique_B)
    first_cd_B = _exclusive_cumsum(unique_WN.t().flatten()).view(num_chunks, W).t().flatten()
    send_pos_R = rows.u_R - first_dc_B[block_R] + first_cd_B[block_R]
    target_R = torch.where(rows.rep_R, send_pos_R, num_unique)  # non-representatives write to a dump slot
    token_U = token_idx_R.new_zeros(num_unique + 1).index_put_((target_R,), token_idx_R)[:num_unique]
    row_TK = None
    if with_row_map:
        T, K = num_tokens, top_k
        slot_R = torch.where(rows.rep_R, copy_idx_R, T * K)
        row_TK = torch.full((T * K + 1,), -1, dtype=torch.long, device=token_U.device).index_put_(
            (slot_R,), send_pos_R)[:-1].view(T, K)
    return token_U, row_TK


def expand_index(meta_C: torch.Tensor, source_C: torch.Tensor, recv_splits: list[int], top_k_W: torch.Tensor,
                 with_row_map: bool):
    """(uidx_C, row_UK) of one chunk at the destination (module docstring): the arriving unique row each copy expands
    from (Ur for padding), and, when `with_row_map`, the inverse map row_UK[u, ord] = copy c (-1 if none).
    top_k_W: each source's copy width K_s, the stride of its metadata (routers may give ranks different widths:
    expert choice's K is the most experts any of the rank's tokens got); row_UK has max_s K_s columns."""
    Ur = sum(recv_splits)
    first_W = _exclusive_cumsum(torch.tensor(recv_splits, dtype=torch.long)).to(meta_C.device)
    pad_C = meta_C < 0
    top_k_W = top_k_W.to(meta_C.device)
    K_C = top_k_W[source_C]
    uidx_C = torch.where(pad_C, Ur, meta_C // K_C + first_W[source_C])
    row_UK = None
    if with_row_map:
        K = int(top_k_W.max()) if top_k_W.numel() else 1
        cell_C = torch.where(pad_C, Ur * K, uidx_C * K + meta_C % K_C)  # padding copies write to a dump cell
        row_UK = torch.full((Ur * K + 1,), -1, dtype=torch.long, device=meta_C.device).index_put_(
            (cell_C,), torch.arange(meta_C.shape[0], device=meta_C.device))[:-1].view(Ur, K)
    return uidx_C, row_UK
