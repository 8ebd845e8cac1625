"""Node-limited routing (`router.group_by=ranks`): the groups of group-limited routing are the ranks (or blocks of
ranks, "nodes") that compute the experts now, read from the dispatcher's `expert_location_E()`, not expert-id ranges.

Checked: `select_topk` with a general group map (unequal and empty groups) against a by-hand computation; the router
with a location map; expert parallelism on 2 gloo ranks (every token's experts on one rank; outputs and gradients
equal one process handed the same location map); FSSDP after re-sharding has moved owners (the groups follow the
owners, not expert-id ranges, and again equal one process handed the owners).

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, G groups.
"""

import dataclasses
import math

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.schema import FSSDPConfig, RouterConfig
from moetrain.config.validate import ConfigError, validate
from moetrain.moe.routers import RouteContext
from moetrain.moe.routers.topk import TopKRouter, select_topk
from moetrain.parallel.fssdp.placement import balanced_owners
from moetrain.parallel.mesh import ParallelContext, build_groups
from moetrain.parallel.moe_layer import build_moe_layer
from tests.distributed import run_distributed
from tests.moe_reference import assert_ranks_match_reference, global_inputs, run_layer

D, F, E, K, T = 8, 16, 8, 2, 24
BIAS = [0.05, -0.1, 0.0, 0.1, -0.05, 0.02, -0.02, 0.08]
LOAD = [100.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # re-sharding by it interleaves owners; expert 0 gets a replica


# ------------------------------------------------------------------------------------------------ select_topk
def by_hand(biased_TE, k, group_E, num_groups, topk_groups):
    """DeepSeek-V3's rule in plain Python: a group's score is the sum of its best min(k // topk_groups, size)
    scores (an empty group never wins), keep the best topk_groups groups, then the best k of their experts."""
    m = max(1, k // topk_groups)
    out = []
    for row in biased_TE.tolist():
        members = [[e for e in range(len(row)) if group_E[e] == g] for g in range(num_groups)]
        score = [sum(sorted((row[e] for e in mem), reverse=True)[:m]) if mem else -math.inf for mem in members]
        best = sorted(range(num_groups), key=lambda g: -score[g])[:topk_groups]
        eligible = [e for g in best for e in members[g]]
        out.append(sorted(eligible, key=lambda e: -row[e])[:k])
    return out


@pytest.mark.parametrize("sizes,k,topk_groups", [
    ([2, 2, 2, 2], 2, 1),        # equal groups
    ([5, 2, 3, 2], 4, 2),        # unequal groups, two experts per group score
    ([5, 1, 3, 3], 4, 2),        # a group smaller than k // topk_groups sums what it has
    ([5, 1, 3, 3, 0], 3, 3),     # an empty group never wins, even against negative group scores
    ([1, 1, 1, 1, 1, 1], 3, 3),  # one expert per group
])
def test_select_topk_with_a_general_group_map_matches_by_hand(sizes, k, topk_groups):
    g = torch.Generator().manual_seed(sum(sizes) * 10 + k)
    group_E = torch.tensor([grp for grp, n in enumerate(sizes) for _ in range(n)])
    group_E = group_E[torch.randperm(len(group_E), generator=g)]  # groups are not expert-id ranges
    biased_TE = torch.rand(64, len(group_E), generator=g) * 2 - 1  # negative scores too (sigmoid + bias)
    got = select_topk(biased_TE, k, len(sizes), topk_groups, group_E)
    assert got.tolist() == by_hand(biased_TE, k, group_E.tolist(), len(sizes), topk_groups)


def test_a_map_of_expert_id_ranges_is_the_equal_group_routing():
    g = torch.Generator().manual_seed(3)
    for G, k, topk_groups in [(4, 2, 2), (8, 8, 4), (2, 3, 1)]:
        biased_TE = torch.randn(200, 32, generator=g)
        ranges_E = torch.arange(32) // (32 // G)
        equal_groups = select_topk(biased_TE, k, G, topk_groups)
        assert torch.equal(select_topk(biased_TE, k, G, topk_groups, ranges_E), equal_groups)
        assert equal_groups.tolist() == by_hand(biased_TE, k, ranges_E.tolist(), G, topk_groups)


# ----------------------------------------------------------------------------------------------------- router
def router(**kw):
    r = TopKRouter(D, E, RouterConfig(**{"top_k": K, "score_func": "sigmoid", "group_by": "ranks", **kw}))
    r.reset_parameters(0.5)
    return r


def test_router_groups_follow_the_location_map_and_nodes_of_ranks():
    torch.manual_seed(0)
    x_TD = torch.randn(64, D)
    location_E = torch.tensor([3, 0, 2, 1, 1, 2, 0, 3])  # 4 ranks, 2 experts each, not in id order
    for G, rank_of_group in [(4, lambda w: w), (2, lambda w: w // 2)]:  # every rank a group; 2 nodes of 2 ranks
        r = router(num_groups=G, topk_groups=1, top_k=2)
        idx_TK = r(x_TD, RouteContext((1, 64), expert_location_E=location_E)).topk_idx_TK
        groups_per_token = {len({rank_of_group(int(location_E[e])) for e in row}) for row in idx_TK.tolist()}
        assert groups_per_token == {1}
        biased_TE = r.scores(r.logits(x_TD))
        assert torch.equal(idx_TK, select_topk(biased_TE, 2, G, 1, location_E // (4 // G)))
    r = router(num_groups=4, topk_groups=1)
    unlimited = r(x_TD).topk_idx_TK  # no location: one process, one group
    assert torch.equal(unlimited, r.scores(r.logits(x_TD)).topk(2, dim=-1).indices)
    assert any(len({int(location_E[e]) for e in row}) > 1 for row in unlimited.tolist())  # the limit did bite


def test_router_derives_the_groups_once_per_location_and_refuses_a_group_count_that_does_not_divide_ranks():
    r = router(num_groups=2, topk_groups=1)
    location_E = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    first = r.rank_groups(location_E, torch.device("cpu"))
    assert first.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert r.rank_groups(location_E, torch.device("cpu")) is first  # cached while the location is the same tensor
    moved = r.rank_groups(torch.tensor([1, 1, 0, 0, 3, 3, 2, 2]), torch.device("cpu"))
    assert moved.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and moved is not first
    with pytest.raises(ConfigError, match=r"router.num_groups must divide 3"):
        three_ranks_E = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
        router(num_groups=2, topk_groups=1)(torch.randn(4, D), RouteContext((1, 4), expert_location_E=three_ranks_E))


def test_group_by_is_validated(tmp_path):
    run_dir = f"trainer.run_dir={tmp_path}"
    validate(compose_config([run_dir, "router=deepseek_v3", "router.group_by=ranks", "model.num_experts=16",
                             "router.num_groups=2", "router.topk_groups=1", "router.top_k=4"]), world_size=1)
    with pytest.raises(ConfigError, match=r"router.group_by='nodes' is unknown; use experts or ranks"):
        validate(compose_config([run_dir, "router.group_by=nodes"]), world_size=1)


# ------------------------------------------------------------------------------------------- 2 ranks vs one
ROUTER = RouterConfig(top_k=K, score_func="sigmoid", route_scale=2.5, num_groups=2, topk_groups=1, group_by="ranks")


def make_layer(group=None, fssdp=None, location_E=None):
    """The MoE layer of a layout, recording the routing its router decided; `location_E` hands a one-process layer
    the expert locations of a multi-rank layout."""
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, 0, ROUTER, layer_id=1, ep_group=group, fssdp=fssdp)
    layer.reset_parameters(0.3, 0.3, seed=0)
    if location_E is not None:
        layer.dispatcher.expert_location_E = lambda: location_E
    original, layer.routed = layer.router.forward, []

    def forward(x_TD, ctx=None):
        out = original(x_TD, ctx)
        layer.routed.append(dataclasses.replace(out))
        return out

    layer.router.forward = forward
    return layer


def _ep_body(rank, world):
    ctx = build_groups(ParallelContext(ep=world))
    layer = make_layer(ctx.ep_group)
    location_E = layer.dispatcher.expert_location_E()
    assert layer.dispatcher.expert_location_E() is location_E  # cached
    x, dy = global_inputs(T, D)
    sl = slice(rank * T // world, (rank + 1) * T // world)
    y, dx, grads, _, _ = run_layer(layer, x[sl], dy[sl], BIAS)
    return dict(y=y, dx=dx, grads=grads, expert_ids=list(layer.experts.expert_ids), location=location_E,
                topk=layer.routed[-1].topk_idx_TK)


def test_ep_two_ranks_keep_every_token_on_one_rank_and_match_one_process():
    results = run_distributed(_ep_body, 2)
    contiguous = [0, 0, 0, 0, 1, 1, 1, 1]
    for r in results:
        assert r["location"].dtype == torch.int64 and r["location"].tolist() == contiguous
    topk_TK = torch.cat([r["topk"] for r in results])
    assert all(len({contiguous[e] for e in row}) == 1 for row in topk_TK.tolist())

    x, dy = global_inputs(T, D)
    ref = make_layer(location_E=torch.tensor(contiguous))
    y_ref, dx_ref, grads, _, _ = run_layer(ref, x, dy, BIAS)
    assert torch.equal(ref.routed[-1].topk_idx_TK, topk_TK)
    assert_ranks_match_reference(results, y_ref, dx_ref, grads)

    free = make_layer()  # one process without the map: one group, nothing limited
    run_layer(free, x, dy, BIAS)
    assert any(len({contiguous[e] for e in row}) > 1 for row in free.routed[-1].topk_idx_TK.tolist())


def _fssdp_body(rank, world):
    # flops_per_byte=0: replica copies cost nothing, so this tiny load places its replica (what the test needs).
    layer = make_layer(build_groups(ParallelContext(ep=world)).ep_group,
                       FSSDPConfig(budget=1, reshard_every=1, flops_per_byte=0.0))
    d, state = layer.dispatcher, layer.experts.state
    before = d.expert_location_E()
    layer.after_step(1, torch.tensor(LOAD), None)  # re-shard by load: owners move, weights move with them
    after = d.expert_location_E()
    assert after is not before and after is d.expert_location_E()
    x, dy = global_inputs(T, D)
    sl = slice(rank * T // world, (rank + 1) * T // world)
    y, dx, grads, _, _ = run_layer(layer, x[sl], dy[sl], BIAS)
    return dict(y=y, dx=dx, grads=grads, owned=list(layer.experts.expert_ids), before=before.tolist(),
                after=after.tolist(), owners=list(state.owners), replicas=state.placement.replicas,
                topk=layer.routed[-1].topk_idx_TK)


def test_fssdp_groups_follow_the_owners_after_resharding():
    results = run_distributed(_fssdp_body, 2)
    owners = balanced_owners(LOAD, 2)
    assert owners != [0, 0, 0, 0, 1, 1, 1, 1]  # interleaved: expert-id ranges no longer name ranks
    for r in results:
        assert r["before"] == [0, 0, 0, 0, 1, 1, 1, 1] and r["after"] == r["owners"] == owners
    assert any(len(reps) > 1 for reps in results[0]["replicas"])  # hot experts replicated: routing ignores them
    topk_TK = torch.cat([r["topk"] for r in results])
    assert all(len({owners[e] for e in row}) == 1 for row in topk_TK.tolist())  # one owner rank per token
    assert any(len({e // 4 for e in row}) > 1 for row in topk_TK.tolist())  # ... across expert-id ranges

    x, dy = global_inputs(T, D)
    ref = make_layer(location_E=torch.tensor(owners))
    y_ref, dx_ref, grads, _, _ = run_layer(ref, x, dy, BIAS)
    assert torch.equal(ref.routed[-1].topk_idx_TK, topk_TK)
    assert_ranks_match_reference(results, y_ref, dx_ref, grads, ids_key="owned")
