"""Per-layer FSSDP state shared by the layer's dispatcher and its sharded experts.

Legend: E experts, W ranks, L = E / W owned experts per rank.

Life of one step:  forward: dispatcher asks `placement_for(counts)` -> placement P1 (optionally calibrated with this
step's routing); experts gather P1's replicas (spAG), compute, and in backward reduce replica gradients onto owners
(spRS). After the optimizer step the trainer calls `after_step(global counts)`: the load history is updated, owners are
re-chosen by load every `reshard_every` steps (weights and optimizer state move to the new owners), and the next
step's placement is computed. Before that, the placement just used is scored on the step's realised counts against
owners only (placement.py: `BudgetController`), which sets the replica budget of the next placements: the fallback
towards expert parallelism when the load prediction has been wrong. Every rank computes the same owners, budget and
placements from the same all-reduced counts.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from moetrain.config.schema import FSSDPConfig
from moetrain.parallel.fssdp.collectives import GatherPlan, build_gather_plan
from moetrain.parallel.dispatch.placement import Placement
from moetrain.parallel.fssdp.placement import (BudgetController, LoadPredictor, balanced_owners, place_replicas,
                                               replica_cost_rows)


class FSSDPLayerState:
    def __init__(self, num_experts: int, group: dist.ProcessGroup, cfg: FSSDPConfig, element_size: int = 4):
        """element_size: bytes per element of the expert weights that spAG moves (fp32 master weights: 4)."""
        self.num_experts, self.group, self.cfg = num_experts, group, cfg
        # One replica's copy cost at one end, in rows, per forward: spAG + spRS, and one more spAG with
        # re-materialization (3 transfers instead of 2).
        self.kappa = replica_cost_rows(cfg.flops_per_byte, element_size) * (1.5 if cfg.rematerialize else 1.0)
        self.forwards = 0  # placements asked for since the last step (micro-batches: each forward gathers again)
        self.controller = BudgetController(cfg.budget, enabled=cfg.fallback, window=cfg.window)
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        per = num_experts // self.world
        self.owners = [e // per for e in range(num_experts)]
        self.owned_ids: list[int] = [e for e in range(num_experts) if self.owners[e] == self.rank]
        self.predictor = LoadPredictor(num_experts, cfg.window)
        self.placement = Placement.from_owners(self.owners, self.world)
        self.probe = self.placement  # the placement scored after the step (= placement unless the budget is 0)
        self.step_kappa = self.kappa  # kappa * forwards per step (set from the last step)
        self._gather_plan: tuple[Optional[Placement], Optional[GatherPlan]] = (None, None)
        self.bytes_gathered = 0  # spAG volume sent by this rank since the last `pop_traffic`

    # --------------------------------------------------------------------------------------- during forward
    def placement_for(self, tokens_per_expert_E: torch.Tensor) -> Placement:
        if torch.is_grad_enabled():  # training forwards (evaluation's do not count towards the step's copies)
            self.forwards += 1
        if self.cfg.calibrate and self.cfg.budget > 0:
            current_E = tokens_per_expert_E.detach().to(torch.float64).clone()
            dist.all_reduce(current_E, group=self.group)
            self._place(self.predictor.predict(current_E))
        return self.placement

    def _place(self, predicted_E: list[float]) -> None:
        """This step's placement from the predicted load: replicas under the controller's budget (a probe with one
        replica per rank while that budget is 0, scored after the step but not used: owners only then)."""
        self.probe = place_replicas(self.owners, predicted_E, self.world, self.controller.probe_budget,
                                    self.step_kappa)
        self.placement = self.probe if self.controller.budget > 0 else Placement.from_owners(self.owners, self.world)

    def gather_plan(self) -> GatherPlan:
        if self._gather_plan[0] is not self.placement:
            self._gather_plan = (self.placement, build_gather_plan(self.placement, self.owned_ids, self.rank))
        return self._gather_plan[1]

    # ------------------------------------------------------------------------------------ after the step
    def after_step(self, step: int, global_counts_E: torch.Tensor, params: list[torch.Tensor],
                   optimizer: Optional[torch.optim.Optimizer]) -> None:
        # The counts are the whole step's (all micro-batches) and so is the prediction made from them, while every
        # forward gathers the replicas again: the step pays kappa once per forward.
        self.step_kappa = self.kappa * max(1, self.forwards)
        self.forwards = 0
        realised_E = global_counts_E.detach().double().cpu().tolist()
        self.controller.update(self.probe, Placement.from_owners(self.owners, self.world), realised_E,
                               self.step_kappa)
        self.predictor.observe(global_counts_E)
        if self.cfg.reshard_every and step % self.cfg.reshard_every == 0:
            self.reshard(balanced_owners(self.predictor.predict(), self.world), params, optimizer)
        self._place(self.predictor.predict())

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """Owners and the load window as JSON-able values (the expert rows themselves are checkpointed by global
        id, so they load under any owners)."""
        return {"owners": list(self.owners), "history": [c.tolist() for c in self.predictor.history],
                "budget": self.controller.budget, "gains": list(self.controller.gains), "step_kappa": self.step_kappa}

    def load_state_dict(self, state: dict) -> bool:
        """Adopt saved owners and load window *before* the checkpoint's expert rows are loaded: the owned ids are
        relabelled in place (no data moves; the load that follows fills the rows by global id) and the next
        placement is re-computed exactly as `after_step` computed it. Returns False, keeping the current owners,
        when the saved owners do not fit this layout (other world size or expert count)."""
        owners = [int(o) for o in state.get("owners", [])]
        per = self.num_experts // self.world
        if len(owners) != self.num_experts or any(owners.count(w) != per for w in range(self.world)):
            return False
        self.owners = owners
        self.owned_ids[:] = [e for e in range(self.num_experts) if owners[e] == self.rank]
        self.predictor.history.clear()
        for counts in state.get("history", []):
            self.predictor.observe(torch.tensor(counts, dtype=torch.float64))
        self.controller.budget = min(int(state.get("budget", self.cfg.budget)), self.cfg.budget)
        self.controller.gains.clear()
        self.controller.gains.extend(float(g) for g in state.get("gains", []))
        self.step_kappa = float(state.get("step_kappa", self.kappa))
        self._place(self.predictor.predict())
        self._gather_plan = (None, None)
        return True

    @torch.no_grad()
    def reshard(self, new_owners: list[int], params: list[torch.Tensor],
                optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Move owned rows of `params` (and their optimizer state) so that expert e lives on new_owners[e]."""
        if new_owners == self.owners:
            return
        old_ids = list(self.owned_ids)
        new_ids = [e for e in range(self.num_experts) if new_owners[e] == self.rank]
        send_rows = sorted(range(len(old_ids)), key=lambda i: (new_owners[old_ids[i]], old_ids[i]))
        send_splits = [sum(1 for e in old_ids if new_owners[e] == w) for w in range(self.world)]
        arriving = [e for w in range(self.world) for e in range(self.num_experts)
                    if self.owners[e] == w and new_owners[e] == self.rank]  # arrival order: (source, expert)
        recv_splits = [sum(1 for e in arriving if self.owners[e] == w) for w in range(self.world)]
        place = torch.tensor([arriving.index(e) for e in new_ids], dtype=torch.long)
        tensors = list(params)
        if optimizer is not None:
            for p in params:
                tensors += [t for t in optimizer.state.get(p, {}).values()
                            if isinstance(t, torch.Tensor) and t.shape == p.shape]
        for t in tensors:
            rows_LX = t.view(t.shape[0], -1)
            send = rows_LX.index_select(0, torch.tensor(send_rows, dtype=torch.long, device=t.device))
            recv = torch.empty_like(send)
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=self.group)
            rows_LX.copy_(recv.index_select(0, place.to(t.device)))
        self.owners = list(new_owners)
        self.owned_ids[:] = new_ids  # in place: parameters share this list as their `expert_ids`
        self._gather_plan = (None, None)
