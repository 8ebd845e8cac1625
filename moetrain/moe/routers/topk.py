"""Token-choice top-k routing (the default): each token picks its K best experts.

Legend: T tokens, E experts, K top-k, G expert groups (router.num_groups), W ranks computing experts.

    scores_TE = softmax(logits_TE) | sigmoid(logits_TE)
    topk_idx_TK = topk(scores_TE + bias_E)        # the bias only selects (DeepSeek-V3), it never scales a gate
    gates_TK = scores_TE[topk_idx_TK]; gates /= sum_k gates (if norm_topk_prob); gates *= route_scale

Group-limited routing (num_groups G > 1): every expert belongs to one group, group_E[e] in [0, G); a group's score is
the sum of its top-m biased scores, m = router.group_score_topk (DeepSeek-V3: 2) or, when that is 0,
max(1, K/topk_groups), and only the experts of the best `topk_groups` groups stay eligible:
    group_score_TG[t, g] = sum of the top-min(m, |g|) of {scores_TE[t, e] + bias_E[e] : group_E[e] = g}
    eligible_TE[t, e]    = group_E[e] in topk(group_score_TG[t], topk_groups)
`router.group_by` says what the groups are:
    experts: G equal expert-id ranges, group_E[e] = e // (E/G)              (the published DeepSeek-V3 routing)
    ranks:   G equal blocks of the W ranks computing the experts now ("nodes", W/G ranks each),
             group_E[e] = location_E[e] // (W/G), location_E = RouteContext.expert_location_E (the owner rank of
             each expert: contiguous under expert parallelism, whatever re-sharding chose under FSSDP), W =
             max(location_E) + 1 (every rank owns E/W experts). G must divide W; G = W makes every rank a group.
             Without a location (one process holds every expert) there is one node and nothing to limit.
Node-limited routing thus sends each token to at most topk_groups nodes (topk_groups * W/G ranks) of expert owners,
whatever the placement; with expert-id groups that bound holds only while expert ids map to ranks contiguously
(expert parallelism, FSSDP before any re-sharding). FSSDP's per-step replicas are placed after routing, from the
routed counts, so routing follows the owners; a copy of a replicated expert may then be computed on a replica's rank.

Forced-balanced routing (benchmarking): token t picks experts (t*K + k) mod E, so every expert gets T*K/E copies.
Every copy is kept (no keep mask); a capacity, if configured, drops copies later, in the dispatcher's plan.
"""

from __future__ import annotations

from typing import Optional

import torch

from moetrain.config.schema import RouterConfig
from moetrain.moe.routers.base import RouteContext, Router, RouterOutput, register


@register("topk")
class TopKRouter(Router):
    config_cls = RouterConfig
    group_limited = True

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig):
        super().__init__(dim, num_experts, cfg)
        self._groups: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)  # (location_E, group_E)

    def route(self, x_TD: torch.Tensor, ctx: RouteContext) -> RouterOutput:
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        logits_TE = self.logits(x_TD)
        scores_TE = self.scores(logits_TE)
        with torch.no_grad():
            if cfg.force_balanced:
                topk_idx_TK = balanced_assignment(x_TD.shape[0], E, K, x_TD.device)
            elif cfg.group_by == "ranks":
                group_E = self.rank_groups(ctx.expert_location_E, scores_TE.device)
                topk_idx_TK = select_topk(scores_TE.detach() + self.expert_bias_E, K,
                                          cfg.num_groups if group_E is not None else 1, cfg.topk_groups, group_E,
                                          cfg.group_score_topk)
            else:
                topk_idx_TK = select_topk(scores_TE.detach() + self.expert_bias_E, K, cfg.num_groups, cfg.topk_groups,
                                          group_score_topk=cfg.group_score_topk)
        gates_TK = self.finish_gates(scores_TE.gather(1, topk_idx_TK))
        return RouterOutput(topk_idx_TK, gates_TK, scores_TE, logits_TE, self.count(topk_idx_TK))

    def rank_groups(self, location_E: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        """group_E (int64 on `device`) for group_by=ranks: group_E[e] = location_E[e] // (W/G), W = max(location_E)+1;
        None when nothing limits (no location: one process; or G = 1). Cached per location tensor (the dispatcher
        hands out the same tensor until its owners change), so the one host sync (W) happens once per placement.
        A group count that does not divide W is a ConfigError (the launch's layout decides W)."""
        G = self.cfg.num_groups
        if location_E is None or G == 1:
            return None
        cached_location, cached_group = self._groups
        if cached_location is location_E and cached_group.device == torch.device(device):
            return cached_group
        W = int(location_E.max()) + 1
        if W % G:
            from moetrain.config.validate import ConfigError  # a user error: one line, exit status 2 (not at import:
                                                              # validate imports the router registry)
            raise ConfigError(f"router.group_by=ranks splits the {W} ranks computing experts into router.num_groups="
                              f"{G} groups of ranks (nodes): router.num_groups must divide {W}; set it to the number "
                              f"of nodes the experts are spread over (a divisor of {W}), or use "
                              f"router.group_by=experts")
        group_E = (location_E.to(device=device, dtype=torch.long) // (W // G)).contiguous()
        self._groups = (location_E, group_E)
        return group_E


def select_topk(biased_TE: torch.Tensor, k: int, num_groups: int = 1, topk_groups: int = 1,
                group_E: Optional[torch.Tensor] = None, group_score_topk: int = 0) -> torch.Tensor:
    """Top-k expert ids per token, optionally restricted to the best `topk_groups` of `num_groups` groups.

    group_E: the group of each expert, int64 in [0, num_groups), groups of any size; None: `num_groups` equal
    expert-id ranges. A group's score is the sum of its top-min(m, group size) biased scores, m = group_score_topk,
    or max(1, k // topk_groups) when that is 0; an empty group never wins. The chosen groups must hold at least k
    experts together (validation ensures it for equal groups: top_k <= topk_groups * E / num_groups). A general map
    costs two sorts of T x E and no host synchronisation:
        vals_TE, idx_TE = sort(biased_TE, descending)           # best first
        order_TE = stable sort of group_E[idx_TE]              # each group contiguous, still best first
        group_score_TG[t, g] = sum_{j < min(m, size_G[g])} vals_TE[t, order_TE[t, start_G[g] + j]]
    """
    if num_groups <= 1 or topk_groups >= num_groups:
        return biased_TE.topk(k, dim=-1).indices
    T, E = biased_TE.shape
    m = group_score_topk or max(1, k // topk_groups)
    if group_E is None:
        grouped_TGS = biased_TE.view(T, num_groups, E // num_groups)
        group_scores_TG = grouped_TGS.topk(min(m, E // num_groups), dim=-1).values.sum(-1)
        group_E = torch.arange(E, device=biased_TE.device) // (E // num_groups)
    else:
        group_E = group_E.to(device=biased_TE.device, dtype=torch.long)
        vals_TE, idx_TE = biased_TE.sort(dim=-1, descending=True)
        _, order_TE = group_E[idx_TE].sort(dim=-1, stable=True)
        vals_TE = vals_TE.gather(1, order_TE)  # grouped by group id, best first inside each group
        size_G = torch.bincount(group_E, minlength=num_groups)
        start_G = torch.cumsum(size_G, 0) - size_G
        j_m = torch.arange(m, device=biased_TE.device)
        top_TGm = vals_TE[:, (start_G[:, None] + j_m).clamp(max=E - 1)]
        group_scores_TG = torch.where(j_m < size_G[:, None], top_TGm, torch.zeros_like(top_TGm)).sum(-1)
        group_scores_TG = group_scores_TG.masked_fill(size_G == 0, float("-inf"))
    keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_scores_TG.topk(topk_groups, dim=-1).indices, True)
    return biased_TE.masked_fill(~keep_TG[:, group_E], float("-inf")).topk(k, dim=-1).indices


def balanced_assignment(num_tokens: int, num_experts: int, k: int, device) -> torch.Tensor:
    """topk_idx_TK[t, k] = (t*K + k) mod E: every expert gets the same load (up to one copy)."""
    copies = torch.arange(num_tokens * k, device=device)
    return (copies % num_experts).view(num_tokens, k)
