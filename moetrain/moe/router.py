"""Token router: scores, (group-limited) top-k selection with the aux-loss-free bias, gates.

Legend: T tokens, D model dim, E experts, K top-k, G expert groups.

    logits_TE = x_TD @ W_gate^T                                      (fp32)
    scores_TE = softmax(logits_TE) | sigmoid(logits_TE)
    topk_idx_TK = topk(scores_TE + bias_E)        # the bias only selects (DeepSeek-V3), it never scales a gate
    gates_TK = scores_TE[topk_idx_TK]; gates /= sum_k gates (if norm_topk_prob); gates *= route_scale

Group-limited routing (num_groups G > 1): experts form G equal groups; a group's score is the sum of its top-(K/topk_groups)
biased scores; only the experts of the best `topk_groups` groups stay eligible.

Forced-balanced routing (benchmarking): token t picks experts (t*K + k) mod E, so every expert gets T*K/E copies.

The router counts its decision once, `tokens_per_expert_E` (routed copies per expert, fp32); the layer, its losses
and the balance controller all use that count. Its decision is a set of copies (token t, expert topk_idx_TK[t, k],
gate gates_TK[t, k]) with a keep mask `keep_TK`: a copy not kept computes nothing anywhere (plan, dispatchers,
FSSDP), the same mechanism as a capacity drop, so variable or zero experts per token need nothing else downstream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from moetrain.config.schema import RouterConfig


@dataclass
class RouterOutput:
    topk_idx_TK: torch.Tensor  # int64 expert ids
    gates_TK: torch.Tensor  # fp32 combine weights
    scores_TE: torch.Tensor  # fp32 scores (softmax probs or sigmoid)
    logits_TE: torch.Tensor  # fp32 raw logits
    tokens_per_expert_E: torch.Tensor  # fp32 routed copies per expert (bincount of the kept topk_idx_TK)
    keep_TK: Optional[torch.Tensor] = None  # bool: copies the router kept (None: all). A router may give a token
    #                                         fewer than K experts, or none: its other copies compute nothing


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))

    def reset_parameters(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        self.expert_bias_E.zero_()

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        logits_TE = nn.functional.linear(x_TD.float(), self.gate.weight.float())
        if cfg.score_func == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        with torch.no_grad():
            if cfg.force_balanced:
                topk_idx_TK = balanced_assignment(x_TD.shape[0], E, K, x_TD.device)
            else:
                topk_idx_TK = select_topk(scores_TE.detach() + self.expert_bias_E, K, cfg.num_groups, cfg.topk_groups)
        gates_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob and K > 1:
            gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if cfg.route_scale != 1.0:
            gates_TK = gates_TK * cfg.route_scale
        tokens_per_expert_E = torch.bincount(topk_idx_TK.flatten(), minlength=E).float()
        return RouterOutput(topk_idx_TK, gates_TK, scores_TE, logits_TE, tokens_per_expert_E)


def select_topk(biased_TE: torch.Tensor, k: int, num_groups: int = 1, topk_groups: int = 1) -> torch.Tensor:
    """Top-k expert ids per token, optionally restricted to the best `topk_groups` of `num_groups` groups."""
    if num_groups > 1:
        T, E = biased_TE.shape
        grouped_TGE = biased_TE.view(T, num_groups, E // num_groups)
        per_group = max(1, k // topk_groups)
        group_scores_TG = grouped_TGE.topk(min(per_group, E // num_groups), dim=-1).values.sum(-1)
        keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_scores_TG.topk(topk_groups, dim=-1).indices, True)
        biased_TE = grouped_TGE.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)
    return biased_TE.topk(k, dim=-1).indices


def balanced_assignment(num_tokens: int, num_experts: int, k: int, device) -> torch.Tensor:
    """topk_idx_TK[t, k] = (t*K + k) mod E: every expert gets the same load (up to one copy)."""
    copies = torch.arange(num_tokens * k, device=device)
    return (copies % num_experts).view(num_tokens, k)
