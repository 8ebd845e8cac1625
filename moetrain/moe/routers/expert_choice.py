"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"): experts pick tokens.

Legend: T = B*S tokens on this rank, B sequences, S sequence length, E experts, K top_k (the average experts per token
the buckets are sized for), C bucket (tokens an expert takes from each sequence), K' copy rows per token in the output
(the most experts any token of this forward got).

Training (and evaluation with eval_routing=expert_choice):
    scores_TE = softmax(logits_TE) | sigmoid(logits_TE)       (softmax over the experts, as in the paper)
    C = min(S, ceil(bucket_factor * S * K / E))               (per sequence; float noise removed before the ceil)
    for every sequence b and expert e:  chosen[b, :, e] = the C positions s with the highest scores[b, s, e]
                                        (ties: the earlier position wins; a stable sort, so the same on any device)
    token t gets the experts that chose it, 0 to E of them:  y_t = sum_{e chose t} scores_TE[t, e] * expert_e(x_t)
    (gates are the raw scores; renormalised over the token's kept experts only if norm_topk_prob; times route_scale)

Buckets are per sequence, not per batch: an expert's choice only ever compares tokens of one sequence, so a
sequence is routed the same whatever else is in the batch and however sequences are split over data-parallel ranks
(expert parallelism and FSSDP give exactly the one-process routing, with no collective). Every expert gets exactly
B*C tokens per forward: balanced by construction, so the method needs no balance loss and the aux-loss-free bias
plays no part (a per-expert shift does not change which tokens an expert ranks highest; with equal counts the bias
update is zero anyway). The shared losses still apply if configured.

Output (the per-copy rows of the routing seam): topk_idx_TK / gates_TK / keep_TK of shape (T, K'). Row k of token t
is its k-th chosen expert in expert-id order; the rows past the token's own number of experts have keep False (a
token no expert chose has no kept copy: only the residual stream carries it). K' is data dependent, the maximum over
the tokens of this forward, rather than the static bound E (a single token may be chosen by every expert): the plan
sorts T*K' copies and its row maps are T*K' long, and K' is typically a small multiple of K while E is large (64-256
in real models), so the data-dependent width is much cheaper. It costs one host sync (reading K'); the plan already
syncs on the kept count, so this adds a second small read, not a new kind of stall. K' differs between ranks, which
is fine: the copy layout never leaves its rank.

Causality: an expert's choice of token s depends on the scores of every token of the sequence, later ones included,
so in expert-choice mode a token's output depends on future tokens. That is fine for training but not causal for an
autoregressive LM: generation cannot see the future, and a validation loss computed that way leaks future
information (it is optimistic). The remedy used by default (eval_routing=topk): whenever the router is not training
(`model.eval()`, which the trainer's evaluate() sets), route by token choice over the same learned scores: each
token takes its top-K experts (plus the balancing bias, which stays zero under expert-choice training), gates =
scores (renormalised if norm_topk_prob, times route_scale). Then validation and generation are causal, and the eval
routing averages K experts per token like training.
eval_routing=expert_choice keeps expert choice in evaluation: the validation loss then sees the future.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from moetrain.config.schema import ModelConfig, RouterConfig
from moetrain.moe.routers.base import RouteContext, Router, RouterOutput, register
from moetrain.moe.routers.topk import select_topk

EVAL_ROUTINGS = ("topk", "expert_choice")


@dataclass
class ExpertChoiceConfig(RouterConfig):
    """Expert choice: top_k is the average experts per token the buckets are sized for."""

    method: str = "expert_choice"
    bucket_factor: float = 1.0  # each expert takes C = ceil(bucket_factor * S * top_k / E) tokens of each sequence
    eval_routing: str = "topk"  # topk (causal token choice when not training) | expert_choice (sees the future)
    norm_topk_prob: bool = False  # expert-choice gates are the raw scores
    bias_update_rate: float = 0.0  # balanced by construction: the bias would stay zero


def bucket_size(seq_len: int, top_k: int, num_experts: int, bucket_factor: float) -> int:
    """C = min(S, ceil(bucket_factor * S * top_k / E)); the product is rounded to 9 decimals first, so float noise
    (1.1 * 100 / 11 = 10.000000000000002) does not add a token."""
    return min(seq_len, math.ceil(round(bucket_factor * seq_len * top_k / num_experts, 9)))


def choose_tokens(scores_BSE: torch.Tensor, bucket: int) -> torch.Tensor:
    """chosen_BSE (bool): each expert's top-`bucket` positions of each sequence by score; ties go to the earlier
    position (stable sort)."""
    B, S, E = scores_BSE.shape
    chosen_BES = torch.zeros(B, E, S, dtype=torch.bool, device=scores_BSE.device)
    if bucket > 0:
        order_BES = torch.sort(scores_BSE.transpose(1, 2), dim=-1, descending=True, stable=True).indices
        chosen_BES.scatter_(-1, order_BES[..., :bucket], True)
    return chosen_BES.transpose(1, 2)


def copies_from_choice(chosen_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_idx_TK, keep_TK) of width K' = max experts of any token (at least 1): row k of token t is its k-th
    chosen expert in expert-id order; the rows past its own count hold unchosen experts with keep False."""
    T = chosen_TE.shape[0]
    width = max(int(chosen_TE.sum(1).max()), 1) if T > 0 else 1  # one host sync
    order_TE = torch.sort(chosen_TE.to(torch.int8), dim=1, descending=True, stable=True).indices
    topk_idx_TK = order_TE[:, :width].contiguous()
    return topk_idx_TK, chosen_TE.gather(1, topk_idx_TK)


@register("expert_choice")
class ExpertChoiceRouter(Router):
    config_cls = ExpertChoiceConfig

    @classmethod
    def experts_per_token(cls, cfg: ExpertChoiceConfig, num_experts: int) -> float:
        """top_k * bucket_factor on average (up to the rounding of C), at most E."""
        return float(min(num_experts, cfg.top_k * cfg.bucket_factor))

    @classmethod
    def check(cls, cfg: ExpertChoiceConfig, model: ModelConfig) -> Iterator[str]:
        bf = cfg.bucket_factor
        if not (math.isfinite(bf) and bf > 0):
            yield (f"router.bucket_factor={bf} must be a finite number > 0 (each expert takes "
                   f"ceil(bucket_factor * S * top_k / E) tokens of each sequence; 1.0 sizes the buckets for top_k "
                   f"experts per token)")
        if cfg.eval_routing not in EVAL_ROUTINGS:
            yield (f"router.eval_routing={cfg.eval_routing!r} is unknown; choose one of {', '.join(EVAL_ROUTINGS)} "
                   f"(topk: causal token choice at evaluation; expert_choice: the validation loss sees the future)")

    def bucket(self, seq_len: int) -> int:
        """C for sequences of length S."""
        return bucket_size(seq_len, self.cfg.top_k, self.num_experts, self.cfg.bucket_factor)

    def route(self, x_TD: torch.Tensor, ctx: RouteContext) -> RouterOutput:
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        scores_TE = self.scores(logits_TE)
        if not self.training and cfg.eval_routing == "topk":
            return self.token_choice(scores_TE, logits_TE)
        B, S = ctx.batch_shape
        with torch.no_grad():
            chosen_TE = choose_tokens(scores_TE.detach().view(B, S, -1), self.bucket(S)).reshape(B * S, -1)
            topk_idx_TK, keep_TK = copies_from_choice(chosen_TE)
        gates_TK = self.finish_gates(scores_TE.gather(1, topk_idx_TK), keep_TK).masked_fill(~keep_TK, 0.0)
        return RouterOutput(topk_idx_TK, gates_TK, scores_TE, logits_TE, self.count(topk_idx_TK, keep_TK),
                            keep_TK=keep_TK)

    def token_choice(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor) -> RouterOutput:
        """Causal evaluation routing: each token its top_k experts over the same scores (no keep mask)."""
        cfg = self.cfg
        with torch.no_grad():
            topk_idx_TK = select_topk(scores_TE.detach() + self.expert_bias_E, cfg.top_k, cfg.num_groups,
                                      cfg.topk_groups)
        gates_TK = self.finish_gates(scores_TE.gather(1, topk_idx_TK))
        return RouterOutput(topk_idx_TK, gates_TK, scores_TE, logits_TE, self.count(topk_idx_TK))
