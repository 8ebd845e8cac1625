"""Expert ownership and per-step placement for FSSDP.

Legend: E experts of one layer, W ranks, m extra materialized experts allowed per rank (the memory budget).

Ownership P0: every expert has exactly one owner, each rank owns E/W experts (so parameter and optimizer-state shapes
never change; which experts a rank owns does). `balanced_owners` picks owners so that the expected load per rank is
balanced: experts in decreasing load order, each to the least-loaded rank that still has a free slot (LPT greedy).

Placement P1 (contains P0): replicas of hot experts under the budget, greedy on the predicted load c_e:
    per-replica load  q_e = c_e / r_e        (r_e = number of ranks materializing e; tokens of e are spread over them)
    rank load         l_w = sum over e materialized on w of q_e
repeat: on the busiest rank, take the expert with the largest q_e and add a replica on the least-loaded rank that
lacks it and has budget left, if that rank stays below the busiest one afterwards; stop when no such move exists.
Hot experts thus gain replicas in proportion to their load, and go everywhere when the budget allows.

Prediction: `LoadPredictor` keeps a sliding window of past global token counts per expert (mean over the window),
optionally blended with the current step's counts (calibration). Every rank computes the same placement from the same
all-reduced counts, so placement needs no communication of its own.
"""

from __future__ import annotations

from collections import deque
from typing import Optional, Sequence

import torch

from moetrain.parallel.dispatch.placement import Placement


def balanced_owners(load_E: Sequence[float], world_size: int) -> list[int]:
    """Owner per expert: E/W experts per rank, expected load balanced (hottest first to the least-loaded rank)."""
    E = len(load_E)
    per = E // world_size
    rank_load = [0.0] * world_size
    slots = [per] * world_size
    owners = [0] * E
    for e in sorted(range(E), key=lambda i: (-float(load_E[i]), i)):
        w = min((r for r in range(world_size) if slots[r] > 0), key=lambda r: (rank_load[r], r))
        owners[e] = w
        slots[w] -= 1
        rank_load[w] += float(load_E[e])
    return owners


def place_replicas(owners: Sequence[int], load_E: Sequence[float], world_size: int, budget: int) -> Placement:
    """Placement P1 from ownership P0 and predicted load, at most `budget` extra experts per rank (see module doc)."""
    E = len(owners)
    replicas = [[int(owners[e])] for e in range(E)]
    load = [max(float(x), 0.0) for x in load_E]
    extra = [0] * world_size

    def rank_loads() -> list[float]:
        out = [0.0] * world_size
        for e in range(E):
            for w in replicas[e]:
                out[w] += load[e] / len(replicas[e])
        return out

    if budget <= 0 or sum(load) == 0:
        return Placement(tuple(tuple(r) for r in replicas), world_size)
    while True:
        loads = rank_loads()
        busiest = max(range(world_size), key=lambda r: (loads[r], -r))
        on_busiest = [e for e in range(E) if busiest in replicas[e] and load[e] > 0]
        moved = False
        for e in sorted(on_busiest, key=lambda i: (-load[i] / len(replicas[i]), i)):
            candidates = [w for w in range(world_size) if w not in replicas[e] and extra[w] < budget]
            if not candidates:
                continue
            w = min(candidates, key=lambda r: (loads[r], r))
            if loads[w] + load[e] / (len(replicas[e]) + 1) < loads[busiest] - 1e-9:
                replicas[e].append(w)
                extra[w] += 1
                moved = True
                break
        if not moved:
            break
    return Placement(tuple((r[0], *sorted(r[1:])) for r in replicas), world_size)


class LoadPredictor:
    """Mean of the last `window` steps' global counts per expert, optionally blended with the current counts."""

    def __init__(self, num_experts: int, window: int = 8):
        self.num_experts = num_experts
        self.history: deque[torch.Tensor] = deque(maxlen=max(1, window))

    def observe(self, counts_E: torch.Tensor) -> None:
        self.history.append(counts_E.detach().double().cpu())

    def predict(self, current_E: Optional[torch.Tensor] = None, calibration: float = 0.5) -> list[float]:
        if not self.history and current_E is None:
            return [1.0] * self.num_experts
        if not self.history:
            return current_E.double().cpu().tolist()
        mean_E = torch.stack(list(self.history)).mean(0)
        if current_E is not None:
            mean_E = (1 - calibration) * mean_E + calibration * current_E.double().cpu()
        return mean_E.tolist()
