"""MoE feed-forward block: router -> dispatcher -> grouped experts -> combine, plus optional shared experts.

Legend: B batch, S sequence, T = B*S tokens on this rank, D model dim, F expert hidden dim, E experts, K top-k.

    y_TD = sum_k gates_TK[t, k] * expert_{topk_idx_TK[t, k]}(x_TD[t])  +  g_T[t] * shared(x_TD[t])

The shared experts are one fused SwiGLU of hidden size Fs (`shared_hidden`, default num_shared * F); g_T = 1, or with
`shared_gate` (Qwen2-MoE) g_T = sigmoid(x_TD @ w_g^T), w_g of shape (1, D) (`shared_gate.weight`).

The shared experts run between dispatch_comm and dispatch_postprocess, i.e. while the tokens are in flight. With a
pipeline degree n > 1 the all-to-all travels in n chunks (each a slice of every rank's experts): all chunks are sent
at once, then chunk c is computed and its combine sent while the later chunks are still arriving; in backward each
chunk's gradient all-to-all leaves as soon as that gradient exists (moetrain/moe/overlap.py).
`layer(x, return_record=True)` also returns the forward's `RoutingRecord` (counts, router losses, statistics): the
caller owns it, nothing is left on the module. Activation recomputation in backward therefore counts nothing twice:
the recomputed record is simply not returned to anyone.
With `recompute_experts` (selective activation checkpointing, set by TransformerLM) each chunk's expert computation
is checkpointed: backward recomputes the R x F SwiGLU hidden activations from the kept all-to-all result x_c; the
router, the all-to-all and the combine are not repeated.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.config.schema import RouterConfig
from moetrain.kernels.grouped_gemm import ChunkWeightGrads, autocast_dtype
from moetrain.model.mlp import SwiGLU
from moetrain.moe.dispatch import Dispatcher, LocalDispatcher
from moetrain.moe.experts import GroupedExperts
from moetrain.moe.overlap import ChunkExchange
from moetrain.moe.routers import RouteContext, build_router


@dataclass
class RoutingRecord:
    """What one forward of an MoE layer decided and measured, for the balance controller and the telemetry."""

    layer_id: int
    tokens_per_expert_E: torch.Tensor  # fp32 routed copies chosen per expert (before capacity), this micro-batch
    tokens_per_local_expert_L: torch.Tensor  # rows this rank's experts computed
    num_tokens: int
    num_copies: int
    num_dropped: int
    entropy_sum: torch.Tensor  # sum over tokens of the routing entropy -sum_e p log p (p = normalised scores)
    losses: dict[str, torch.Tensor]  # each configured router loss (with its graph)
    carry: Optional[torch.Tensor] = None  # what this layer's router hands to the next MoE layer's router

    @property
    def loss(self) -> Optional[torch.Tensor]:
        """The sum of the router losses, None when none is configured."""
        return sum(self.losses.values()) if self.losses else None


class MoELayer(nn.Module):
    """Router -> dispatcher -> experts -> combine. Without `dispatcher`/`experts` every expert lives on this rank;
    parallel layouts hand the layer theirs (moetrain.parallel.moe_layer.build_moe_layer): the layer only talks to
    the dispatcher interface of moe/dispatch.py and the experts' materialize/compute, so it knows nothing of how
    experts are spread over ranks."""

    recompute_experts = False  # checkpoint each chunk's expert computation (selective activation checkpointing)

    def __init__(self, dim: int, hidden: int, num_experts: int, num_shared: int, router_cfg: RouterConfig,
                 layer_id: int, dispatcher: Optional[Dispatcher] = None, experts: Optional[GroupedExperts] = None,
                 dp_group: Optional[dist.ProcessGroup] = None, backend: str = "auto",
                 recompute_experts: bool = False, shared_hidden: int = 0, shared_gate: bool = False):
        super().__init__()
        self.recompute_experts = recompute_experts
        self.layer_id, self.num_experts, self.router_cfg = layer_id, num_experts, router_cfg
        self.dim, self.hidden, self.num_shared = dim, hidden, num_shared
        self.dp_group = dp_group  # the ranks over which the router is data parallel (for global aux-loss counts)
        self.router = build_router(dim, num_experts, router_cfg)
        if dispatcher is None:
            dispatcher = LocalDispatcher(num_experts, router_cfg.capacity_factor, router_cfg.pad_to_capacity)
        self.dispatcher = dispatcher
        self.experts = experts if experts is not None else GroupedExperts(dim, hidden, list(range(num_experts)), backend)
        self.shared_hidden = (shared_hidden or hidden * num_shared) if num_shared > 0 else 0  # Fs
        self.shared_experts = SwiGLU(dim, self.shared_hidden) if num_shared > 0 else None
        self.shared_gate = nn.Linear(dim, 1, bias=False) if num_shared > 0 and shared_gate else None

    def reset_parameters(self, init_std: float, out_std: float, seed: int) -> None:
        self.router.reset_parameters(init_std)
        self.experts.reset_parameters(init_std, out_std, seed, self.layer_id)
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters(init_std, out_std)
        if self.shared_gate is not None:
            nn.init.trunc_normal_(self.shared_gate.weight, std=init_std, a=-3 * init_std, b=3 * init_std)

    @property
    def degree(self) -> int:
        """Pipeline chunks used by this step's forwards."""
        return self.dispatcher.degree

    def forward(self, x_BSD: torch.Tensor, return_record: bool = False, carry: Optional[torch.Tensor] = None):
        """y_BSD, or (y_BSD, RoutingRecord) with return_record. `carry` is the previous MoE layer's
        `RoutingRecord.carry` (for routers that look at the previous layer's routing, e.g. gating residuals)."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        ctx = RouteContext((B, S), self.dp_group, carry, self.dispatcher.expert_location_E())
        amp_dtype = autocast_dtype(x_TD)  # bf16 under mixed precision (moetrain/train/precision.py), else None
        with torch.autocast(x_TD.device.type, enabled=False) if amp_dtype else nullcontext():
            routed = self.router(x_TD, ctx)  # logits, scores, gates in fp32 (autocast would make the gate bf16)
        d = self.dispatcher
        plan = d.plan(routed.topk_idx_TK, routed.gates_TK, keep_TK=routed.keep_TK)
        # Under autocast the tokens travel and meet the experts in the autocast dtype (permutation, all-to-all, GEMM).
        x_RD = d.dispatch_preprocess(x_TD.to(amp_dtype) if amp_dtype else x_TD, plan)
        ex = ChunkExchange(d, plan)  # the chunks' all-to-alls, scheduled in both directions (moe/overlap.py)
        in_flight = ex.send(x_RD)  # all chunks start moving
        shared_TD = self.shared_experts(x_TD) if self.shared_experts is not None else None
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        counts = []
        with self.experts.materialize() as weights:
            grads = ChunkWeightGrads(plan.num_chunks)  # the chunks' weight gradients, built in place
            num_materialized = weights[0].shape[0]
            for c in range(plan.num_chunks):  # compute chunk c while later chunks arrive and earlier ones return
                x_c, tokens_c, experts_c = d.dispatch_postprocess(ex.arrival(in_flight, c), plan, c)
                if self.recompute_experts and torch.is_grad_enabled():
                    # The weights go in as tensors, so saved-tensor hooks (FSSDP re-materialization) see them.
                    y_c = checkpoint(self._compute_experts, x_c, tokens_c, experts_c, grads, *weights,
                                     use_reentrant=False)
                else:
                    y_c = self.experts.compute(x_c, tokens_c, weights, experts_c, grads)
                ex.send_back(d.combine_preprocess(y_c, plan, c), c)
                counts.append((experts_c, tokens_c))
        y_RD = ex.gather()
        y_TD = d.combine_postprocess(y_RD, plan)  # accumulated in fp32; kept fp32 (the residual's dtype) under autocast
        if amp_dtype is None:
            y_TD = y_TD.to(x_BSD.dtype)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD
        if routed.local_out_TD is not None:  # the router's virtual experts, computed on this rank
            y_TD = y_TD + routed.local_out_TD.to(y_TD.dtype)
        if len(counts) == 1:
            tokens_per_local_expert_L = counts[0][1]
        else:  # each chunk counted its slice of the experts (all of them when chunks split the tokens)
            tokens_per_local_expert_L = counts[0][1].new_zeros(num_materialized)
            for experts_c, tokens_c in counts:
                tokens_per_local_expert_L[experts_c] += tokens_c

        y_BSD = y_TD.view(B, S, D)
        if not return_record:
            return y_BSD
        with torch.no_grad():
            p_TE = routed.scores_TE / routed.scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
            entropy_sum = -(p_TE * p_TE.clamp_min(1e-20).log()).sum()
        record = RoutingRecord(self.layer_id, routed.tokens_per_expert_E, tokens_per_local_expert_L.detach(), B * S,
                               int(routed.tokens_per_expert_E.sum()), plan.num_dropped, entropy_sum,
                               self.router.losses(routed, ctx), routed.carry)
        return y_BSD, record

    def _compute_experts(self, x_RD, tokens_per_expert_L, experts, grads, *weights) -> torch.Tensor:
        return self.experts.compute(x_RD, tokens_per_expert_L, weights, experts, grads)

    def flops_per_token(self, experts_per_token: float) -> float:
        """Forward FLOPs per token of this layer for a measured number of routed experts per token:
        2*D*X (gate over the router's X choices) + experts_per_token * 6*D*F + 6*D*Fs (SwiGLU: three D x F
        matmuls, 2 FLOPs per multiply-add; Fs the shared experts' hidden size) + 2*D with a shared gate. Backward
        costs about twice as much."""
        gate = 2 * self.dim * (self.router.gate.weight.shape[0] + (self.shared_gate is not None))
        return float(gate + 6 * self.dim * (experts_per_token * self.hidden + self.shared_hidden))

    def after_step(self, step: int, global_tokens_per_expert_E: torch.Tensor,
                   optimizer: Optional[torch.optim.Optimizer]) -> None:
        """After each optimizer step (every rank, same order), with the step's global counts: the dispatcher tunes
        its pipeline degree, FSSDP experts update their load window, re-shard when due and place the next step."""
        for part in (self.dispatcher, self.experts):
            part.after_step(step, global_tokens_per_expert_E, optimizer)

    def step_metrics(self) -> dict:
        """Per-layer parallel telemetry since the last call (e.g. FSSDP replicas, owners, SparseAllGather volume)."""
        prefix = f"moe/layer{self.layer_id}"
        return {**self.dispatcher.step_metrics(prefix), **self.experts.step_metrics(prefix)}

    def trainer_state(self) -> dict:
        """Run-time decisions that are not parameters (pipeline degree tuning, FSSDP owners and load window), as
        JSON-able values for the checkpoint."""
        return {"dispatcher": self.dispatcher.run_state(), "experts": self.experts.run_state()}

    def load_trainer_state(self, state: dict) -> list[str]:
        """Restore `trainer_state()` (call before loading the weights); returns what had to be re-derived instead
        because it was saved under another layout."""
        rederived = []
        if not self.dispatcher.load_run_state(state.get("dispatcher", {})):
            rederived.append(f"layer {self.layer_id} pipeline degree")
        if not self.experts.load_run_state(state.get("experts", {})):
            rederived.append(f"layer {self.layer_id} expert placement")
        return rederived
