"""All-to-all dispatcher: tokens travel to the ranks that compute their experts with uneven all-to-alls, and back,
each token once per destination rank (deduplicated), however many of its copies that rank computes.

Legend: T tokens on this rank, D model dim, E experts, K top-k, W ranks in the group, M experts materialized on this
rank, n pipeline chunks, R routed copies leaving this rank, U unique rows leaving, C copies computed here (per
chunk), Ur unique rows arriving (per chunk).

Where experts live is a `Placement` (parallel/dispatch/placement.py): expert parallelism uses the static contiguous one
(rank w holds experts [w*E/W, (w+1)*E/W)); FSSDP supplies a new one every step, with hot experts on several ranks.
Destination of a routed copy of expert e sent from rank s (Hecate's rule):
    s itself if s materializes e, else replicas(e)[(i + s) mod r_e]     (i = index of the copy among e's copies)
so the tokens of a replicated expert spread evenly over its replicas. Copies are ordered (destination, chunk, expert)
(chunk of a copy: its token's range, or its expert's slot range on the destination; see `plan`), then
    counts_WNE = all_to_all(send_counts_WNE)           # copies each source sends me, per chunk and expert
    unique_WN  = all_to_all(send_unique_WN)            # unique rows each source sends me, per chunk
    tokens_per_local_expert_NM = counts_WNE[:, :, materialized].sum(0)
(one all-to-all of the tables, the only host synchronisation). Per step and layer, three tensors travel:
    x_UD       = x_TD[token_U]         rows, bf16 under autocast; one all-to-all per chunk, and back (y_UD)
    meta_R     (int32) and gates_R (fp32, autograd)   per copy, one all-to-all each for all chunks
with U <= R: a token whose K copies go to one rank travels once instead of K times (dedup.py has the formulas).
At the destination, per chunk:
    x_CD  = x_UrD[uidx_C]                      ONE gather straight into (expert, source) order for the grouped GEMM
    y_CD  = experts(x_CD)
    y_UrD = sum over the copies of each unique row of gates_C * y_CD   (kernels/permute.py combine)
and back at the source y_TD[t] = sum over the unique rows of t of y_UD. The gate gradient is computed where the
expert output is, dgates_C = <dy_UrD[uidx_C], y_CD>, and returns through the gates all-to-all's backward.
Zero-size splits (a rank that sends or receives nothing, an expert nobody picks) are ordinary. The collectives are
torch's functional ones: asynchronous (waited for on first use), which lets shared experts run while tokens are in
flight - on CPU through gloo's background threads, on GPU on NCCL's stream - and, for rows and gates, autograd-aware
(the backward is the reverse all-to-all). Under mixed precision the rows travel in bf16 both ways (the reduce
accumulates in fp32 and rounds the sum of a row's copies once), the gates and their gradients in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
import torch.distributed as dist
from einops import rearrange
from torch.distributed._functional_collectives import all_to_all_single, all_to_all_single_autograd

from moetrain.kernels import permute as kernels
from moetrain.moe.plan import RoutingPlan, build_plan, sum_unique_rows
from moetrain.parallel.dispatch.dedup import expand_index, send_rows, unique_rows
from moetrain.parallel.pipeline import (CANDIDATES, DegreeTuner, RegionTiming, chunk_of_slot, chunk_slot_range,
                                        clock_start, mark_region_input, mark_region_output)
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
    """One pipeline chunk (a range of this rank's tokens, or of every destination's local experts) whose unique rows
    travel as one all-to-all."""

    rows: slice  # this chunk's unique rows in the send buffer x_UD
    send_splits: list[int]  # unique rows sent to each rank
    recv_splits: list[int]  # unique rows arriving from each rank
    copies: slice  # this chunk's copies among the C copies computed here, (expert, source) order
    experts: slice  # this chunk's slice of the experts computed here (materialized, in id order; all of them when
    #                 split by tokens)
    tokens_per_local_expert_L: torch.Tensor  # rows per expert of that slice


@dataclass
class Arrivals:
    """The copies computed here, per chunk (from the arrived metadata and gates; built on first use)."""

    uidx: list[torch.Tensor]  # per chunk: arriving unique row each copy expands from (Ur for padding)
    row_map: list[Optional[torch.Tensor]]  # per chunk: row_UK for the Triton kernels, else None
    gates: list[torch.Tensor]  # per chunk: gates of the copies (fp32, autograd)


@dataclass
class AllToAllPlan:
    local: RoutingPlan  # copies in (destination, chunk, expert) order
    placement: Placement
    chunks: list[ChunkPlan]
    token_U: torch.Tensor  # source token of each unique row, send order (chunk, destination)
    row_TK: Optional[torch.Tensor]  # inverse map of token_U for the Triton kernels
    copy_send_splits: list[int]  # copies sent to each rank (metadata and gates)
    copy_recv_splits: list[int]  # copies arriving from each rank
    recv_order_C: torch.Tensor  # arrival order (source, expert) -> (expert, source), all chunks
    recv_source_C: torch.Tensor  # source rank of each copy, (expert, source) order
    recv_top_k_W: torch.Tensor  # copy width K of each source rank (the stride of its metadata)
    meta_in: torch.Tensor  # in-flight per-copy metadata, int32 (arrival order)
    gates_in: torch.Tensor  # in-flight gates (arrival order)
    timing: Optional[RegionTiming] = None  # clocks of a micro-batch timed for the degree tuner (see `plan`)
    arrivals: Optional[Arrivals] = field(default=None, repr=False)

    @property
    def num_dropped(self) -> int:
        return self.local.num_dropped

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    @property
    def send_splits(self) -> list[int]:
        """Routed copies sent to each rank over all chunks (their rows travel deduplicated: `rows_sent`)."""
        return self.copy_send_splits

    @property
    def rows_sent(self) -> list[int]:
        """Unique rows sent to each rank over all chunks (the token all-to-all's volume, in rows)."""
        return [sum(c.send_splits[w] for c in self.chunks) for w in range(len(self.copy_send_splits))]

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
        self.materialized_ids = placement.materialized(rank)  # host list (for host-side counts)
        self.materialized = torch.tensor(self.materialized_ids, dtype=torch.long, device=device)
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
                 placement_source: Optional[PlacementSource] = None, pipeline_degree: str = "1",
                 pipeline_split: str = "experts"):
        """pipeline_degree: chunks of the all-to-all ("1", "2", "4", "8"), or "auto" for a DegreeTuner that times
        the training micro-batches (forward + backward, dispatch to combine) and picks the fastest
        (parallel/pipeline.py). pipeline_split: what a chunk is, "tokens" (a contiguous range of this rank's tokens,
        all experts: every token still travels once per rank) or "experts" (a contiguous range of every
        destination's experts, all tokens: one GEMM per expert, but a token whose copies fall in two chunks of a
        rank travels twice); see `plan`."""
        if pipeline_split not in ("tokens", "experts"):
            raise ValueError(f"pipeline_split={pipeline_split!r}: expected 'tokens' or 'experts'")
        self.pipeline_split = pipeline_split
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} is not divisible by the group size {self.world}")
        self.num_experts = num_experts
        self.source = placement_source or StaticPlacement(Placement.contiguous(num_experts, self.world))
        self.capacity_factor, self.pad_to_capacity = capacity_factor, pad_to_capacity
        self._tables: tuple[Optional[Placement], Optional[_PlacementTables]] = (None, None)
        max_degree = self.num_local_experts if pipeline_split == "experts" else max(CANDIDATES)
        self.tuner = DegreeTuner(max_degree, group) if pipeline_degree == "auto" else None
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
        """Route, assign destinations, find the unique rows, exchange counts, and start the metadata and gates
        all-to-alls. With num_chunks n > 1 (default: `degree`) the copies are split into n chunks, each travelling as
        its own all-to-all (see parallel/pipeline.py):
            split "tokens":   chunk of a copy of token t = t * n // T      (every chunk: all experts, 1/n of the rows)
            split "experts":  chunk of a copy of expert e on rank d = slot of e on d * n // M_d   (contiguous ranges)
        Copies are ordered (destination, chunk, expert, token), unique rows (chunk, destination, expert of the
        token's first copy there, token); the counts exchanged are per (destination, chunk, expert), so the
        destination orders its arrivals (chunk, expert, source) and each chunk's copies are contiguous.
        For the tuner, a training micro-batch is timed from here to the end of `combine_postprocess` (forward) and
        from the gradient reaching the combine output to the end of the backward of `dispatch_preprocess` (backward;
        identity autograd markers on the region's input and output). A forward recomputed inside backward
        (activation checkpointing) is not timed as a forward; the recomputation lies in the backward interval."""
        timed = (self.tuner is not None and torch.is_grad_enabled()
                 and torch._C._current_graph_task_id() == -1)  # -1: not inside a backward pass
        timing = RegionTiming(clock_start(topk_idx_TK.device), topk_idx_TK.shape[0]) if timed else None
        n = self.degree if num_chunks is None else num_chunks
        E, W, T = self.num_experts, self.world, topk_idx_TK.shape[0]
        by_tokens = self.pipeline_split == "tokens"
        local = build_plan(topk_idx_TK, gates_TK, E, self.capacity_factor, self.pad_to_capacity, keep_TK)
        placement = self.source.placement_for(local.tokens_per_expert_E)
        tab = self._tables_for(placement, topk_idx_TK.device)
        counts_E = local.tokens_per_expert_E
        expert_R = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E,
                                           output_size=local.num_rows)
        dest_R = assign_destinations(expert_R, counts_E, tab, self.rank)
        if by_tokens:  # padding rows (token T) join the last chunk
            chunk_R = (local.token_idx_R * n // max(T, 1)).clamp(max=n - 1)
        else:
            chunk_WE = torch.where(tab.slot_WE >= 0,
                                   chunk_of_slot(tab.slot_WE, n, tab.num_materialized_W.clamp(min=1)[:, None]),
                                   torch.zeros_like(tab.slot_WE))
            chunk_R = chunk_WE[dest_R, expert_R]
        block_R = dest_R * n + chunk_R
        if n > 1 and by_tokens or not tab.contiguous:
            # Rows come sorted by (expert, token): a contiguous placement split by experts already is in
            # (destination, chunk, expert) order; otherwise sort (stable: tokens stay in order within an expert).
            order_R = torch.argsort(block_R * E + expert_R, stable=True)
            local = local.reordered(order_R)
            dest_R, expert_R, block_R = dest_R[order_R], expert_R[order_R], block_R[order_R]
        rows = unique_rows(local.copy_idx_R, block_R, expert_R, local.num_tokens, local.top_k, W * n)
        # Per destination rank: copies per (chunk, expert) | unique rows per chunk | this rank's copy width K (it
        # sets the metadata's stride, and routers such as expert choice give each rank its own K).
        NE = n * E
        send_counts_WX = torch.cat([torch.bincount(block_R * E + expert_R, minlength=W * NE).view(W, NE),
                                    rows.unique_B.view(W, n), counts_E.new_full((W, 1), local.top_k)], 1)
        recv_counts_WX = torch.empty_like(send_counts_WX)
        dist.all_to_all_single(recv_counts_WX, send_counts_WX, group=self.group)
        send_h, recv_h = torch.stack([send_counts_WX, recv_counts_WX]).cpu()  # the splits are host ints
        copy_send_splits, copy_recv_splits = send_h[:, :NE].sum(1).tolist(), recv_h[:, :NE].sum(1).tolist()
        triton = kernels.resolve_backend("auto", topk_idx_TK.device) == "triton"
        num_unique = int(send_h[:, NE:NE + n].sum())
        token_U, row_TK = send_rows(rows, local.token_idx_R, local.copy_idx_R, block_R, n, num_unique,
                                    local.num_tokens, local.top_k, triton)
        # Per-copy metadata and gates travel now, for all chunks, while the rows get permuted and sent.
        meta_in = all_to_all_single(rows.meta_R.to(torch.int32), copy_recv_splits, copy_send_splits, self.group)
        gates_in = all_to_all_single_autograd(local.gates_R, copy_recv_splits, copy_send_splits, self.group)

        M = len(tab.materialized_ids)
        recv_counts_WNM = recv_counts_WX[:, :NE].view(W, n, E).index_select(2, tab.materialized)
        recv_copies_NM = recv_h[:, :NE].view(W, n, E)[:, :, tab.materialized_ids].sum(0)
        source_A = torch.repeat_interleave(torch.arange(W, device=recv_counts_WNM.device),
                                           torch.tensor(copy_recv_splits, device=recv_counts_WNM.device),
                                           output_size=sum(copy_recv_splits))
        recv_order_C = regroup_index(recv_counts_WNM.reshape(W, n * M))  # (source, chunk, expert) -> (chunk, e, s)
        chunks, row, copy = [], 0, 0
        for j in range(n):
            lo, hi = (0, M) if by_tokens else chunk_slot_range(j, n, M)  # slots s with s * n // M == j
            send_splits, recv_splits = send_h[:, NE + j].tolist(), recv_h[:, NE + j].tolist()
            num_copies = int(recv_copies_NM[j].sum())
            chunks.append(ChunkPlan(slice(row, row + sum(send_splits)), send_splits, recv_splits,
                                    slice(copy, copy + num_copies), slice(lo, hi), recv_counts_WNM[:, j, lo:hi].sum(0)))
            row, copy = row + sum(send_splits), copy + num_copies
        return AllToAllPlan(local, placement, chunks, token_U, row_TK, copy_send_splits, copy_recv_splits,
                            recv_order_C, source_A[recv_order_C], recv_counts_WX[:, NE + n], meta_in, gates_in, timing)

    def _arrivals(self, plan: AllToAllPlan) -> Arrivals:
        """Wait for the metadata and gates (once per plan) and derive every chunk's expand index and gates."""
        if plan.arrivals is None:
            meta_C = _wait(plan.meta_in).long()[plan.recv_order_C]
            gates_C = _wait(plan.gates_in).index_select(0, plan.recv_order_C)
            triton = kernels.resolve_backend("auto", meta_C.device) == "triton"
            uidx, row_map, gates = [], [], []
            for c in plan.chunks:
                u, r = expand_index(meta_C[c.copies], plan.recv_source_C[c.copies], c.recv_splits,
                                    plan.recv_top_k_W, triton)
                uidx.append(u)
                row_map.append(r)
                gates.append(gates_C[c.copies])
            plan.arrivals = Arrivals(uidx, row_map, gates)
        return plan.arrivals

    def dispatch_preprocess(self, x_TD, plan: AllToAllPlan):
        """x_UD = x_TD[token_U]: the unique rows of all chunks, in send order."""
        return kernels.permute(mark_region_input(x_TD, plan.timing), plan.token_U, plan.row_TK)

    def dispatch_comm(self, x_UD, plan: AllToAllPlan, chunk: int = 0):
        c = plan.chunks[chunk]
        return all_to_all_single_autograd(x_UD[c.rows].contiguous(), c.recv_splits, c.send_splits, self.group)

    def dispatch_postprocess(self, x_UrD, plan: AllToAllPlan, chunk: int = 0):
        """Wait for the chunk and expand its unique rows into its copies, grouped by expert (one gather).
        Returns (x_CD, tokens per expert, slice of local experts)."""
        c, arrivals = plan.chunks[chunk], self._arrivals(plan)
        x_CD = kernels.permute(_wait(x_UrD), arrivals.uidx[chunk], arrivals.row_map[chunk])
        return x_CD, c.tokens_per_local_expert_L, c.experts

    def combine_preprocess(self, y_CD, plan: AllToAllPlan, chunk: int = 0):
        """y_UrD: the gated sum of the copies of each arrived unique row, in y's dtype (accumulated in fp32)."""
        c, arrivals = plan.chunks[chunk], self._arrivals(plan)
        return kernels.combine(y_CD, arrivals.gates[chunk], arrivals.uidx[chunk], sum(c.recv_splits),
                               arrivals.row_map[chunk], out_dtype=y_CD.dtype)

    def combine_comm(self, y_UrD, plan: AllToAllPlan, chunk: int = 0):
        c = plan.chunks[chunk]
        return all_to_all_single_autograd(y_UrD.contiguous(), c.send_splits, c.recv_splits, self.group)

    def dispatch_comm_grad(self, grad_UrD, plan: AllToAllPlan, chunk: int = 0):
        """The transpose of dispatch_comm (no autograd, async): chunk c's arrival gradient back to its sources."""
        c = plan.chunks[chunk]
        return all_to_all_single(grad_UrD.contiguous(), c.send_splits, c.recv_splits, self.group)

    def combine_comm_grad(self, grad_UD, plan: AllToAllPlan, chunk: int = 0):
        """The transpose of combine_comm (no autograd, async): chunk c's rows of the send-order gradient go to the
        ranks that computed them."""
        c = plan.chunks[chunk]
        return all_to_all_single(grad_UD[c.rows].contiguous(), c.recv_splits, c.send_splits, self.group)

    def combine_postprocess(self, y_UD, plan: AllToAllPlan):
        """y_UD: the combine results of all chunks, concatenated in chunk order (= the send order);
        y_TD[t] = sum over the unique rows of t (fp32 under autocast: the residual stream's dtype)."""
        y_TD = sum_unique_rows(_wait(y_UD), plan.token_U, plan.local.num_tokens, plan.row_TK)
        if plan.timing is not None:
            self._timings.append(plan.timing)
        return mark_region_output(y_TD, plan.timing)


def _wait(t: torch.Tensor) -> torch.Tensor:
    """An in-flight all-to-all result (AsyncCollectiveTensor) waited for here; any other tensor as it is."""
    return t.wait() if hasattr(t, "trigger_wait") else t
