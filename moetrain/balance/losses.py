"""Router balance losses: Switch/GShard aux loss, DeepSeek-V3 sequence-wise aux loss, z-loss.

Legend: T tokens, E experts, K top-k, B batch (sequences), S sequence length.

All three are pure functions of the router outputs, computed in fp32, and differentiable with respect to the scores
(or logits). Expert choices and token counts are integers and never carry a gradient.

Scores and normalisation. `scores_*E` are the router scores: softmax probabilities, or sigmoid scores for sigmoid
routers. Both aux losses use per-token normalised scores

    s'_{t,i} = s_{t,i} / sum_j s_{t,j}

which is the identity for softmax (rows already sum to one, and the gradient with respect to the logits is unchanged)
and turns sigmoid scores into a distribution over experts (DeepSeek-V3's convention).

    switch_aux_loss = coeff * E * sum_i f_i * P_i          f_i = c_i / sum_j c_j,  P_i = mean_t s'_{t,i}
    seq_aux_loss    = coeff * mean_b sum_i f_{b,i} P_{b,i}  f_{b,i} = E / (K*S) * c_{b,i},  P_{b,i} = mean_s s'_{b,s,i}
    z_loss          = coeff * mean_t (logsumexp_i logits_{t,i})^2

With perfectly balanced routing and uniform scores both aux losses equal `coeff`.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["switch_aux_loss", "seq_aux_loss", "z_loss"]


def _normalise_scores(scores_xE: torch.Tensor) -> torch.Tensor:
    """s'_{t,i} = s_{t,i} / sum_j s_{t,j} in fp32 (identity for softmax probabilities)."""
    scores_xE = scores_xE.float()
    return scores_xE / scores_xE.sum(-1, keepdim=True).clamp_min(1e-20)


def _check_idx(topk_idx: torch.Tensor, num_experts: int, name: str) -> None:
    if topk_idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor of expert ids, got {topk_idx.dtype}")
    if topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= num_experts):
        raise ValueError(f"{name} holds expert ids outside [0, {num_experts})")


def switch_aux_loss(
    scores_TE: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    coeff: float,
    tokens_per_expert_E: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Switch/GShard load-balancing loss `coeff * E * sum_i f_i * P_i` (a 0-d fp32 tensor).

    f_i: fraction of the T*K routed copies that chose expert i, `c_i / sum_j c_j` (no gradient). By default c is counted
        from `topk_idx_TK` on this rank. Pass `tokens_per_expert_E` (counts already all-reduced over the data-parallel
        ranks) to use the global fraction: then the data-parallel mean of the per-rank losses equals the single-process
        loss over the global batch (for equal per-rank token counts), since P is linear in the tokens.
    P_i: mean over this rank's tokens of the normalised score s'_{t,i} (see the module docstring). The gradient reaches
        the scores only through P.
    """
    if scores_TE.dim() != 2 or scores_TE.shape[1] != num_experts:
        raise ValueError(f"scores_TE must have shape (T, {num_experts}), got {tuple(scores_TE.shape)}")
    if topk_idx_TK.dim() != 2 or topk_idx_TK.shape[0] != scores_TE.shape[0]:
        raise ValueError(
            f"topk_idx_TK must have shape (T, K) with T={scores_TE.shape[0]}, got {tuple(topk_idx_TK.shape)}"
        )
    _check_idx(topk_idx_TK, num_experts, "topk_idx_TK")
    if scores_TE.shape[0] == 0:
        return scores_TE.float().sum() * 0.0
    with torch.no_grad():
        if tokens_per_expert_E is None:
            counts_E = torch.bincount(topk_idx_TK.flatten().long(), minlength=num_experts).float()
        else:
            if tokens_per_expert_E.numel() != num_experts:
                raise ValueError(
                    f"tokens_per_expert_E must have {num_experts} entries, got {tokens_per_expert_E.numel()}"
                )
            counts_E = tokens_per_expert_E.detach().reshape(-1).float().to(scores_TE.device)
        f_E = counts_E / counts_E.sum().clamp_min(1.0)
    P_E = _normalise_scores(scores_TE).mean(0)
    return coeff * num_experts * (f_E * P_E).sum()


def seq_aux_loss(scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor, num_experts: int, coeff: float,
                 keep_BSK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (a 0-d fp32 tensor).

    Per sequence b:  f_{b,i} = E / N_b * #{s : expert i in topk_idx[b, s], the copy kept}   (no gradient;
                     `keep_BSK` marks the copies the router kept, default all; N_b = the kept copies of sequence b,
                     K*S without a mask)
                     P_{b,i} = mean_s s'_{b,s,i},   s' = s / sum_j s_j
    loss = coeff * mean_b sum_i f_{b,i} * P_{b,i}
    """
    if scores_BSE.dim() != 3 or scores_BSE.shape[2] != num_experts:
        raise ValueError(f"scores_BSE must have shape (B, S, {num_experts}), got {tuple(scores_BSE.shape)}")
    if topk_idx_BSK.dim() != 3 or topk_idx_BSK.shape[:2] != scores_BSE.shape[:2]:
        raise ValueError(
            f"topk_idx_BSK must have shape (B, S, K) with (B, S)={tuple(scores_BSE.shape[:2])}, "
            f"got {tuple(topk_idx_BSK.shape)}"
        )
    _check_idx(topk_idx_BSK, num_experts, "topk_idx_BSK")
    B, S, K = topk_idx_BSK.shape
    if B == 0 or S == 0:
        return scores_BSE.float().sum() * 0.0
    with torch.no_grad():
        counts_BE = torch.zeros(B, num_experts, dtype=torch.float32, device=scores_BSE.device)
        idx_BR = topk_idx_BSK.reshape(B, S * K).long()
        ones_BR = torch.ones_like(idx_BR, dtype=torch.float32) if keep_BSK is None else \
            keep_BSK.reshape(B, S * K).float()
        counts_BE.scatter_add_(1, idx_BR, ones_BR)
        # f = E * count / (copies of the sequence): K*S copies, or the kept ones when a keep mask is given (so the
        # value does not depend on the width of the (S, K) layout a router with a variable number of experts uses)
        copies_B1 = torch.full((B, 1), float(K * S), device=scores_BSE.device) if keep_BSK is None else \
            keep_BSK.reshape(B, S * K).float().sum(1, keepdim=True).clamp_min(1.0)
        f_BE = counts_BE * num_experts / copies_B1
    P_BE = _normalise_scores(scores_BSE).mean(1)
    return coeff * (f_BE * P_BE).sum(-1).mean()


def z_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """Router z-loss `coeff * mean_t (logsumexp_i logits_{t,i})^2` (ST-MoE), a 0-d fp32 tensor."""
    if logits_TE.dim() != 2:
        raise ValueError(f"logits_TE must have shape (T, E), got {tuple(logits_TE.shape)}")
    logits_TE = logits_TE.float()
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return coeff * torch.logsumexp(logits_TE, dim=-1).square().mean()
