"""AdaMoE: token-adaptive routing with null experts (Zeng et al. 2024, arXiv 2406.13233).

Legend: T tokens, D model dim, E true (dispatched) experts, M null experts, X = E + M choices, K top-k over the X
choices.

The router scores E + M choices; a token takes its K best. A null expert outputs zero and costs nothing, so a token
that picks n null experts uses K - n true ones: anywhere from 0 to K (min(K, E)), decided per token.

    logits_TX = x_TD @ W_gate^T                        (one gate row per true and per null expert)
    scores_TX = softmax(logits_TX)                     (the paper; sigmoid is accepted too)
    choice_TK = top-K of scores_TX + [bias_E, 0_M]     (the balancing bias only on the true experts, only to select;
                                                        ties go to the lower choice id)
    keep_TK   = choice_TK < E                          (a null choice is never dispatched)
    gates_TK  = scores_TX[choice_TK] * keep_TK / sum_k (scores_TX[choice_TK] * keep_TK)      (norm_topk_prob)
                * route_scale                          (renormalised over the token's true experts, as the paper's
                                                        code does; a token with no true expert gets no output)
    y_TD      = sum_k gates_TK * expert_{choice_TK}(x_TD)      (null experts add zero)

Load balancing over the X choices with the null experts as one pool (they are identical, so only their average load
matters; the loss fixes how often tokens pick a null expert overall, not which null):

    c_X   = copies per choice (all K copies of every token, null choices included), summed over the data-parallel
            ranks (one all-reduce of X counts)
    f_X   = c_X / sum_x c_x;   f_x := mean_{j >= E} f_j for every null choice x >= E
    P_X   = mean_t scores_TX / sum_x scores_TX
    aux   = coeff * X * sum_x f_x P_x

With balanced loads every choice gets T*K/X copies, so a token uses K*E/X true experts on average (the number
`experts_per_token` reports for the active-parameter count; the telemetry measures the real one).
seq_aux and z are the shared losses (seq_aux over the E true experts and their kept copies; z over all X logits).

Seam: topk_idx_TK holds choice_TK mod E (a valid id in [0, E) for every copy) and keep_TK is False on the null
copies, so the plan, the dispatchers and FSSDP never see them; tokens_per_expert_E counts the kept copies only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.balance import losses
from moetrain.config.schema import ModelConfig, RouterConfig
from moetrain.moe.routers.base import RouteContext, Router, RouterOutput, register


@dataclass
class AdaMoEConfig(RouterConfig):
    """AdaMoE: top_k counts true and null choices together."""

    method: str = "adamoe"
    num_null_experts: int = 8  # M: zero-output experts a token may pick instead of a true one


def select_sorted(biased_TX: torch.Tensor, k: int) -> torch.Tensor:
    """The k best choices per token, best first; equal scores go to the lower choice id (a stable sort)."""
    return torch.sort(biased_TX, dim=-1, descending=True, stable=True).indices[:, :k]


def null_pool_aux_loss(scores_TX: torch.Tensor, counts_X: torch.Tensor, num_experts: int,
                       coeff: float) -> torch.Tensor:
    """coeff * X * sum_x f_x P_x with the null choices (ids >= num_experts) sharing their mean f (a 0-d fp32 tensor).

    counts_X: copies per choice (global over the data-parallel ranks for the global f); no gradient.
    scores_TX: this rank's scores over the X choices; the gradient reaches them through P."""
    T, X = scores_TX.shape
    if T == 0:
        return scores_TX.float().sum() * 0.0
    with torch.no_grad():
        f_X = counts_X.detach().float().to(scores_TX.device)
        f_X = f_X / f_X.sum().clamp_min(1.0)
        if X > num_experts:
            f_X = torch.cat([f_X[:num_experts], f_X[num_experts:].mean().expand(X - num_experts)])
    scores_TX = scores_TX.float()
    P_X = (scores_TX / scores_TX.sum(-1, keepdim=True).clamp_min(1e-20)).mean(0)
    return coeff * X * (f_X * P_X).sum()


@register("adamoe")
class AdaMoERouter(Router):
    config_cls = AdaMoEConfig

    @classmethod
    def num_choices(cls, cfg: AdaMoEConfig, num_experts: int) -> int:
        return num_experts + max(cfg.num_null_experts, 0)

    @classmethod
    def experts_per_token(cls, cfg: AdaMoEConfig, num_experts: int) -> float:
        """K*E/X: the true experts per token when the load-balancing loss has every choice equally loaded."""
        return cfg.top_k * num_experts / cls.num_choices(cfg, num_experts)

    @classmethod
    def check(cls, cfg: AdaMoEConfig, model: ModelConfig) -> Iterator[str]:
        if cfg.num_null_experts < 1:
            yield (f"router.num_null_experts={cfg.num_null_experts} must be >= 1 (the zero-output experts of "
                   f"router=adamoe; for plain top-k routing use router=default)")

    def route(self, x_TD: torch.Tensor, ctx: RouteContext) -> RouterOutput:
        E, M, K = self.num_experts, self.cfg.num_null_experts, self.cfg.top_k
        logits_TX = self.logits(x_TD)
        scores_TX = self.scores(logits_TX)
        with torch.no_grad():
            bias_X = F.pad(self.expert_bias_E, (0, M))  # the null experts are never biased
            choice_TK = select_sorted(scores_TX.detach() + bias_X, K)
            keep_TK = choice_TK < E
            topk_idx_TK = torch.remainder(choice_TK, E)  # a valid id for every copy; the null copies are not kept
            counts_X = torch.bincount(choice_TK.flatten(), minlength=E + M).float()
        gates_TK = self.finish_gates(scores_TX.gather(1, choice_TK).masked_fill(~keep_TK, 0.0), keep_TK)
        return RouterOutput(topk_idx_TK, gates_TK, scores_TX, logits_TX, self.count(topk_idx_TK, keep_TK), keep_TK,
                            stats={"counts_X": counts_X})

    def global_choice_counts(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """counts_X (true and null choices) summed over the data-parallel ranks (one all-reduce)."""
        counts_X = routed.stats["counts_X"]
        if ctx.dp_group is not None and dist.get_world_size(ctx.dp_group) > 1:
            counts_X = counts_X.clone()
            dist.all_reduce(counts_X, group=ctx.dp_group)
        return counts_X

    def aux_loss(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """aux over the X choices with the null pool (replaces the shared aux over the E true experts)."""
        return null_pool_aux_loss(routed.scores_TE, self.global_choice_counts(routed, ctx), self.num_experts,
                                  self.cfg.aux_loss_coeff)
