"""FSSDP experts: own E/W whole experts, compute on the experts the step's placement materializes here.

Legend: R rows arriving (grouped by materialized expert), D model dim, F hidden dim, L owned experts,
M materialized experts (owned + replicas), X = 3*D*F elements of one expert (w1, w3, w2 flattened).

    owned_LX = [w1_LDF | w3_LDF | w2_LFD]            (one row per owned expert)
    mat_MX   = SparseAllGather(owned_LX)            (backward: SparseReduceScatter onto the owners)
    y_RD     = SwiGLU experts of mat_MX on x_RD     (the same grouped GEMM as expert parallelism)

Re-materialization (optional): the gathered weights are not kept for backward; saved-tensor hooks replace them by a
marker and gather them again (once per layer) when backward first needs them, trading one more spAG for the memory of
the replicas between forward and backward.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from einops import rearrange
from torch.autograd.graph import saved_tensors_hooks

from moetrain.moe.experts import GroupedExperts
from moetrain.parallel.fssdp.collectives import SparseAllGather, sparse_all_gather
from moetrain.parallel.fssdp.state import FSSDPLayerState


class ShardedExperts(GroupedExperts):
    def __init__(self, dim: int, hidden: int, state: FSSDPLayerState, backend: str = "auto",
                 rematerialize: bool = False):
        super().__init__(dim, hidden, state.owned_ids, backend)
        self.state, self.rematerialize = state, rematerialize
        self.expert_ids = state.owned_ids  # the same list object: resharding updates it in place
        for p in self.parameters():
            p.expert_ids = self.expert_ids
        self.last_materialized = None  # weakref to the last gathered weights (tests check they are freed)

    # ------------------------------------------------------------------------------------- per-step hooks
    def after_step(self, step: int, global_tokens_per_expert_E: torch.Tensor, optimizer) -> None:
        """Update the load window, re-shard when due (weights and optimizer state move) and place the next step."""
        self.state.after_step(step, global_tokens_per_expert_E, list(self.parameters()), optimizer)

    def step_metrics(self, prefix: str) -> dict:
        """Replicas, owners and the fallback's replica budget now, and the SparseAllGather bytes this rank sent since
        the last call."""
        metrics = {f"{prefix}/replicas": self.state.placement.num_replicas(), f"{prefix}/owners": list(self.state.owners),
                   f"{prefix}/fssdp_budget": self.state.controller.budget,
                   f"{prefix}/spag_bytes_rank0": self.state.bytes_gathered}
        self.state.bytes_gathered = 0
        return metrics

    def run_state(self) -> dict:
        return {"fssdp": self.state.state_dict()}

    def load_run_state(self, state: dict) -> bool:
        """Adopt saved owners before the weights load (see FSSDPLayerState.load_state_dict)."""
        return "fssdp" not in state or self.state.load_state_dict(state["fssdp"])

    def _owned_LX(self) -> torch.Tensor:
        w1_LDF, w3_LDF, w2_LFD = self.w1_EDF, self.w3_EDF, self.w2_EFD
        return torch.cat([rearrange(w1_LDF, "l d f -> l (d f)"), rearrange(w3_LDF, "l d f -> l (d f)"),
                          rearrange(w2_LFD, "l f d -> l (f d)")], 1)

    def _split(self, mat_MX: torch.Tensor):
        """The inverse of `_owned_LX` for M rows: views (w1_MDF, w3_MDF, w2_MFD) into mat_MX."""
        D, F = self.w1_EDF.shape[1:]
        w1_MX, w3_MX, w2_MX = mat_MX.split(D * F, dim=1)
        return (rearrange(w1_MX, "m (d f) -> m d f", d=D), rearrange(w3_MX, "m (d f) -> m d f", d=D),
                rearrange(w2_MX, "m (f d) -> m f d", f=F))

    @contextmanager
    def materialize(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Gather the step's replicas (spAG; backward: spRS) and yield the stacked weights of every expert this rank
        computes, in id order. With re-materialization, saved-tensor hooks active inside the block keep only markers
        for the gathered weights and gather them again when backward first needs them."""
        if not self.state.placement.has_replicas():
            # Every rank computes exactly the experts it owns (in id order): no collective on any rank, and the
            # parameters are used as they are, at expert parallelism's cost.
            self.last_materialized = None
            yield self.w1_EDF, self.w3_EDF, self.w2_EFD
            return
        plan, group = self.state.gather_plan(), self.state.group
        owned_LX = self._owned_LX()
        self.state.bytes_gathered += plan.experts_sent * owned_LX.shape[1] * owned_LX.element_size()
        remat = self.rematerialize and torch.is_grad_enabled()
        cache: dict[str, torch.Tensor] = {}
        mat_MX = SparseAllGather.apply(owned_LX, plan, group, cache.clear if remat else None)
        self.last_materialized = weakref.ref(mat_MX)
        if not remat:
            yield self._split(mat_MX)
            return

        storage = mat_MX.untyped_storage().data_ptr()

        def pack(t: torch.Tensor):
            if t.untyped_storage().data_ptr() == storage:
                return ("rematerialize", t.storage_offset(), tuple(t.shape), t.stride())
            return t

        def unpack(packed):
            if not isinstance(packed, tuple):
                return packed
            if "weights" not in cache:
                with torch.no_grad():
                    self.state.bytes_gathered += plan.experts_sent * owned_LX.shape[1] * owned_LX.element_size()
                    cache["weights"] = sparse_all_gather(self._owned_LX(), plan, group)
            _, offset, shape, stride = packed
            return cache["weights"].as_strided(shape, stride, offset)

        with saved_tensors_hooks(pack, unpack):
            yield self._split(mat_MX)
