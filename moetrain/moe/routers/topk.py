"""Token-choice top-k routing (the default): each token picks its K best experts.

Legend: T tokens, E experts, K top-k, G expert groups.

    scores_TE = softmax(logits_TE) | sigmoid(logits_TE)
    topk_idx_TK = topk(scores_TE + bias_E)        # the bias only selects (DeepSeek-V3), it never scales a gate
    gates_TK = scores_TE[topk_idx_TK]; gates /= sum_k gates (if norm_topk_prob); gates *= route_scale

Group-limited routing (num_groups G > 1): experts form G equal groups; a group's score is the sum of its
top-(K/topk_groups) biased scores; only the experts of the best `topk_groups` groups stay eligible.

Forced-balanced routing (benchmarking): token t picks experts (t*K + k) mod E, so every expert gets T*K/E copies.
Every copy is kept (no keep mask); a capacity, if configured, drops copies later, in the dispatcher's plan.
"""

from __future__ import annotations

import torch

from moetrain.config.schema import RouterConfig
from moetrain.moe.routers.base import RouteContext, Router, RouterOutput, register


@register("topk")
class TopKRouter(Router):
    config_cls = RouterConfig

    def route(self, x_TD: torch.Tensor, ctx: RouteContext) -> RouterOutput:
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        scores_TE = self.scores(logits_TE)
        with torch.no_grad():
            if cfg.force_balanced:
                topk_idx_TK = balanced_assignment(x_TD.shape[0], E, K, x_TD.device)
            else:
                topk_idx_TK = select_topk(scores_TE.detach() + self.expert_bias_E, K, cfg.num_groups, cfg.topk_groups)
        gates_TK = self.finish_gates(scores_TE.gather(1, topk_idx_TK))
        return RouterOutput(topk_idx_TK, gates_TK, scores_TE, logits_TE, self.count(topk_idx_TK))


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
