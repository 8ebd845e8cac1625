"""Where experts live: a `Placement` lists, per expert, the ranks that compute it (owner first).

Expert parallelism uses the static contiguous placement (rank w holds experts [w*E/W, (w+1)*E/W)); FSSDP
(parallel/fssdp/) supplies a new one every step, with hot experts materialized on several ranks. The all-to-all
dispatcher routes every token copy by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Placement:
    """Which ranks materialize which experts. `replicas[e]` lists ranks (owner first, then sorted)."""

    replicas: tuple[tuple[int, ...], ...]
    world_size: int

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    def owner(self, e: int) -> int:
        return self.replicas[e][0]

    def owned(self, rank: int) -> list[int]:
        return [e for e, reps in enumerate(self.replicas) if reps[0] == rank]

    def materialized(self, rank: int) -> list[int]:
        """Experts rank computes this step, in increasing expert id."""
        return [e for e, reps in enumerate(self.replicas) if rank in reps]

    def num_replicas(self) -> list[int]:
        return [len(r) for r in self.replicas]

    def has_replicas(self) -> bool:
        return any(len(r) > 1 for r in self.replicas)

    @staticmethod
    def from_owners(owners: Sequence[int], world_size: int) -> "Placement":
        return Placement(tuple((int(o),) for o in owners), world_size)

    @staticmethod
    def contiguous(num_experts: int, world_size: int) -> "Placement":
        """Expert parallelism's layout: rank w owns experts [w*L, (w+1)*L)."""
        per = num_experts // world_size
        return Placement.from_owners([e // per for e in range(num_experts)], world_size)
