"""MoE++: FFN experts plus zero-computation experts (zero, copy, constant) and gating residuals.

Jin, Zhu, Yuan, Yan 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation Experts",
arXiv 2410.07348 (ICLR 2025). Documentation: docs/routers/moepp.md.

Legend: T tokens, D model dim, E FFN (dispatched) experts, Z zero experts, C copy experts, N constant experts,
V = Z + C + N zero-computation ("virtual") experts, X = E + V choices the gate scores, K top-k.
Choice ids: [0, E) FFN experts, [E, E+Z) zero, [E+Z, E+Z+C) copy, [E+Z+C, X) constant experts.

Routing (paper Eq. 1 and 6; layer l is the l-th MoE layer, the carry is handed from MoE layer to MoE layer):
    logits_TX = x_TD W_l^T + carry_TX W_g,l^T      W_l (X, D) the gate, W_g,l (X, X); the first MoE layer gets no carry
    carry     = logits_TX                            (this layer's logits, residual included: handed to layer l+1)
    scores_TX = softmax(logits_TX)                   (sigmoid optional; the paper uses softmax)
    choice_TK = topk(scores_TX + [bias_E, 0_V])      the aux-loss-free bias only selects, only among FFN experts
    gates_TK  = scores_TX[choice_TK]                 (no renormalisation over the top-K: Eq. 1; see deviations)
    keep_TK   = choice_TK < E                        only FFN copies are dispatched;
    topk_idx_TK = choice_TK where kept, else 0       a valid expert id the plan never sends (keep False)
    tokens_per_expert_E = bincount of the kept (FFN) copies

Zero-computation experts (Eq. 3-5), computed here, on the token's rank, as `local_out_TD`:
    zero:        E_zero(x)    = 0
    copy:        E_copy(x)    = x
    constant j:  E_const,j(x) = a1 x + a2 v_j,  [a1, a2] = softmax(W_c,j x)     v_j (D,), W_c,j (2, D) learnable
    local_out_TD[t] = sum over the copies k of token t whose choice is virtual of gates_TK[t, k] * E_choice(x_t)
Their copies are never kept, so the routing plan, the dispatchers, the all-to-all and FSSDP never see them: a token
whose K choices are all zero-computation experts sends nothing to any other rank, and every rank holds every
zero-computation expert (their parameters are ordinary replicated router parameters). This is the paper's
"deployment friendly" property: no all-to-all traffic and no expert load imbalance for these experts.

Heterogeneous load-balancing loss (Eq. 7), over all X choices, with every choice counted (the kept FFN copies and
the virtual copies, which are chosen although not dispatched):
    f_i = c_i / T                       c_i copies choosing i, T tokens; both summed over the data-parallel ranks
    P_i = mean_t s'_{t,i}               s' = scores normalised per token (identity for softmax); this rank's tokens
    eta_i = 1 (FFN expert) | tau (zero-computation expert)          tau = router.zc_loss_weight
    aux = beta * sum_i eta_i f_i P_i    beta = router.aux_loss_coeff (the paper: 0.01)
With equal token counts per rank the data-parallel mean of the per-rank losses is the single-process loss of the
global batch (P is linear in the tokens). f is counted per forward (one micro-batch on every rank), so, like the
shared aux loss, the loss depends on how a step's batch is cut into micro-batches. seq_aux (if configured) is
DeepSeek's sequence-wise loss over the X choices; z (if configured) is the z-loss of logits_TX.

Deviations from the paper and its released code, and why:
- Gates: the paper's Eq. 1 takes softmax probabilities of the top-K without renormalisation (preset
  norm_topk_prob: false). The released inference code zeroes the zero expert's gate, renormalises the top-K and
  multiplies the layer input by K; with router.norm_topk_prob=true we renormalise over all K choices (virtual ones
  included, the zero expert's gate too) and never rescale the input.
- Expert capacity (Eq. 8, heterogeneous capacities) is not implemented here: capacity belongs to the routing plan,
  which applies router.capacity_factor to the kept FFN copies (ceil(kept / E * factor) per FFN expert).
  Zero-computation experts are never capped: they cost nothing and are computed locally, so dropping their copies
  would save nothing. The preset is dropless like the other presets.
- The gate is linear (Eq. 2/6); the released code's optional two-layer tanh gate is not implemented.
- W_g,l is initialised like the gate (truncated normal, init_std; the paper does not say), not to zero: its
  contribution at init is small (about 7% of the logits' spread in the tiny model), and the carry's gradient reaches
  the previous layers' gates from the first step (with a zero W_g it would be exactly zero until W_g moves). The first
  MoE layer's W_g is unused (no carry) and gets no gradient (the gradient sync counts it as zero).
- v_j ~ N(0, 1) as in the released code (the scale of the RMS-normalised layer input it replaces); W_c,j like the gate.
- The carry keeps its graph: the next layer's routing gradients flow into this layer's gate and W_g (as in the
  released code, which does not detach it).
- The constant experts' mixing weights are computed for every token (2*N*D multiply-adds per token, like a gate of
  2N rows), then weighted by the gates of the tokens that chose them; the layer's FLOPs telemetry counts the gate's
  2*D*X only.
- The aux-loss-free bias (this framework's, off in the preset) applies to the E FFN experts only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from moetrain.balance import losses
from moetrain.config.schema import ModelConfig, RouterConfig
from moetrain.moe.routers.base import RouteContext, Router, RouterOutput, register


@dataclass
class MoEPPConfig(RouterConfig):
    """MoE++ keys; the shared keys default to the paper's setting (softmax top-2 gates without renormalisation,
    heterogeneous balance loss with beta = 0.01, no aux-loss-free bias)."""

    method: str = "moepp"
    norm_topk_prob: bool = False  # Eq. 1: the top-K softmax probabilities are used as they are
    bias_update_rate: float = 0.0  # the paper balances with its loss only
    aux_loss_coeff: float = 0.01  # beta, the weight of the heterogeneous load-balancing loss
    num_zero_experts: int = 1  # Z: experts whose output is 0 (discard)
    num_copy_experts: int = 1  # C: experts whose output is their input (skip)
    num_constant_experts: int = 2  # N: experts a1*x + a2*v_j, [a1, a2] = softmax(W_c,j x) (replace)
    gating_residual: bool = True  # add the previous MoE layer's logits through a learnable (X, X) matrix
    zc_loss_weight: float = 0.75  # tau: weight of the zero-computation experts in the balance loss (1 for FFN)


@register("moepp")
class MoEPPRouter(Router):
    config_cls = MoEPPConfig

    def __init__(self, dim: int, num_experts: int, cfg: MoEPPConfig):
        super().__init__(dim, num_experts, cfg)
        X, N = self.num_choices(cfg, num_experts), cfg.num_constant_experts
        self.num_zero, self.num_copy, self.num_constant = cfg.num_zero_experts, cfg.num_copy_experts, N
        # Zeros until reset_parameters (which the model always calls): a constant expert then mixes x and v = 0
        # half and half, and the gating residual adds nothing.
        self.const_gate_N2D = nn.Parameter(torch.zeros(N, 2, dim)) if N > 0 else None  # W_c,j
        self.const_value_ND = nn.Parameter(torch.zeros(N, dim)) if N > 0 else None  # v_j
        self.residual_XX = nn.Parameter(torch.zeros(X, X)) if cfg.gating_residual else None  # W_g

    @classmethod
    def num_choices(cls, cfg: MoEPPConfig, num_experts: int) -> int:
        """X = E FFN experts + Z zero + C copy + N constant experts (the gate scores all of them)."""
        return num_experts + cfg.num_zero_experts + cfg.num_copy_experts + cfg.num_constant_experts

    @classmethod
    def experts_per_token(cls, cfg: MoEPPConfig, num_experts: int) -> float:
        """An upper bound: how many of a token's K choices are FFN experts is learned (0 to K), so the expected number
        of dispatched experts is unknown a priori; top_k is returned. The telemetry's experts_per_token measures it."""
        return float(cfg.top_k)

    @classmethod
    def check(cls, cfg: MoEPPConfig, model: ModelConfig) -> Iterator[str]:
        for key in ("num_zero_experts", "num_copy_experts", "num_constant_experts"):
            value = getattr(cfg, key)
            if value < 0:
                yield f"router.{key}={value} must be >= 0 (0 leaves that kind of zero-computation expert out)"
        tau = cfg.zc_loss_weight
        if not math.isfinite(tau) or tau < 0:
            yield (f"router.zc_loss_weight={tau} must be a finite number >= 0 (the paper's tau, weight of the "
                   f"zero-computation experts in the balance loss; the paper uses 0.75)")

    def reset_parameters(self, init_std: float) -> None:
        """The gate as every router; W_c,j and W_g like the gate (truncated normal, init_std), v_j ~ N(0, 1). All from
        the global RNG, which the model seeds identically on every rank before initialising."""
        super().reset_parameters(init_std)
        with torch.no_grad():
            if self.const_gate_N2D is not None:
                nn.init.trunc_normal_(self.const_gate_N2D, std=init_std, a=-3 * init_std, b=3 * init_std)
                nn.init.normal_(self.const_value_ND, std=1.0)
            if self.residual_XX is not None:
                nn.init.trunc_normal_(self.residual_XX, std=init_std, a=-3 * init_std, b=3 * init_std)

    # ------------------------------------------------------------------ routing
    def route(self, x_TD: torch.Tensor, ctx: RouteContext) -> RouterOutput:
        cfg, E, K = self.cfg, self.num_experts, self.cfg.top_k
        logits_TX = self.logits(x_TD)
        X = logits_TX.shape[1]
        if self.residual_XX is not None and ctx.carry is not None:
            if tuple(ctx.carry.shape) != tuple(logits_TX.shape):
                raise ValueError(f"router=moepp: the previous MoE layer's carry has shape {tuple(ctx.carry.shape)}, "
                                 f"expected the logits shape {tuple(logits_TX.shape)}")
            logits_TX = logits_TX + nn.functional.linear(ctx.carry.float(), self.residual_XX.float())
        scores_TX = self.scores(logits_TX)
        with torch.no_grad():
            biased_TX = scores_TX.detach().clone()
            biased_TX[:, :E] += self.expert_bias_E
            choice_TK = biased_TX.topk(K, dim=-1).indices
        gates_TK = self.finish_gates(scores_TX.gather(1, choice_TK))  # keep None: renormalise over all K choices
        V = X - E
        keep_TK = choice_TK < E if V > 0 else None
        topk_idx_TK = choice_TK if keep_TK is None else torch.where(keep_TK, choice_TK, torch.zeros_like(choice_TK))
        with torch.no_grad():
            counts_X = torch.bincount(choice_TK.flatten(), minlength=X).float()
        local_out_TD = self.virtual_out(x_TD, choice_TK, gates_TK) if V > 0 else None
        return RouterOutput(topk_idx_TK, gates_TK, scores_TX, logits_TX, counts_X[:E].clone(), keep_TK, local_out_TD,
                            carry=logits_TX if self.residual_XX is not None else None,
                            stats={"choice_idx_TK": choice_TK, "virtual_counts_V": counts_X[E:].clone()})

    def virtual_out(self, x_TD: torch.Tensor, choice_TK: torch.Tensor, gates_TK: torch.Tensor) -> torch.Tensor:
        """local_out_TD (fp32): the gate-weighted outputs of the zero-computation experts the tokens chose.

            w_TV = gates of the virtual choices, scattered to their virtual ids (0 where not chosen)
            out  = x * (sum_copy w + sum_j w_j a1_j) + sum_j (w_j a2_j) v_j
        """
        E, Z, C, N = self.num_experts, self.num_zero, self.num_copy, self.num_constant
        T = x_TD.shape[0]
        virtual_TK = choice_TK >= E
        w_TV = gates_TK.new_zeros(T, Z + C + N).scatter_add(
            1, (choice_TK - E).clamp(min=0), torch.where(virtual_TK, gates_TK, torch.zeros_like(gates_TK)))
        x_TD = x_TD.float()
        coeff_T = w_TV[:, Z:Z + C].sum(1)
        out_TD = None
        if N > 0:
            alpha_TN2 = torch.softmax(torch.einsum("td,nkd->tnk", x_TD, self.const_gate_N2D.float()), dim=-1)
            w_TN = w_TV[:, Z + C:]
            coeff_T = coeff_T + (w_TN * alpha_TN2[..., 0]).sum(1)
            out_TD = (w_TN * alpha_TN2[..., 1]) @ self.const_value_ND.float()
        copy_TD = x_TD * coeff_T[:, None]
        return copy_TD if out_TD is None else copy_TD + out_TD

    # ------------------------------------------------------------------ losses
    def choice_counts(self, routed: RouterOutput, ctx: RouteContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_X, T): copies choosing each of the X choices (the kept FFN copies and the virtual copies) and the
        number of tokens, summed over the data-parallel ranks with one all-reduce (local values without a group)."""
        counts = torch.cat([routed.tokens_per_expert_E.detach().float(),
                            routed.stats["virtual_counts_V"].detach().float().to(routed.tokens_per_expert_E.device),
                            routed.tokens_per_expert_E.new_tensor([float(routed.scores_TE.shape[0])]).float()])
        if ctx.dp_group is not None and dist.get_world_size(ctx.dp_group) > 1:
            dist.all_reduce(counts, group=ctx.dp_group)
        return counts[:-1], counts[-1]

    def heterogeneous_balance_loss(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """aux = beta * sum_i eta_i f_i P_i over the X choices (paper Eq. 7; see the module docstring)."""
        E = self.num_experts
        counts_X, tokens = self.choice_counts(routed, ctx)  # every rank joins the all-reduce, even with no tokens
        scores_TX = routed.scores_TE
        if scores_TX.shape[0] == 0:
            return scores_TX.float().sum() * 0.0
        f_X = counts_X / tokens.clamp_min(1.0)
        P_X = (scores_TX.float() / scores_TX.float().sum(-1, keepdim=True).clamp_min(1e-20)).mean(0)
        eta_X = torch.ones_like(f_X)
        eta_X[E:] = self.cfg.zc_loss_weight
        return self.cfg.aux_loss_coeff * (eta_X * f_X * P_X).sum()

    def aux_loss(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """The heterogeneous load-balancing loss over all X choices (the shared aux only sees dispatched experts)."""
        return self.heterogeneous_balance_loss(routed, ctx)

    def seq_aux_loss(self, routed: RouterOutput, ctx: RouteContext) -> torch.Tensor:
        """The sequence-wise loss over the X choices (zero-computation choices count as chosen)."""
        (B, S), X = ctx.batch_shape, routed.scores_TE.shape[1]
        choice_TK = routed.stats["choice_idx_TK"]
        return losses.seq_aux_loss(routed.scores_TE.reshape(B, S, X), choice_TK.view(B, S, -1), X,
                                   self.cfg.seq_aux_loss_coeff)


def choice_kinds(cfg: MoEPPConfig, num_experts: int) -> list[str]:
    """The kind of each of the X choices ("ffn", "zero", "copy", "constant"), in id order."""
    return (["ffn"] * num_experts + ["zero"] * cfg.num_zero_experts + ["copy"] * cfg.num_copy_experts
            + ["constant"] * cfg.num_constant_experts)


__all__ = ["MoEPPConfig", "MoEPPRouter", "choice_kinds"]
