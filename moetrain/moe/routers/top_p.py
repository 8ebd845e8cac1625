"""Dynamic top-p routing (Huang et al. 2024, "Harder Tasks Need More Experts", arXiv 2403.07652).

Legend: T tokens, D model dim, E experts, K = top_k, the most experts a token may get (a cap; K = E is no cap).

A token takes experts in order of probability until their cumulative probability reaches the threshold p: a
confident router (one dominant expert) gives a token one expert, an unsure one gives it several.

    P_TE      = softmax(x_TD @ W_gate^T)
    order_TE  = experts sorted by P_TE + bias_E, descending      (the balancing bias only orders, never scales a gate;
                                                                  ties go to the lower expert id)
    before_TE = cumulative P of the experts ranked above, in that order: before[t, 0] = 0, before[t, j] =
                sum_{i<j} P[t, order[t, i]]
    keep_TE   = before_TE < p                                    (the first expert is always kept; the expert that
                                                                  makes the sum reach p is the last one kept)
    topk_idx_TK = order_TE[:, :K],  keep_TK = keep_TE[:, :K]     (the cap)
    gates_TK  = P_TE[topk_idx_TK] * keep_TK                      (no renormalisation, as in the paper; the preset sets
                                                                  norm_topk_prob=false, route_scale applies)

The dynamic loss pushes the routing distribution to be sharp, so that a token does not simply take many experts:

    dynamic   = coeff * mean_t ( -sum_e P_te log P_te )          (this rank's tokens; no collective)

plus the shared losses as configured (the paper trains with the load-balancing loss: `aux`, computed on the kept
copies with counts global over the data-parallel ranks).

Seam: every token has K copy slots; keep_TK is False on the slots past its top-p set, which compute nothing and are
never sent; tokens_per_expert_E counts the kept copies only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from moetrain.config.schema import ModelConfig, RouterConfig
from moetrain.moe.routers.base import RouteContext, Router, RouterOutput, register


@dataclass
class TopPConfig(RouterConfig):
    """Dynamic top-p: top_k is the cap on experts per token."""

    method: str = "top_p"
    threshold: float = 0.4  # p: keep experts until their cumulative probability reaches p (the paper's value)
    dynamic_loss_coeff: float = 1e-4  # weight of the routing-entropy loss (the paper's value); 0 turns it off


def select_top_p(probs_TE: torch.Tensor, order_by_TE: torch.Tensor, threshold: float,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx_TK, keep_TK): experts in order of `order_by_TE` (descending, ties to the lower id), kept while the
    cumulative `probs_TE` of the experts ranked above stays below `threshold`, at most k per token."""
    order_TE = torch.sort(order_by_TE, dim=-1, descending=True, stable=True).indices
    sorted_TE = probs_TE.gather(1, order_TE)
    before_TE = torch.cat([torch.zeros_like(sorted_TE[:, :1]), sorted_TE.cumsum(-1)[:, :-1]], dim=1)
    keep_TE = before_TE < threshold
    keep_TE[:, 0] = True
    return order_TE[:, :k].contiguous(), keep_TE[:, :k].contiguous()


def routing_entropy_loss(logits_TE: torch.Tensor, coeff: float) -> torch.Tensor:
    """coeff * mean_t -sum_e P_te log P_te with P = softmax(logits) (a 0-d fp32 tensor; log-softmax for stability)."""
    logits_TE = logits_TE.float()
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    logp_TE = torch.log_softmax(logits_TE, dim=-1)
    return coeff * -(logp_TE.exp() * logp_TE).sum(-1).mean()


@register("top_p")
class TopPRouter(Router):
    config_cls = TopPConfig

    @classmethod
    def experts_per_token(cls, cfg: TopPConfig, num_experts: int) -> float:
        """The cap top_k: an upper bound (the telemetry measures the real number per layer)."""
        return float(min(cfg.top_k, num_experts))

    @classmethod
    def check(cls, cfg: TopPConfig, model: ModelConfig) -> Iterator[str]:
        p = cfg.threshold
        if not (math.isfinite(p) and 0 < p <= 1):
            yield (f"router.threshold={p} must be in (0, 1] (the cumulative probability router=top_p keeps "
                   f"experts up to; the paper uses 0.4)")
        c = cfg.dynamic_loss_coeff
        if not (math.isfinite(c) and c >= 0):
            yield (f"router.dynamic_loss_coeff={c} must be >= 0 and finite (the routing-entropy loss weight; 0 "
                   f"turns it off, the paper uses 1e-4)")
        if cfg.score_func == "sigmoid":
            yield ("router.score_func=sigmoid does not work with router=top_p, which thresholds the cumulative "
                   "softmax probability; set router.score_func=softmax")

    def route(self, x_TD: torch.Tensor, ctx: RouteContext) -> RouterOutput:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        probs_TE = self.scores(logits_TE)
        with torch.no_grad():
            probs = probs_TE.detach()
            topk_idx_TK, keep_TK = select_top_p(probs, probs + self.expert_bias_E, cfg.threshold,
                                                min(cfg.top_k, self.num_experts))
        gates_TK = self.finish_gates(probs_TE.gather(1, topk_idx_TK).masked_fill(~keep_TK, 0.0), keep_TK)
        return RouterOutput(topk_idx_TK, gates_TK, probs_TE, logits_TE, self.count(topk_idx_TK, keep_TK), keep_TK)

    def losses(self, routed: RouterOutput, ctx: RouteContext) -> dict[str, torch.Tensor]:
        """The shared losses as configured, plus the dynamic (routing-entropy) loss."""
        terms = super().losses(routed, ctx)
        if self.cfg.dynamic_loss_coeff > 0:
            terms["dynamic"] = routing_entropy_loss(routed.logits_TE, self.cfg.dynamic_loss_coeff)
        return terms
