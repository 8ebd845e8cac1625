"""One MoE layer's forward + backward on an expert group, following the code the trainer runs.

Legend: W ranks of the expert group (ep under expert parallelism, the world under FSSDP), E experts, K routed experts
per token, D model dim, F expert hidden, T tokens per rank, b payload bytes per element, n pipeline degree (chunks),
c_E = T*K*p_E routed copies per expert sent by every rank; the rows that travel are fewer (`unique_rows`: a token
goes once to each rank and chunk holding any of its copies, as the dispatcher sends it).

What is reused rather than re-derived:
  * placement: expert parallelism's `Placement.contiguous`; FSSDP's owners (contiguous, or `balanced_owners` of the
    predicted load when it re-shards) and replicas from `place_replicas` (moetrain/parallel/fssdp/placement.py);
  * chunks: a rank's materialized experts are split with `chunk_of_slot` (moetrain/parallel/pipeline.py), the rule
    `AllToAllDispatcher.plan` uses to build the n all-to-alls;
  * destinations: the dispatcher's rule (`assign_destinations`) in expectation: a copy of e from rank s stays on s
    when s materializes e, else goes to one of e's r_e replicas in turn, so each receives c_e / r_e of it
    (tests/test_sim.py checks these counts against `assign_destinations` itself).

Schedule of one layer (moetrain/moe/layer.py): the n dispatch chunks are issued at once and travel one after another
(one process group runs its collectives in order); shared experts compute meanwhile; FSSDP's spAG is queued behind
the dispatches and the experts wait for it; chunk c computes once its dispatch has arrived and the previous chunk is
done, and its combine is queued as soon as it is computed. The backward mirrors it: the functional all-to-alls'
backward is asynchronous too, so the reverse combines are in flight while earlier chunks' gradients compute (the
measured pipelining gains on a rate-limited loopback need this: docs/scaling.md); `backward_overlap=False` gives the
pessimistic bound where each reverse all-to-all is waited for in turn. Then spRS (and the re-gather with
re-materialization). On the CPU machine the bytes an all-to-all copies through loopback also occupy the rank's core
(`Cluster.host_copy_bandwidth`): that part is added to the compute lane and cannot overlap; the rest (waiting on a
rate-limited wire) can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from moetrain.parallel.dispatch.placement import Placement
from moetrain.parallel.fssdp.placement import balanced_owners, place_replicas, replica_cost_rows
from moetrain.parallel.pipeline import chunk_of_slot
from moetrain.sim.cluster import Cluster
from moetrain.sim.comm import all_to_all_time
from moetrain.sim.compute import experts_time, matmul_time, shared_makespan, sharing_factor, stream_time

FP32 = 4


def fssdp_placement(load_E: Sequence[float], world: int, budget: int, reshard: bool = False,
                    kappa: float = 0.0) -> Placement:
    """The placement FSSDP computes for a step whose predicted load is `load_E` (moetrain/parallel/fssdp/state.py):
    contiguous owners until it re-shards, then `balanced_owners`; replicas by `place_replicas` under the budget,
    each costing `kappa` rows (the state's `replica_cost_rows`)."""
    E = len(load_E)
    owners = balanced_owners(load_E, world) if reshard else [e // (E // world) for e in range(E)]
    return place_replicas(owners, load_E, world, budget, kappa)


def routed_rows(counts_SE: torch.Tensor, placement: Placement, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows_CSD, rows_DEC): rows source s sends rank d in chunk c, and rows rank d computes for expert e in chunk c,
    for every source's expected counts counts_SE under `placement` and pipeline degree n (module docstring)."""
    W, E = counts_SE.shape
    n = degree
    rows_CSD = torch.zeros(n, W, W, dtype=torch.float64)
    rows_DEC = torch.zeros(W, E, n, dtype=torch.float64)
    materialized = [placement.materialized(w) for w in range(W)]
    chunk = {}
    for w, mine in enumerate(materialized):
        for slot, e in enumerate(mine):
            chunk[w, e] = int(chunk_of_slot(slot, n, len(mine)))
    for e in range(E):
        reps = placement.replicas[e]
        c_S = counts_SE[:, e].double()
        holds_S = torch.zeros(W, dtype=torch.bool)
        holds_S[list(reps)] = True
        for d in reps:
            j = chunk[d, e]
            share_S = torch.where(holds_S, torch.zeros_like(c_S), c_S / len(reps))
            share_S[d] = c_S[d]  # d keeps its own copies of an expert it materializes
            rows_CSD[j, :, d] += share_S
            rows_DEC[d, e, j] += share_S.sum()
    return rows_CSD, rows_DEC


def unique_rows(copies_CSD: torch.Tensor, tokens: int, top_k: float, num_experts: int) -> torch.Tensor:
    """Rows that travel for copies_CSD routed copies (the deduplicated all-to-all, parallel/dispatch/dedup.py: a
    token goes once to each (rank, chunk) block holding any of its copies). With q = copies / (T K) the share of a
    source's copies that land in the block, a token's K distinct experts miss the block with probability
        P_miss = prod_{i < K} max(0, 1 - q E / (E - i))
    (exact for equal expert loads: picking K of E experts without replacement, q E of them in the block; a fractional
    K contributes its fraction of one more factor), and
        rows = T (1 - P_miss).
    q = 1 (every copy in one block) gives T rows; K = 1 gives the copies themselves."""
    T, E = float(tokens), float(num_experts)
    q = (copies_CSD / (T * top_k)).clamp(0.0, 1.0) if T * top_k > 0 else torch.zeros_like(copies_CSD)
    whole = int(top_k)
    miss = torch.ones_like(q)
    for i in range(whole):
        miss = miss * (1.0 - q * E / (E - i)).clamp(min=0.0)
    if top_k > whole and whole < E:
        miss = miss * (1.0 - (top_k - whole) * q * E / (E - whole)).clamp(min=0.0)
    return T * (1.0 - miss)


def chunk_schedule(wire_C: Sequence[float], compute_C: Sequence[float], host_C: Sequence[float], before: float,
                   gather: float) -> float:
    """Seconds from the first dispatch to the last combine of n chunks: dispatches 0..n-1 queued at once on the
    comm lane, then `gather` (spAG); the compute lane first spends `before` (shared experts), then chunk c starts
    once its dispatch (and the gather) arrived and chunk c-1 is done, and takes compute_C[c] plus the host copies of
    its dispatch and combine (2 host_C[c]); its combine is queued behind everything issued before it."""
    comm, arrived = 0.0, []
    for w in wire_C:
        comm += w
        arrived.append(comm)
    comm += gather
    gathered = comm if gather else 0.0
    compute = before
    for j, x in enumerate(compute_C):
        compute = max(compute, arrived[j], gathered) + x + 2 * host_C[j]
        comm = max(comm, compute) + wire_C[j]
    return max(comm, compute)


@dataclass
class LayerPrediction:
    """Seconds of one MoE layer, forward + backward, one micro-batch; traffic per rank; the placement used."""

    forward: float
    backward: float
    router_permute: float  # router matmul, permutations, count exchange (not overlapped)
    experts: float  # grouped GEMMs on the critical path (slowest rank per chunk), forward + backward
    shared: float  # shared experts, forward + backward
    all_to_all: float  # token all-to-alls, forward + backward, as if alone on the wire (count exchange: above)
    sparse: float  # FSSDP spAG + spRS (+ re-gather), as if alone on the wire
    rows_max_over_mean: float
    a2a_bytes_per_rank: float  # mean over ranks, sent off-rank, dispatch + combine, forward + backward
    sparse_bytes_per_rank: float
    replicas: list[int] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def compute(self) -> float:
        return self.router_permute + self.experts + self.shared

    @property
    def exposed_comm(self) -> float:
        return max(0.0, self.total - self.compute)


def moe_layer(cluster: Cluster, world: int, num_experts: int, top_k: float, dim: int, hidden: int, tokens: int,
              load_E: torch.Tensor, mode: str = "ep", degree: int = 1, budget: int = 0, rematerialize: bool = False,
              reshard: bool = False, shared_hidden: int = 0, payload_bytes: Optional[int] = None,
              hierarchical: bool = False, sharing_ranks: Optional[int] = None,
              backward_overlap: bool = True, prefetch_gather: bool = False, split: str = "experts",
              flops_per_byte: float = 80.0) -> LayerPrediction:
    """Predict one MoE layer (module docstring). `load_E`: the share of copies per expert (sums to 1); `world`: the
    expert group's size; `sharing_ranks`: ranks sharing the CPU's cores (default `world`); `backward_overlap`:
    False waits for every reverse all-to-all in turn (a pessimistic bound); `prefetch_gather`: hide spAG / spRS
    behind the neighbouring layers' compute (approximated by this layer's), as Hecate does and moetrain does not.
    `flops_per_byte`: parallel.fssdp.flops_per_byte (a replica's copy cost in the placement).
    `split`: parallel.pipeline_split; "tokens": chunk j carries 1/n of every block's copies and rows (every expert
    computes in every chunk), "experts": chunk j the experts of its slot range with all their rows (the degree is
    capped at the experts a rank computes)."""
    W, E, D, F, T = world, num_experts, dim, hidden, tokens
    b = payload_bytes or cluster.dtype_bytes
    cores = cluster.cores
    share = sharing_factor(sharing_ranks or W, cores)
    load_E = torch.as_tensor(load_E, dtype=torch.float64)
    load_E = load_E / load_E.sum()
    if mode == "fssdp" and W > 1:  # the cost model of FSSDPLayerState: fp32 master weights copied
        kappa = replica_cost_rows(flops_per_byte, FP32) * (1.5 if rematerialize else 1.0)
        placement = fssdp_placement((load_E * T * top_k * W).tolist(), W, budget, reshard, kappa)
    else:
        placement = Placement.contiguous(E, W)
    counts_SE = (T * top_k * load_E)[None].expand(W, E)
    if split == "tokens":  # every chunk: 1/n of the tokens, all experts
        n = max(1, degree)
        rows_CSD, rows_DEC = routed_rows(counts_SE, placement, 1)
        sent_CSD = (unique_rows(rows_CSD, T, top_k, E) / n).expand(n, W, W)
        rows_CSD, rows_DEC = (rows_CSD / n).expand(n, W, W), (rows_DEC / n).expand(W, E, n)
    else:
        n = max(1, min(degree, min(len(placement.materialized(w)) for w in range(W))))
        rows_CSD, rows_DEC = routed_rows(counts_SE, placement, n)
        sent_CSD = unique_rows(rows_CSD, T, top_k, E)  # what travels: one row per token and (rank, chunk) block

    # ---- compute per rank and chunk (forward), the slowest rank (or core sharing) per chunk
    rows_DC = rows_DEC.sum(1)
    experts_DC = torch.zeros(W, n, dtype=torch.float64)
    for d in range(W):
        mine = placement.materialized(d)
        for j in range(n):
            in_chunk = len(mine) if split == "tokens" else \
                sum(1 for s, _ in enumerate(mine) if int(chunk_of_slot(s, n, len(mine))) == j)
            experts_DC[d, j] = experts_time(float(rows_DC[d, j]), max(in_chunk, 1), D, F, cluster)
    x_C = [shared_makespan(experts_DC[:, j].tolist(), cores) for j in range(n)]

    # ---- token all-to-alls per chunk, and the host-copy part that occupies the core on CPU
    def host(bytes_SD: torch.Tensor) -> float:
        if cluster.host_copy_bandwidth is None:
            return 0.0
        m = bytes_SD.clone()
        m.fill_diagonal_(0)
        return float(m.sum()) / cluster.host_copy_bandwidth

    a2a_C = [all_to_all_time(sent_CSD[j] * D * b, cluster, hierarchical) for j in range(n)]
    host_C = [min(host(sent_CSD[j] * D * b), a2a_C[j]) for j in range(n)]
    wire_C = [a - h for a, h in zip(a2a_C, host_C)]

    # ---- FSSDP's spAG (forward) / spRS (backward): fp32 experts from owners to replica holders
    expert_bytes = FP32 * 3 * D * F
    gather_SD = torch.zeros(W, W, dtype=torch.float64)
    for reps in placement.replicas:
        for w in reps[1:]:
            gather_SD[reps[0], w] += expert_bytes
    spag = all_to_all_time(gather_SD, cluster, hierarchical)
    sparse_host = host(gather_SD)

    # ---- router, permutations, the count exchange: every rank alike, not overlapped
    R = T * top_k
    router = 3 * matmul_time(T, D, E, cluster)
    permute = stream_time(cluster.permute_passes * R * D * b, cluster)
    counts_exchange = (W - 1) * cluster.intra.alpha
    router_permute = (router + permute) * share + 2 * counts_exchange  # forward and backward exchange nothing more
    shared = 3 * 3 * matmul_time(T, D, shared_hidden, cluster) * share if shared_hidden else 0.0

    # ---- forward schedule: one comm lane (collectives in issue order), one compute lane
    gather = max(0.0, spag - sparse_host)
    reduce = spag
    if prefetch_gather:  # Hecate's overlap: spAG runs during the previous layer's compute, spRS during the next's
        gather = max(0.0, gather - (router_permute + shared + sum(x_C) * 3 + sum(a2a_C) * 4) / 3)
        reduce = max(0.0, spag - 2 * (router_permute + shared + sum(x_C) * 3) / 3)
    forward = router_permute / 3 + chunk_schedule(wire_C, x_C, host_C, shared / 3 + sparse_host, gather)
    # ---- backward: reverse all-to-alls waited for in turn, gradient GEMMs, spRS (+ re-gather)
    regather = spag if rematerialize else 0.0
    if backward_overlap:  # the mirrored schedule: reverse all-to-alls issued as gradients arrive, 2x compute
        backward = (2 * router_permute / 3 + reduce + regather
                    + chunk_schedule(wire_C, [2 * x for x in x_C], host_C, 2 * shared / 3, 0.0))
    else:
        backward = (2 * router_permute / 3 + 2 * shared / 3 + sum(2 * a + 2 * x for a, x in zip(a2a_C, x_C))
                    + reduce + regather)

    rows_W = rows_DC.sum(1)
    off_rank = sent_CSD.sum(0).clone()
    off_rank.fill_diagonal_(0)
    g = gather_SD.clone()
    return LayerPrediction(
        forward=forward, backward=backward, router_permute=router_permute, experts=3 * sum(x_C), shared=shared,
        all_to_all=4 * sum(a2a_C), sparse=spag * (3 if rematerialize else 2),
        rows_max_over_mean=float(rows_W.max() / rows_W.mean()),
        a2a_bytes_per_rank=4 * float(off_rank.sum(1).mean()) * D * b,
        sparse_bytes_per_rank=(3 if rematerialize else 2) * float(g.sum(0).mean()),
        replicas=placement.num_replicas())
