"""All-to-all dispatcher: tokens travel to the ranks that compute their experts with one uneven all-to-all, and back.

Legend: T tokens on this rank, D model dim, E experts, W ranks in the group, M experts materialized on this rank,
R rows leaving this rank, Rr rows arriving.

Where experts live is a `Placement` (parallel/dispatch/placement.py): expert parallelism uses the static contiguous one
(rank w holds experts [w*E/W, (w+1)*E/W)); FSSDP supplies a new one every step, with hot experts on several ranks.
Destination of a routed copy of expert e sent from rank s (Hecate's rule):
    s itself if s materializes e, else replicas(e)[(i + s) mod r_e]     (i = index of the copy among e's copies)
so the tokens of a replicated expert spread evenly over its replicas. Rows are ordered by (destination, expert), then
    counts_WE = all_to_all(send_counts_WE)             # rows each source sends me, per expert
    send_splits_W = send_counts_WE.sum(1);  recv_splits_W = counts_WE.sum(1)
    tokens_per_local_expert_M = counts_WE[:, materialized].sum(0)
(per pipeline chunk, restricted to the chunk's experts: see `plan`).
Arriving rows are ordered (source, expert); `regroup_idx_Rr` reorders them to (expert, source) for the grouped GEMM and
its inverse restores the order for the combine. Zero-size splits (a rank that sends or receives nothing, an expert
nobody picks) are ordinary. The token all-to-all is torch's functional collective: autograd-aware (its backward is the
reverse all-to-all) and asynchronous (waited for on first use), which lets shared experts run while tokens are in
flight - on CPU through gloo's background threads, on GPU on NCCL's stream. The payload travels in the rows' dtype:
bf16 under mixed precision (the MoE layer casts the tokens before dispatch, the experts return bf16), so dispatch,
combine and their backward move half the bytes of fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.distributed as dist
from einops import rearrange
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moetrain.moe.plan import RoutingPlan, build_plan, permute, permute_rows, unpermute
from moetrain.parallel.pipeline import (DegreeTuner, RegionTiming, chunk_of_slot, chunk_slot_range, clock_start,
                                        mark_region_input, mark_region_output)
from moetrain.parallel.dispatch.placement import Placement


class PlacementSource(Protocol):
    owners: list[int]  # owner rank of each expert now (changes only between steps, e.g. FSSDP re-sharding)

    def placement_for(self, tokens_per_expert_E: torch.Tensor) -> Placement: ...


class StaticPlacement:
    """Expert parallelism: the same placement every step."""

    def __init__(self, placement: Placement):
        self.placement = placement
        self.owners = [placement.owner(e) for e in range(placement.num_experts)]

    def placement_for(self, tokens_per_expert_E: torch.Tensor) -> Placement:
        return self.placement


@dataclass
class ChunkPlan:
    """One pipeline chunk: a contiguous range of every destination's local experts, sent as one all-to-all."""

    rows: slice  # this chunk's rows in the send buffer
    send_splits: list[int]
    recv_splits: list[int]
    regroup_idx_Rr: torch.Tensor  # arrival order -> (expert, source) order
    restore_idx_Rr: torch.Tensor  # inverse permutation
    experts: slice  # this chunk's slice of the experts computed here (materialized, in id order)
    tokens_per_local_expert_L: torch.Tensor  # rows per expert of that slice


@dataclass
class AllToAllPlan:
    local: RoutingPlan  # rows in (chunk, destination, expert) order
    placement: Placement
    chunks: list[ChunkPlan]
    timing: Optional[RegionTiming] = None  # clocks of a micro-batch timed for the degree tuner (see `plan`)

    @property
    def num_dropped(self) -> int:
        return self.local.num_dropped

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def send_splits(self) -> list[int]:
        """Rows sent to each rank over all chunks."""
        return [sum(c.send_splits[w] for c in self.chunks) for w in range(len(self.chunks[0].send_splits))]

    @property
    def tokens_per_local_expert_L(self) -> torch.Tensor:
        return torch.cat([c.tokens_per_local_expert_L for c in self.chunks])


def regroup_index(counts_WL: torch.Tensor) -> torch.Tensor:
    """Row permutation taking blocks ordered (w, l) to blocks ordered (l, w); block (w, l) has counts_WL[w, l] rows."""
    W, L = counts_WL.shape
    c = counts_WL.flatten()
    src_start = torch.cumsum(c, 0) - c
    order = rearrange(torch.arange(W * L, device=c.device), "(w l) -> (l w)", w=W)  # block ids in (l, w) order
    c_ord, s_ord = c[order], src_start[order]
    dst_start = torch.cumsum(c_ord, 0) - c_ord
    total = int(c.sum())
    return torch.arange(total, device=c.device) + torch.repeat_interleave(s_ord - dst_start, c_ord, output_size=total)


class _PlacementTables:
    """Per-placement lookup tensors for destination assignment on one rank."""

    def __init__(self, placement: Placement, rank: int, device):
        E, W = placement.num_experts, placement.world_size
        reps = placement.replicas
        self.contiguous = all(len(r) == 1 for r in reps) and [r[0] for r in reps] == sorted(r[0] for r in reps)
        self.owner_E = torch.tensor([r[0] for r in reps], dtype=torch.long, device=device)
        self.count_E = torch.tensor([len(r) for r in reps], dtype=torch.long, device=device)
        table = torch.full((E, W), -1, dtype=torch.long)
        for e, r in enumerate(reps):
            table[e, : len(r)] = torch.tensor(r)
        self.table_EW = table.to(device)
        self.local_E = torch.tensor([rank in r for r in reps], dtype=torch.bool, device=device)
        self.materialized = torch.tensor(placement.materialized(rank), dtype=torch.long, device=device)
        # slot_WE[w, e]: position of e among the experts rank w computes (id order), -1 if w does not compute e.
        slot = torch.full((W, E), -1, dtype=torch.long)
        for w in range(W):
            mine = placement.materialized(w)
            slot[w, mine] = torch.arange(len(mine))
        self.slot_WE = slot.to(device)
        self.num_materialized_W = (slot >= 0).sum(1).to(device)


def assign_destinations(expert_R: torch.Tensor, counts_E: torch.Tensor, tab: _PlacementTables,
                        rank: int) -> torch.Tensor:
    """dest_R: the rank each routed copy goes to, for rows sorted by expert (counts_E per expert) on `rank`: the
    expert's owner under a contiguous placement, else `rank` itself when it materializes the expert, else
    replicas(e)[(i + rank) mod r_e] for the i-th copy of e (module docstring)."""
    if tab.contiguous:
        return tab.owner_E[expert_R]  # rows are already in destination order
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    copy_R = torch.arange(expert_R.shape[0], device=counts_E.device) - starts_E[expert_R]
    choice_R = (copy_R + rank) % tab.count_E[expert_R]
    return torch.where(tab.local_E[expert_R], rank, tab.table_EW[expert_R, choice_R])


class AllToAllDispatcher:
    def __init__(self, num_experts: int, group: dist.ProcessGroup, capacity_factor=None, pad_to_capacity=False,
                 placement_source: Optional[PlacementSource] = None, pipeline_degree: str = "1"):
        """pipeline_degree: chunks of the all-to-all ("1", "2", "4", "8"), or "auto" for a DegreeTuner that times
        the training micro-batches (forward + backward, dispatch to combine) and picks the fastest
        (parallel/pipeline.py)."""
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} is not divisible by the group size {self.world}")
        self.num_experts = num_experts
        self.source = placement_source or StaticPlacement(Placement.contiguous(num_experts, self.world))
        self.capacity_factor, self.pad_to_capacity = capacity_factor, pad_to_capacity
        self._tables: tuple[Optional[Placement], Optional[_PlacementTables]] = (None, None)
        self.tuner = DegreeTuner(self.num_local_experts, group) if pipeline_degree == "auto" else None
        self._fixed_degree = 1 if pipeline_degree == "auto" else int(pipeline_degree)
        self._timings: list[RegionTiming] = []  # this step's timed micro-batches (forward, then backward)
        self._location: tuple[Optional[list[int]], Optional[torch.Tensor]] = (None, None)  # (owners, location_E)

    @property
    def degree(self) -> int:
        """Pipeline chunks of this step's forwards (changes only in `after_step`)."""
        return self.tuner.degree if self.tuner is not None else self._fixed_degree

    # ------------------------------------------------------------------------------------- per-step hooks
    def after_step(self, step: int, global_tokens_per_expert_E: Optional[torch.Tensor], optimizer=None) -> None:
        """Feed the step's forward + backward times (and the global load, for drift detection) to the degree
        tuner; the step's backward passes have all run by now."""
        if self.tuner is None:
            return
        for timing in self._timings:
            forward_s, backward_s = timing.seconds()
            self.tuner.record(forward_s, timing.num_tokens, backward_s)
        self._timings.clear()
        self.tuner.end_step(global_tokens_per_expert_E)

    def expert_location_E(self) -> torch.Tensor:
        """location_E: the rank owning each expert now, int64 on the tokens' device (CUDA under NCCL, else CPU), for
        routers that limit the ranks or nodes a token reaches. Expert parallelism: the contiguous owners, e // (E/W);
        FSSDP: the owners its placement source holds now (re-sharding changes them between steps). Replicas are not
        part of it: the step's replicas are chosen after routing, from the routed counts. The same tensor is returned
        until the owners change, so a router may cache what it derives from it."""
        owners = self.source.owners
        cached_owners, location_E = self._location
        if location_E is None or cached_owners != owners:
            backend = str(dist.get_backend(self.group))
            device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
            location_E = torch.tensor(owners, dtype=torch.long, device=device)
            self._location = (list(owners), location_E)
        return location_E

    def step_metrics(self, prefix: str) -> dict:
        return {}

    def run_state(self) -> dict:
        return {} if self.tuner is None else {"pipeline": self.tuner.state_dict()}

    def load_run_state(self, state: dict) -> bool:
        return self.tuner is None or "pipeline" not in state or self.tuner.load_state_dict(state["pipeline"])

    @property
    def num_local_experts(self) -> int:
        """Experts each rank owns (under FSSDP a rank may compute more: the replicas placed on it)."""
        return self.num_experts // self.world

    def _tables_for(self, placement: Placement, device) -> _PlacementTables:
        if self._tables[0] is not placement:
            self._tables = (placement, _PlacementTables(placement, self.rank, device))
        return self._tables[1]

    def plan(self, topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor, num_chunks: Optional[int] = None,
             keep_TK: Optional[torch.Tensor] = None) -> AllToAllPlan:
        """Route, assign destinations, exchange counts. With num_chunks n > 1 (default: `degree`) every destination's
        experts are split into n contiguous slot ranges (chunk of slot s among M experts: s * n // M), rows are
        ordered (chunk, destination, expert) and each chunk travels as its own all-to-all (see parallel/pipeline.py).
        For the tuner, a training micro-batch is timed from here to the end of `combine_postprocess` (forward) and
        from the gradient reaching the combine output to the end of the backward of `dispatch_preprocess` (backward;
        identity autograd markers on the region's input and output). A forward recomputed inside backward
        (activation checkpointing) is not timed as a forward; the recomputation lies in the backward interval."""
        timed = (self.tuner is not None and torch.is_grad_enabled()
                 and torch._C._current_graph_task_id() == -1)  # -1: not inside a backward pass
        timing = RegionTiming(clock_start(topk_idx_TK.device), topk_idx_TK.shape[0]) if timed else None
        num_chunks = self.degree if num_chunks is None else num_chunks
        E, W = self.num_experts, self.world
        local = build_plan(topk_idx_TK, gates_TK, E, self.capacity_factor, self.pad_to_capacity, keep_TK)
        placement = self.source.placement_for(local.tokens_per_expert_E)
        tab = self._tables_for(placement, topk_idx_TK.device)
        counts_E = local.tokens_per_expert_E
        expert_R = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E,
                                           output_size=local.num_rows)
        dest_R = assign_destinations(expert_R, counts_E, tab, self.rank)
        chunk_WE = torch.where(tab.slot_WE >= 0,
                               chunk_of_slot(tab.slot_WE, num_chunks, tab.num_materialized_W.clamp(min=1)[:, None]),
                               torch.zeros_like(tab.slot_WE))
        if num_chunks > 1 or not tab.contiguous:
            key_R = (chunk_WE[dest_R, expert_R] * W + dest_R) * E + expert_R
            order_R = torch.argsort(key_R, stable=True)
            local = local.reordered(order_R)
            dest_R, expert_R = dest_R[order_R], expert_R[order_R]
        send_counts_WE = torch.bincount(dest_R * E + expert_R, minlength=W * E).view(W, E)
        recv_counts_WE = torch.empty_like(send_counts_WE)
        dist.all_to_all_single(recv_counts_WE, send_counts_WE, group=self.group)
        recv_counts_WM = recv_counts_WE.index_select(1, tab.materialized)
        M = recv_counts_WM.shape[1]
        chunks, row = [], 0
        for j in range(num_chunks):
            in_chunk_WE = chunk_WE == j
            send_splits = (send_counts_WE * in_chunk_WE).sum(1).tolist()
            lo, hi = chunk_slot_range(j, num_chunks, M)  # slots s with s * n // M == j
            counts_Wm = recv_counts_WM[:, lo:hi]
            regroup = regroup_index(counts_Wm)
            chunks.append(ChunkPlan(slice(row, row + sum(send_splits)), send_splits, counts_Wm.sum(1).tolist(),
                                    regroup, torch.argsort(regroup), slice(lo, hi), counts_Wm.sum(0)))
            row += sum(send_splits)
        return AllToAllPlan(local=local, placement=placement, chunks=chunks, timing=timing)

    def dispatch_preprocess(self, x_TD, plan: AllToAllPlan):
        return permute(mark_region_input(x_TD, plan.timing), plan.local)

    def dispatch_comm(self, x_RD, plan: AllToAllPlan, chunk: int = 0):
        c = plan.chunks[chunk]
        return all_to_all_single_autograd(x_RD[c.rows].contiguous(), c.recv_splits, c.send_splits, self.group)

    def dispatch_postprocess(self, x_RrD, plan: AllToAllPlan, chunk: int = 0):
        """Wait for the chunk, regroup it by expert. Returns (rows, tokens per expert, slice of local experts)."""
        c = plan.chunks[chunk]
        if hasattr(x_RrD, "trigger_wait"):  # the in-flight all-to-all result: wait for it here
            x_RrD = x_RrD.wait()
        return permute_rows(x_RrD, c.regroup_idx_Rr, c.restore_idx_Rr), c.tokens_per_local_expert_L, c.experts

    def combine_preprocess(self, y_RrD, plan: AllToAllPlan, chunk: int = 0):
        c = plan.chunks[chunk]
        return permute_rows(y_RrD, c.restore_idx_Rr, c.regroup_idx_Rr)

    def combine_comm(self, y_RrD, plan: AllToAllPlan, chunk: int = 0):
        c = plan.chunks[chunk]
        return all_to_all_single_autograd(y_RrD.contiguous(), c.send_splits, c.recv_splits, self.group)

    def combine_postprocess(self, y_RD, plan: AllToAllPlan):
        """y_RD: the combine results of all chunks, concatenated in chunk order (= the send order)."""
        y_TD = unpermute(y_RD, plan.local)
        if plan.timing is not None:
            self._timings.append(plan.timing)
        return mark_region_output(y_TD, plan.timing)
