"""The deduplicated all-to-all (parallel/dispatch/dedup.py): each token travels once per (destination rank, chunk).

- unit: the unique rows of random routings (padding rows, dropped copies, several blocks) - one row per distinct
  (token, block), every copy's metadata points at a row of its own token, the inverse maps are consistent;
- layer: outputs and input / router (gate) / expert gradients equal the single-process reference on 2 and 4 gloo
  ranks, for a token whose copies all go to one rank (that rank sends one row per token, the other receives
  nothing), an expert nobody picks, top-k equal to the expert count, uneven splits with an empty rank, pipeline
  degrees 2 and 4 with chunks split by tokens and by experts, FSSDP with replicas (and with chunks), capacity with
  dropping and with padding, and the Triton permutation kernels (interpreter) fed by the dispatcher's inverse row
  maps; and the rows sent equal the distinct (token, destination, chunk) triples of the kept copies.
"""

import pytest
import torch
import torch.distributed as dist

from moetrain.config.schema import FSSDPConfig, RouterConfig
from moetrain.parallel.dispatch.dedup import expand_index, send_rows, unique_rows
from moetrain.parallel.dispatch.placement import Placement
from moetrain.parallel.mesh import ParallelContext, build_groups
from moetrain.parallel.moe_layer import build_moe_layer
from moetrain.parallel.pipeline import chunk_of_slot
from tests.distributed import run_distributed
from tests.moe_reference import assert_ranks_match_reference, global_inputs, run_layer

D, F = 8, 16

# --------------------------------------------------------------------------------------------------------- unit


def test_unique_rows_one_row_per_token_and_block():
    g = torch.Generator().manual_seed(3)
    T, K, E, W, n = 11, 3, 6, 3, 2
    B = W * n
    topk_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    keep_TK = torch.rand(T, K, generator=g) > 0.2  # some copies dropped
    block_E = torch.randint(0, B, (E,), generator=g)
    copies = [(t * K + k, int(topk_TK[t, k])) for t in range(T) for k in range(K) if keep_TK[t, k]]
    rows = [(c, e, int(block_E[e])) for c, e in copies] + [(-1, e, int(block_E[e])) for e in (0, 4, 4)]  # padding
    rows.sort(key=lambda r: (r[2], r[1], r[0] // K if r[0] >= 0 else T))  # (block, expert, token)
    copy_R = torch.tensor([r[0] for r in rows])
    expert_R, block_R = torch.tensor([r[1] for r in rows]), torch.tensor([r[2] for r in rows])
    token_R = torch.where(copy_R >= 0, copy_R // K, T)
    u = unique_rows(copy_R, block_R, expert_R, T, K, B)
    pairs = {(c // K, b) for c, _, b in rows if c >= 0}
    assert int(u.unique_B.sum()) == len(pairs)
    for b in range(B):
        assert int(u.unique_B[b]) == sum(1 for _, bb in pairs if bb == b)
    U = len(pairs)
    token_U, row_TK = send_rows(u, token_R, copy_R, block_R, n, U, T, K, with_row_map=True)
    # Send order (chunk, destination): block b = dest*n + chunk.
    first = {}
    pos = 0
    for c in range(n):
        for w in range(W):
            first[w * n + c] = pos
            pos += int(u.unique_B[w * n + c])
    for r in range(len(rows)):
        meta = int(u.meta_R[r])
        if copy_R[r] < 0:
            assert meta == -1
            continue
        b = int(block_R[r])
        local, ordinal = divmod(meta, K)
        assert 0 <= local < int(u.unique_B[b])
        assert int(token_U[first[b] + local]) == int(token_R[r])  # the row of its own token
        assert (ordinal == 0) == bool(u.rep_R[r])
    assert sorted(row_TK[row_TK >= 0].tolist()) == list(range(U))
    for t in range(T):
        for s in row_TK[t][row_TK[t] >= 0].tolist():
            assert int(token_U[s]) == t
    # Destination side of one block: expand index and its inverse map.
    b = max(range(B), key=lambda b: int(u.unique_B[b]))
    sel = (block_R == b).nonzero().flatten()
    meta_C = u.meta_R[sel]
    uidx, row_UK = expand_index(meta_C, torch.zeros_like(meta_C), [int(u.unique_B[b])], torch.tensor([K]),
                                with_row_map=True)
    Ur = int(u.unique_B[b])
    assert torch.equal(uidx == Ur, meta_C < 0)
    for c in range(len(sel)):
        if uidx[c] < Ur:
            assert int(row_UK[uidx[c], meta_C[c] % K]) == c


def test_expand_index_decodes_each_source_with_its_own_top_k():
    """Sources with different copy widths K_s (expert choice: the most experts any of the rank's tokens got) arrive in
    one chunk: each copy's metadata is decoded with its source's stride, and the row map is max K_s wide."""
    g = torch.Generator().manual_seed(5)
    E, T = 4, 6
    metas, sources, tokens, splits = [], [], [], []
    for s, K in enumerate((3, 1)):
        topk_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        copies = sorted(((t * K + k, int(topk_TK[t, k])) for t in range(T) for k in range(K)),
                        key=lambda c: (c[1], c[0]))
        copy_R, expert_R = torch.tensor([c for c, _ in copies]), torch.tensor([e for _, e in copies])
        block_R = torch.zeros_like(copy_R)  # one destination, one chunk
        u = unique_rows(copy_R, block_R, expert_R, T, K, 1)
        token_U, _ = send_rows(u, copy_R // K, copy_R, block_R, 1, int(u.unique_B.sum()), T, K, with_row_map=False)
        metas.append(u.meta_R)
        sources.append(torch.full_like(copy_R, s))
        tokens.append(token_U + 100 * s)  # tell the sources' tokens apart
        splits.append(int(u.unique_B.sum()))
    meta_C, source_C, token_Ur = torch.cat(metas), torch.cat(sources), torch.cat(tokens)
    uidx, row_UK = expand_index(meta_C, source_C, splits, torch.tensor([3, 1]), with_row_map=True)
    assert row_UK.shape == (sum(splits), 3)
    offset = 0
    for s, m in enumerate(metas):
        n = m.shape[0]
        K = (3, 1)[s]
        expected_tokens = sorted(c // K + 100 * s for c in range(T * K))
        assert sorted(token_Ur[uidx[offset:offset + n]].tolist()) == expected_tokens  # each copy, its own token
        offset += n
    for c in range(meta_C.shape[0]):
        assert int(row_UK[uidx[c], meta_C[c] % (3, 1)[int(source_C[c])]]) == c


# --------------------------------------------------------------------------------------------------------- layer


def make_layer(E, K, group=None, degree="1", fssdp=None, split="experts", **router_kw):
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, 0, RouterConfig(top_k=K, **router_kw), layer_id=1, ep_group=group,
                            fssdp=fssdp, pipeline_degree=degree, pipeline_split=split)
    torch.manual_seed(1)
    layer.reset_parameters(0.3, 0.3, seed=0)
    return layer


def _expected_rows(plan, topk_TK, rank, n, split):
    """Distinct (token, destination, chunk) of the kept copies, from the placement's rule computed here; the chunk
    is the token's range (split by tokens) or the expert's slot range on the destination (split by experts)."""
    placement, (T, K) = plan.placement, topk_TK.shape
    # destination of the i-th copy of expert e (copies of e in token order): module docstring of alltoall.py
    triples, index_in_expert = set(), {}
    for c in sorted(plan.local.copy_idx_R.tolist(), key=lambda c: (int(topk_TK.flatten()[c]), c)):
        if c < 0:
            continue
        t, e = c // K, int(topk_TK.flatten()[c])
        reps = placement.replicas[e]
        i = index_in_expert.get(e, 0)
        index_in_expert[e] = i + 1
        dest = rank if rank in reps else reps[(i + rank) % len(reps)]
        slot = placement.materialized(dest).index(e)
        chunk = t * n // T if split == "tokens" else chunk_of_slot(slot, n, len(placement.materialized(dest)))
        triples.add((t, dest, chunk))
    return len(triples)


def dedup_body(rank, world, E, K, tokens_per_rank, bias, router_kw, degree, replicas, triton=False, split="experts"):
    if triton:  # the gather-only Triton permutation kernels (interpreter on CPU) with the dispatcher's row maps
        import moetrain.kernels.permute as kernels

        kernels.resolve_backend = lambda backend, device: "triton"
    if replicas is None:
        ctx = build_groups(ParallelContext(ep=world))
        layer = make_layer(E, K, ctx.ep_group, degree, split=split, **router_kw)
    else:
        layer = make_layer(E, K, dist.group.WORLD, degree, FSSDPConfig(budget=2), split, **router_kw)
        placement = Placement(tuple(tuple(r) for r in replicas), world)
        layer.experts.state.placement = placement
        layer.dispatcher.source.placement_for = lambda counts: placement  # this placement, whatever the policy
    plans = []
    original = layer.dispatcher.plan
    layer.dispatcher.plan = lambda *a, **kw: plans.append(original(*a, **kw)) or plans[-1]
    x, dy = global_inputs(sum(tokens_per_rank), D)
    start = sum(tokens_per_rank[:rank])
    sl = slice(start, start + tokens_per_rank[rank])
    y, dx, grads, record, _ = run_layer(layer, x[sl], dy[sl], bias)
    routed = layer.router(x[sl])
    plan = plans[0]
    return dict(y=y, dx=dx, grads=grads, expert_ids=list(layer.experts.expert_ids),
                rows_sent=sum(plan.rows_sent), copies_sent=sum(plan.send_splits),
                expected_rows=_expected_rows(plan, routed.topk_idx_TK, rank, plan.num_chunks, split),
                received=record.tokens_per_local_expert_L.sum().item())


HOT_RANK0 = [9.0, 9.0, 0.0, 0.0]  # top-2 always picks experts 0 and 1: both copies of every token go to rank 0
CASES = {
    # name: (world, E, K, tokens_per_rank, bias, router kwargs, degree, replicas)
    "all_copies_to_one_rank": (2, 4, 2, [5, 7], HOT_RANK0, {}, "1", None),
    "expert_nobody_picks_4ranks": (4, 8, 2, [5, 5, 5, 5], [0, 0, 0, -9.0, 0, 0, 0, 0], {}, "1", None),
    "top_k_equals_E": (2, 4, 4, [3, 5], None, {}, "1", None),
    "uneven_empty_rank_4ranks@2": (4, 8, 3, [7, 2, 0, 5], None, {}, "2", None),
    "degree4": (2, 8, 4, [9, 6], None, {}, "4", None),
    "capacity_drop": (2, 4, 2, [8, 8], None, {"capacity_factor": 0.5}, "1", None),
    "capacity_pad@2": (2, 8, 3, [8, 8], None, {"capacity_factor": 1.0, "pad_to_capacity": True}, "2", None),
    "fssdp_replicas": (2, 4, 2, [6, 6], [5.0, 0, 0, 5.0], {}, "1", ((0, 1), (0,), (1,), (1, 0))),
    "fssdp_replicas_4ranks@2": (4, 8, 3, [4, 6, 3, 5], [5.0, 0, 0, 0, 0, 0, 0, 0], {}, "2",
                                ((0, 1, 2, 3), (0,), (1,), (1, 2), (2,), (2,), (3,), (3, 0))),
    "triton_kernels@2": (2, 8, 3, [6, 5], None, {}, "2", None),
    "triton_kernels_capacity_pad": (2, 4, 2, [8, 8], None, {"capacity_factor": 1.0, "pad_to_capacity": True}, "1",
                                    None),
}
# Cases whose chunks split every rank's tokens instead of its experts (parallel.pipeline_split=tokens).
CASES.update({f"{name}/tokens": CASES[name] for name in ("uneven_empty_rank_4ranks@2", "degree4", "capacity_pad@2",
                                                          "fssdp_replicas_4ranks@2", "triton_kernels@2")})


@pytest.mark.parametrize("case", list(CASES))
def test_dedup_layer_matches_single_process(case):
    world, E, K, tokens_per_rank, bias, router_kw, degree, replicas = CASES[case]
    results = run_distributed(dedup_body, world, E, K, tokens_per_rank, bias, router_kw, degree, replicas,
                              case.startswith("triton"), "tokens" if case.endswith("/tokens") else "experts")
    ref = make_layer(E, K, **router_kw)
    x, dy = global_inputs(sum(tokens_per_rank), D)
    if router_kw.get("capacity_factor"):  # capacity is per source rank: the reference applies it per rank slice
        ys, dxs, grads, start = [], [], None, 0
        for n in tokens_per_rank:
            ref.zero_grad()
            y, dx, g, _, _ = run_layer(ref, x[start:start + n], dy[start:start + n], bias)
            ys.append(y)
            dxs.append(dx)
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
            start += n
        y_ref, dx_ref = torch.cat(ys), torch.cat(dxs)
    else:
        y_ref, dx_ref, grads, _, _ = run_layer(ref, x, dy, bias)
    assert_ranks_match_reference(results, y_ref, dx_ref, grads)
    for r in results:
        assert r["rows_sent"] == r["expected_rows"] <= r["copies_sent"]
    if case == "all_copies_to_one_rank":
        assert [r["rows_sent"] for r in results] == tokens_per_rank  # one row per token instead of two
        assert results[1]["received"] == 0 and results[0]["received"] == 2 * sum(tokens_per_rank)
    if case == "top_k_equals_E":  # every token: one row per rank, K copies
        assert [r["rows_sent"] for r in results] == [2 * n for n in tokens_per_rank]
    if case == "expert_nobody_picks_4ranks":
        for name in ("experts.w1_EDF", "experts.w2_EFD"):
            assert torch.all(grads[name][3] == 0)
