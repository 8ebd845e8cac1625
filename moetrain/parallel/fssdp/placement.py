"""Expert ownership and per-step placement for FSSDP.

Legend: E experts of one layer, W ranks, m extra materialized experts allowed per rank (the memory budget).

Ownership P0: every expert has exactly one owner, each rank owns E/W experts (so parameter and optimizer-state shapes
never change; which experts a rank owns does). `balanced_owners` picks owners so that the expected load per rank is
balanced: experts in decreasing load order, each to the least-loaded rank that still has a free slot (LPT greedy).

Placement P1 (contains P0): replicas of hot experts under the budget, greedy on the predicted load c_e (rows) and a
cost model of the step, in units of one routed row's expert compute (forward + backward):
    per-replica load  q_e = c_e / r_e        (r_e = number of ranks materializing e; tokens of e are spread over them)
    rank time         t_w = sum over e materialized on w of q_e  +  kappa * (sent_w + recv_w)
    step time         T(P) = max over w of t_w                      (the step waits for the slowest rank)
sent_w = replicas of w's owned experts on other ranks, recv_w = replicas w holds: each is one expert through spAG
(forward) and spRS (backward) at this end, kappa rows each (`step_costs`; kappa from `replica_cost_rows`).
repeat: on the busiest rank, take the expert with the largest q_e and add a replica on the least-loaded rank that
lacks it and has budget left, if every rank it changes (the holders of e, the new holder, the owner) ends below the
busiest rank's old time; stop when no such move exists. On the busiest rank as owner this reads
c_e / (r_e (r_e + 1)) > kappa: a replica is added only when the rows it saves there exceed its copy cost.
Hot experts thus gain replicas in proportion to their load, and go everywhere when the budget and kappa allow.

Fallback (`BudgetController`): the budget actually used, b_t <= budget, follows how the prediction fared:
    g_t      = T(P0; c_t) - T(P_t; c_t)  (realised gain over owners only P0; c_t: the step's realised counts; P_t
                                          placed from the prediction with budget max(b_t, 1), so that a budget of
                                          0 still probes one replica per rank)
    mean_g_t = mean of g over the last `window` steps
    b_{t+1}  = floor(b_t / 2)        if g_t < 0          (replicas made this step slower than owners only)
               min(b_t + 1, budget)  elif mean_g_t > 0   (they have saved time on average lately)
               b_t                   otherwise
With stationary skew g_t > 0 and b_t = budget; when popularity drifts faster than the window follows, the placement
mispredicts, b_t falls to 0 (owners only: expert parallelism's cost) and grows back one step at a time once the
prediction has been right for long enough to outweigh the recent losses.

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


def replica_cost_rows(flops_per_byte: float, element_size: int) -> float:
    """kappa: one replica's copy cost at one end, in rows of expert compute.

    A row costs 18 D F FLOPs (SwiGLU: three D x F matmuls, 2 FLOPs per multiply-add, forward + 2x backward); one
    end of a replica moves 3 D F * element_size bytes in spAG and the same in spRS. With the machine balance
    `flops_per_byte` (FLOPs that take as long as moving one byte), D F cancels:
        kappa = 2 * 3 D F * element_size * flops_per_byte / (18 D F) = element_size * flops_per_byte / 3
    """
    return element_size * flops_per_byte / 3.0


def step_costs(replicas: Sequence[Sequence[int]], load_E: Sequence[float], world_size: int,
               kappa: float) -> list[float]:
    """t_w = sum_{e on w} c_e / r_e + kappa * (sent_w + recv_w) for every rank (module doc); T(P) is their max."""
    out = [0.0] * world_size
    for e, reps in enumerate(replicas):
        r = len(reps)
        for w in reps:
            out[w] += float(load_E[e]) / r
        if r > 1:
            out[reps[0]] += kappa * (r - 1)  # the owner sends r - 1 copies (and reduces r - 1 gradients)
            for w in reps[1:]:
                out[w] += kappa
    return out


def step_cost(placement: Placement, load_E: Sequence[float], kappa: float = 0.0) -> float:
    """T(P): the predicted (or, with realised counts, realised) step time of a placement, in rows."""
    return max(step_costs(placement.replicas, load_E, placement.world_size, kappa))


def place_replicas(owners: Sequence[int], load_E: Sequence[float], world_size: int, budget: int,
                   kappa: float = 0.0) -> Placement:
    """Placement P1 from ownership P0 and predicted load (rows), at most `budget` extra experts per rank, each
    replica costing `kappa` rows at each end (0: copies are free, pure row balancing); see the module doc."""
    E = len(owners)
    replicas = [[int(owners[e])] for e in range(E)]
    load = [max(float(x), 0.0) for x in load_E]
    extra = [0] * world_size
    if budget <= 0 or sum(load) == 0:
        return Placement(tuple(tuple(r) for r in replicas), world_size)
    while True:
        t = step_costs(replicas, load, world_size, kappa)
        busiest = max(range(world_size), key=lambda r: (t[r], -r))
        on_busiest = [e for e in range(E) if busiest in replicas[e] and load[e] > 0]
        moved = False
        for e in sorted(on_busiest, key=lambda i: (-load[i] / len(replicas[i]), i)):
            candidates = [w for w in range(world_size) if w not in replicas[e] and extra[w] < budget]
            if not candidates:
                continue
            w = min(candidates, key=lambda r: (t[r], r))
            r = len(replicas[e])
            new = dict((h, t[h] - load[e] / r + load[e] / (r + 1)) for h in replicas[e])
            new[w] = t[w] + load[e] / (r + 1) + kappa
            new[replicas[e][0]] += kappa
            if max(new.values()) < t[busiest] - 1e-9:
                replicas[e].append(w)
                extra[w] += 1
                moved = True
                break
        if not moved:
            break
    return Placement(tuple((r[0], *sorted(r[1:])) for r in replicas), world_size)


class BudgetController:
    """The fallback towards expert parallelism: the replica budget b_t in use follows the realised gain of the
    placements (module doc: halve after a step where replicas were slower than owners only, + 1 while they have
    saved time on average over the last `window` steps)."""

    def __init__(self, budget: int, enabled: bool = True, window: int = 8):
        self.max_budget, self.enabled = budget, enabled
        self.budget = budget  # b_t
        self.gains: deque[float] = deque(maxlen=max(1, window))  # g over the last `window` steps, in rows

    @property
    def probe_budget(self) -> int:
        """The budget a placement is computed with: b_t, or 1 while b_t = 0 (the probe that can bring it back)."""
        return max(self.budget, min(1, self.max_budget)) if self.enabled else self.max_budget

    def update(self, probe: Placement, owners_only: Placement, realised_E: Sequence[float], kappa: float) -> int:
        """Score the probe placement on the realised counts against owners only; return the next b_t."""
        if not self.enabled:
            return self.budget
        gain = step_cost(owners_only, realised_E, kappa) - step_cost(probe, realised_E, kappa)
        self.gains.append(gain)
        if gain < 0:
            self.budget //= 2
        elif sum(self.gains) > 0:
            self.budget = min(self.budget + 1, self.max_budget)
        return self.budget


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
