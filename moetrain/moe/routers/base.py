"""The router interface every routing method implements, and what all of them share.

Legend: T tokens, D model dim, E routed (dispatched) experts, K copies per token the router decides, B batch,
S sequence, X the experts a method chooses among (E, or E plus its virtual experts).

A router turns the tokens x_TD into a decision: per-copy rows (token t, expert topk_idx_TK[t, k], gate
gates_TK[t, k]) and a keep mask keep_TK. A copy not kept computes nothing anywhere (plan, dispatchers, FSSDP), so a
router may give a token any number of experts from 0 to K: dropping, null experts, dynamic k and expert choice are
all that one mechanism. Only the E dispatched experts appear in topk_idx_TK; a method's virtual experts (null,
zero-computation) are kept out of the dispatch and, where they produce something, return it as `local_out_TD`,
computed on this rank without any communication.

Shared by every method:
    logits_TX = x_TD @ W_gate^T                      (fp32)
    scores_TX = softmax(logits_TX) | sigmoid(logits_TX)
    tokens_per_expert_E = bincount of the kept copies  (counted once: the layer, its losses, the balance controller
                                                        and the telemetry all use this count)
    expert_bias_E: the aux-loss-free bias the balance controller updates; methods add it to the scores they select
                   by, never to a gate
and the balance losses (balance/losses.py), computed on the kept copies only:
    aux    = coeff * E * sum_i f_i P_i   (f from the kept counts, all-reduced over the data-parallel ranks)
    seq_aux, z as configured.
A method overrides `route` (required); `aux_loss` / `seq_aux_loss` where its balance loss covers virtual experts;
and `losses` (calling super()) where the paper adds a loss of its own.

A method is one file in this package: a `RouterConfig` subclass with its own keys and `method` default, and a
`Router` subclass decorated with `@register(name)`. The registry imports every module of the package, and Hydra gets
the config class as `router/schema_<name>` for the preset `configs/router/<name>.yaml` to extend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from moetrain.balance import losses
from moetrain.config.schema import ModelConfig, RouterConfig


@dataclass
class RouterOutput:
    topk_idx_TK: torch.Tensor  # int64 ids of dispatched experts, in [0, E)
    gates_TK: torch.Tensor  # fp32 combine weights
    scores_TE: torch.Tensor  # fp32 scores (softmax probs or sigmoid) over the choices X (E plus virtual experts)
    logits_TE: torch.Tensor  # fp32 raw logits over the choices X
    tokens_per_expert_E: torch.Tensor  # fp32 kept copies per dispatched expert
    keep_TK: Optional[torch.Tensor] = None  # bool: copies the router kept (None: all)
    local_out_TD: Optional[torch.Tensor] = None  # what the method's virtual experts add to the output (no dispatch)
    carry: Optional[torch.Tensor] = None  # handed to the next MoE layer's router (e.g. gating residuals)
    stats: dict = field(default_factory=dict)  # method-specific per-forward values for the losses


@dataclass
class RouteContext:
    """What a router may use besides the tokens."""

    batch_shape: tuple[int, int]  # (B, S) of x_TD, T = B*S
    dp_group: Optional[dist.ProcessGroup] = None  # ranks the router is data parallel over (global aux counts)
    carry: Optional[torch.Tensor] = None  # the previous MoE layer's RouterOutput.carry
    expert_location_E: Optional[torch.Tensor] = None  # rank computing each expert (node-limited routing); None: local


ROUTERS: dict[str, type["Router"]] = {}


def register(name: str):
    """Class decorator: the router class of method `name` (its `config_cls.method` must default to `name`)."""
    def add(cls):
        if name in ROUTERS:
            raise ValueError(f"two routing methods are named {name!r}")
        if cls.config_cls.method != name:
            raise ValueError(f"{cls.__name__}.config_cls.method must default to {name!r}")
        cls.method = name
        ROUTERS[name] = cls
        return cls
    return add


class Router(nn.Module):
    """Base of the routing methods: the gate, the balancing bias, scoring, counting and the shared losses."""

    config_cls: ClassVar[type] = RouterConfig
    method: ClassVar[str] = ""
    # Whether the method implements group-limited routing (router.num_groups / topk_groups / group_by) and the
    # forced-balanced benchmarking assignment; the validator refuses those keys for a method that does not.
    group_limited: ClassVar[bool] = False

    def __init__(self, dim: int, num_experts: int, cfg: RouterConfig):
        super().__init__()
        self.num_experts, self.cfg = num_experts, cfg
        self.gate = nn.Linear(dim, self.num_choices(cfg, num_experts), bias=False)
        self.register_buffer("expert_bias_E", torch.zeros(num_experts, dtype=torch.float32))

    # ------------------------------------------------------------------ what a method may override
    @classmethod
    def num_choices(cls, cfg: RouterConfig, num_experts: int) -> int:
        """X: the experts the router scores (E, plus any virtual experts of the method)."""
        return num_experts

    @classmethod
    def experts_per_token(cls, cfg: RouterConfig, num_experts: int) -> float:
        """Dispatched experts per token the method targets (for active-parameter counts; telemetry measures it)."""
        return float(cfg.top_k)

    @classmethod
    def check(cls, cfg: RouterConfig, model: ModelConfig) -> Iterator[str]:
        """Problems with the method's own keys, as one-line messages naming the key and the fix."""
        return iter(())

    def reset_parameters(self, init_std: float) -> None:
        nn.init.trunc_normal_(self.gate.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        self.expert_bias_E.zero_()

    def route(self, x_TD: torch.Tensor, ctx: RouteContext) -> RouterOutput:
        raise NotImplementedError

    def losses(self, routed: RouterOutput, ctx: RouteContext) -> dict[str, torch.Tensor]:
        """The configured losses: aux and seq_aux (hooks below, which a method with virtual experts overrides to
        cover them) and z on all logits; a method with a loss of its own adds it here, calling super()."""
        cfg = self.cfg
        terms: dict[str, torch.Tensor] = {}
        if cfg.aux_loss_coeff > 0:
            terms["aux"] = self.aux_loss(routed, ctx)
        if cfg.seq_aux_loss_coeff > 0:
            terms["seq_aux"] = self.seq_aux_loss(routed, ctx)
        if cfg.z_loss_coeff > 0:
            terms["z"] = losses.z_loss(routed.logits_TE, cfg.z_loss_coeff)
        return terms

    def aux_loss(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """Switch/GShard loss over the E dispatched experts, f from the kept copies counted over the data-parallel
        ranks."""
        E = self.num_experts
        return losses.switch_aux_loss(routed.scores_TE[:, :E], routed.topk_idx_TK, E, self.cfg.aux_loss_coeff,
                                      self.global_counts(routed, ctx))

    def seq_aux_loss(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise loss over the E dispatched experts, on the kept copies."""
        (B, S), E = ctx.batch_shape, self.num_experts
        keep_BSK = None if routed.keep_TK is None else routed.keep_TK.view(B, S, -1)
        return losses.seq_aux_loss(routed.scores_TE[:, :E].reshape(B, S, E), routed.topk_idx_TK.view(B, S, -1), E,
                                   self.cfg.seq_aux_loss_coeff, keep_BSK)

    # ------------------------------------------------------------------ shared helpers
    def forward(self, x_TD: torch.Tensor, ctx: Optional[RouteContext] = None) -> RouterOutput:
        return self.route(x_TD, ctx if ctx is not None else RouteContext((1, x_TD.shape[0])))

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """logits_TX in fp32."""
        return nn.functional.linear(x_TD.float(), self.gate.weight.float())

    def scores(self, logits_TX: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_TX, dim=-1) if self.cfg.score_func == "softmax" else torch.sigmoid(logits_TX)

    def count(self, topk_idx_TK: torch.Tensor, keep_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens_per_expert_E (fp32) of the kept copies."""
        idx = topk_idx_TK.flatten() if keep_TK is None else topk_idx_TK[keep_TK]
        return torch.bincount(idx, minlength=self.num_experts).float()

    def global_counts(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """The kept counts summed over the data-parallel ranks (one all-reduce; the local counts with no group)."""
        counts_E = routed.tokens_per_expert_E.float()
        if ctx.dp_group is not None and dist.get_world_size(ctx.dp_group) > 1:
            counts_E = counts_E.clone()
            dist.all_reduce(counts_E, group=ctx.dp_group)
        return counts_E

    def finish_gates(self, gates_TK: torch.Tensor, keep_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Optional renormalisation over the kept copies (norm_topk_prob), then route_scale."""
        cfg = self.cfg
        if cfg.norm_topk_prob:
            kept_TK = gates_TK if keep_TK is None else gates_TK * keep_TK
            if gates_TK.shape[1] > 1 or keep_TK is not None:
                gates_TK = gates_TK / kept_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if cfg.route_scale != 1.0:
            gates_TK = gates_TK * cfg.route_scale
        return gates_TK
