"""Per-step routing bookkeeping: global token counts, the aux-loss-free bias update, routing telemetry.

Legend: E experts, L local experts, W world size, N MoE layers.

Each training forward returns one RoutingRecord per MoE layer; `observe` accumulates them (a recomputation in
backward returns its records to nobody, so nothing is counted twice). After the backward pass of the last micro-batch
and before the optimizer step:
    c_NE = sum over micro-batches of each layer's tokens_per_expert_E, all-reduced over all ranks (one collective)
    b_E += u_s * (mean(c_E) - c_E) / mean(c_E)    per layer (balance/bias.py; bias_update_rule=sign: u_s * sign(...)),
                                                  u_s = bias_update_rate until bias_update_stop_frac * max_steps, then 0
The counts are also what the routing metrics (MaxVio etc.) are computed from, so telemetry costs no extra collective
except the per-rank compute load, gathered on logging steps only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from moetrain.balance.bias import bias_rate_at, bias_update_
from moetrain.config.schema import RouterConfig
from moetrain.moe.layer import MoELayer, RoutingRecord
from moetrain.parallel.mesh import ParallelContext


class BalanceController:
    def __init__(self, model: nn.Module, router_cfg: RouterConfig, max_steps: int, ctx: ParallelContext):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        self.cfg, self.max_steps, self.ctx = router_cfg, max_steps, ctx
        self._index = {m.layer_id: i for i, m in enumerate(self.layers)}
        self._reset_counts()
        self._reset_accumulators()

    def _reset_counts(self) -> None:
        self._counts_NE = [torch.zeros(m.num_experts, dtype=torch.float32, device=m.router.expert_bias_E.device)
                           for m in self.layers]

    def _reset_accumulators(self) -> None:
        n = len(self.layers)
        self._rows_computed = [torch.zeros((), dtype=torch.float64) for _ in range(n)]
        self._dropped, self._copies, self._tokens = [0] * n, [0] * n, [0] * n
        self._entropy = [0.0] * n

    def observe(self, records: Sequence[RoutingRecord]) -> None:
        """Accumulate the routing records of one training micro-batch."""
        for record in records:
            i = self._index[record.layer_id]
            self._counts_NE[i] += record.tokens_per_expert_E.detach()
            self._rows_computed[i] += record.tokens_per_local_expert_L.sum().double().cpu()
            self._dropped[i] += record.num_dropped
            self._copies[i] += record.num_copies
            self._entropy[i] += float(record.entropy_sum)
            self._tokens[i] += record.num_tokens

    @torch.no_grad()
    def step(self, step: int, update_bias: bool = True) -> list[torch.Tensor]:
        """Reduce this step's counts over all ranks, update the biases (unless `update_bias` is False: a skipped,
        non-finite step), reset the counters. Returns counts_NE: one tensor of E_i counts per MoE layer (layers may
        have different E, model.experts_per_layer), reduced as one flat collective."""
        if not self.layers:
            return []
        flat = torch.cat(self._counts_NE)
        if self.ctx.is_distributed:
            dist.all_reduce(flat, group=self.ctx.world_group)
        counts_NE = list(flat.split([c.numel() for c in self._counts_NE]))
        rate = bias_rate_at(step, self.max_steps, self.cfg.bias_update_rate, self.cfg.bias_update_stop_frac)
        for m, counts_E in zip(self.layers, counts_NE):
            if update_bias and rate > 0 and not self.cfg.force_balanced:
                bias_update_(m.router.expert_bias_E, counts_E, rate, self.cfg.bias_update_center,
                             self.cfg.bias_update_rule)
        self._reset_counts()
        return counts_NE

    @torch.no_grad()
    def pop_compute_stats(self) -> dict[str, list[float]]:
        """Per layer: rows computed per rank (gathered over ranks), the dropped fraction, the mean routing entropy and
        the mean number of experts a token was routed to (copies the router kept per token) since the last call (reduced over ranks); resets the accumulators. A dense model (no MoE layer) gets empty
        lists and runs no collective (every rank has the same layers, so all skip it together)."""
        if not self.layers:
            return {"rank_loads": [], "dropped_frac": [], "entropy": [], "experts_per_token": []}
        rows_N = torch.stack(self._rows_computed).to(self.ctx.device)
        sums = torch.tensor([self._dropped, self._copies, self._entropy, self._tokens], dtype=torch.float64,
                            device=self.ctx.device)
        if self.ctx.is_distributed:
            gathered = [torch.empty_like(rows_N) for _ in range(self.ctx.world_size)]
            dist.all_gather(gathered, rows_N, group=self.ctx.world_group)
            rows_WN = torch.stack(gathered)
            dist.all_reduce(sums, group=self.ctx.world_group)
        else:
            rows_WN = rows_N[None]
        self._reset_accumulators()
        return {"rank_loads": rows_WN.t().cpu().tolist(),
                "dropped_frac": (sums[0] / sums[1].clamp(min=1)).cpu().tolist(),
                "entropy": (sums[2] / sums[3].clamp(min=1)).cpu().tolist(),
                "experts_per_token": (sums[1] / sums[3].clamp(min=1)).cpu().tolist()}
