"""FSSDP: placement, SparseAllGather / SparseReduceScatter against dense collectives, and the FSSDP layer against one
process (outputs, input / router / expert gradients), with and without re-materialization, balanced and skewed."""

import gc

import pytest
import torch
import torch.distributed as dist

from moetrain.config.schema import FSSDPConfig, RouterConfig
from moetrain.parallel.moe_layer import build_moe_layer
from moetrain.parallel.fssdp.collectives import build_gather_plan, sparse_all_gather, sparse_reduce_scatter
from moetrain.parallel.dispatch.placement import Placement
from moetrain.parallel.fssdp.placement import (BudgetController, LoadPredictor, balanced_owners, place_replicas,
                                               replica_cost_rows, step_cost, step_costs)
from moetrain.parallel.fssdp.state import FSSDPLayerState
from tests.distributed import run_distributed
from tests.moe_reference import assert_ranks_match_reference, global_inputs, run_layer

# ----------------------------------------------------------------------------------------------------- placement


def test_balanced_owners_equal_counts_and_balanced_load():
    load = [100, 50, 10, 10, 5, 5, 1, 1]
    owners = balanced_owners(load, 2)
    assert sorted(owners) == [0, 0, 0, 0, 1, 1, 1, 1]
    per_rank = [sum(load[e] for e in range(8) if owners[e] == w) for w in range(2)]
    assert max(per_rank) == 107  # 100 alone outweighs half the total; the LPT greedy adds the coldest to it
    owners4 = balanced_owners([8, 7, 6, 5, 4, 3, 2, 1], 4)
    per4 = [sum(l for l, o in zip([8, 7, 6, 5, 4, 3, 2, 1], owners4) if o == w) for w in range(4)]
    assert per4 == [9, 9, 9, 9]


def _rank_loads(placement, load):
    return [sum(load[e] / len(placement.replicas[e]) for e in placement.materialized(w))
            for w in range(placement.world_size)]


def test_place_replicas_contains_owners_respects_budget_and_balances():
    E, W = 16, 4
    load = [1 / (i + 1) ** 1.2 for i in range(E)]
    owners = balanced_owners(load, W)
    base = max(_rank_loads(Placement.from_owners(owners, W), load)) / (sum(load) / W)
    previous = base
    for budget in (1, 2, 4):
        p = place_replicas(owners, load, W, budget)
        assert all(p.owner(e) == owners[e] for e in range(E))
        for w in range(W):
            assert len(p.materialized(w)) - len(p.owned(w)) <= budget
        ratio = max(_rank_loads(p, load)) / (sum(load) / W)
        assert ratio <= previous + 1e-9
        previous = ratio
    assert previous < 1.05 < base


def test_hottest_expert_goes_everywhere_when_budget_allows():
    load = [1000, 1, 1, 1, 1, 1, 1, 1]
    p = place_replicas(balanced_owners(load, 4), load, 4, budget=1)
    assert sorted(p.replicas[0]) == [0, 1, 2, 3]


def test_no_budget_or_no_load_means_owners_only():
    owners = [0, 0, 1, 1]
    assert place_replicas(owners, [5, 1, 1, 1], 2, 0).replicas == ((0,), (0,), (1,), (1,))
    assert place_replicas(owners, [0, 0, 0, 0], 2, 3).replicas == ((0,), (0,), (1,), (1,))


def test_step_costs_formula():
    # t_w = sum_{e on w} c_e / r_e + kappa (sent_w + recv_w): expert 0 (owner 0) also on ranks 1 and 2.
    replicas = [(0, 1, 2), (0,), (1,), (2,)]
    t = step_costs(replicas, [300, 10, 20, 30], 3, kappa=5)
    assert t == [100 + 10 + 5 * 2, 100 + 20 + 5, 100 + 30 + 5]
    assert step_cost(Placement(tuple(replicas), 3), [300, 10, 20, 30], 5) == 135  # rank 2 is the slowest
    assert replica_cost_rows(flops_per_byte=30, element_size=4) == 40  # 4 * 30 / 3


def test_replica_added_only_when_its_saving_exceeds_its_copy_cost():
    # Owners only: rank 0 computes 400 rows, rank 1 none. A replica of expert 0 leaves 200 + kappa on each rank:
    # it saves 200 rows on the busiest rank, for kappa at each end.
    owners, load = [0, 0, 1, 1], [400, 0, 0, 0]
    assert place_replicas(owners, load, 2, budget=1, kappa=199).replicas[0] == (0, 1)
    assert place_replicas(owners, load, 2, budget=1, kappa=201).replicas[0] == (0,)
    # One hot expert on 4 ranks: r copies leave 900 / r rows on each holder, and the owner sends r - 1 copies, so it
    # computes 900 / r + (r - 1) kappa: r = 1..4 gives 900, 450 + k, 300 + 2k, 225 + 3k; each step pays only while
    # that keeps falling.
    owners4, load4 = [0, 0, 1, 1, 2, 2, 3, 3], [900, 0, 0, 0, 0, 0, 0, 0]
    for kappa, copies in ((0, 4), (50, 4), (100, 3), (160, 2), (500, 1)):
        assert len(place_replicas(owners4, load4, 4, budget=1, kappa=kappa).replicas[0]) == copies, kappa
    # The cost model never predicts a slower step than owners only.
    for kappa in (0, 50, 150, 300, 1000):
        p = place_replicas(owners4, load4, 4, budget=2, kappa=kappa)
        assert step_cost(p, load4, kappa) <= step_cost(Placement.from_owners(owners4, 4), load4, kappa)


def test_budget_controller_shrinks_after_mispredictions_and_restores():
    owners, kappa = [0, 0, 1, 1], 10.0
    owners_only = Placement.from_owners(owners, 2)
    ctl = BudgetController(budget=4, window=8)
    predicted, wrong, right = [400, 0, 0, 0], [0, 0, 400, 0], [400, 0, 0, 0]  # wrong: gain -kappa; right: +190
    budgets = []
    for realised in [wrong] * 4 + [right] * 5:
        probe = place_replicas(owners, predicted, 2, ctl.probe_budget, kappa)
        assert probe.has_replicas()  # with budget 0 the probe still places one replica per rank
        budgets.append(ctl.update(probe, owners_only, realised, kappa))
    assert budgets == [2, 1, 0, 0, 1, 2, 3, 4, 4]
    assert ctl.gains[-1] == 400 - (200 + kappa)  # right: owners only 400 rows, the replica 200 + its copy
    # Neither wrong nor right on average: a wrong step halves, a right one does not grow while the window's mean
    # gain is still negative.
    ctl = BudgetController(budget=2, window=4)
    probe = place_replicas(owners, predicted, 2, 1, kappa)
    for realised in [wrong] * 3:
        ctl.update(probe, owners_only, realised, kappa)
    assert ctl.budget == 0
    assert ctl.update(probe, owners_only, [205, 0, 195, 0], kappa) == 0  # gain 205 - (102.5 + 195 + 10) < 0
    # Slightly right (gain 400 - (200 + 150 + 10) = 40): grows only once the last 4 gains sum above 0.
    assert [ctl.update(probe, owners_only, [400, 0, 150, 0], kappa) for _ in range(3)] == [0, 0, 1]
    off = BudgetController(budget=3, enabled=False)
    probe = place_replicas(owners, predicted, 2, off.probe_budget, kappa)
    assert off.update(probe, owners_only, wrong, kappa) == 3 and off.probe_budget == 3
    assert BudgetController(budget=0).probe_budget == 0


def _fallback_state_body(rank, world):
    # kappa = 10 rows; window 1: the prediction is the last step's load
    state = FSSDPLayerState(4, dist.group.WORLD, FSSDPConfig(budget=2, window=1, flops_per_byte=7.5))
    hot = [torch.tensor([400.0, 0, 0, 0]), torch.tensor([0, 0, 400.0, 0])]  # expert 0 (owner 0), expert 2 (owner 1)
    seen = []
    for step in range(1, 13):  # the hot expert changes rank every step: the prediction is always wrong
        state.after_step(step, hot[step % 2], [], None)
        seen.append((state.controller.budget, state.placement.has_replicas(), state.probe.has_replicas()))
    for step in range(13, 25):  # stationary again: expert 0 hot
        state.after_step(step, hot[0], [], None)
        seen.append((state.controller.budget, state.placement.has_replicas(), state.probe.has_replicas()))
    return seen


def test_fallback_uses_owners_only_while_budget_is_zero_and_recovers():
    for seen in run_distributed(_fallback_state_body, 2):
        budgets = [b for b, _, _ in seen]
        assert budgets[:12] == [2, 1] + [0] * 10
        for budget, used, probed in seen:
            assert used == (budget > 0 and probed)  # budget 0: expert parallelism's placement, the probe is unused
        assert budgets[-1] == 2 and seen[-1][1]  # right again: full budget, replicas placed


def test_load_predictor_window_and_calibration():
    pred = LoadPredictor(2, window=2)
    assert pred.predict() == [1.0, 1.0]
    for c in ([10, 0], [20, 0], [30, 10]):
        pred.observe(torch.tensor(c))
    assert pred.predict() == [25.0, 5.0]
    assert pred.predict(torch.tensor([5, 5]), calibration=0.5) == [15.0, 5.0]


# ------------------------------------------------------------------------------------------ sparse collectives


def _collectives_body(rank, world, replicas):
    E, X = len(replicas), 5
    placement = Placement(tuple(tuple(r) for r in replicas), world)
    owned = placement.owned(rank)
    full_EX = torch.arange(E * X, dtype=torch.float32).view(E, X) + 1
    plan = build_gather_plan(placement, owned, rank)
    gathered = sparse_all_gather(full_EX[owned], plan, dist.group.WORLD)
    # Dense reference: an all-gather of everything, then keep what the placement puts here.
    everything = [torch.empty(len(placement.owned(w)), X) for w in range(world)]
    dist.all_gather(everything, full_EX[owned].contiguous())
    dense = torch.empty(E, X)
    for w in range(world):
        dense[placement.owned(w)] = everything[w]
    expected_gather = dense[placement.materialized(rank)]
    # Reduce-scatter: each rank contributes (rank+1) * ones for every materialized expert.
    grad_MX = torch.full((len(placement.materialized(rank)), X), float(rank + 1))
    reduced = sparse_reduce_scatter(grad_MX, plan, dist.group.WORLD)
    contrib_EX = torch.zeros(E, X)
    contrib_EX[placement.materialized(rank)] = grad_MX
    dist.all_reduce(contrib_EX)  # dense reference: sum over all ranks, then keep the owned rows
    return dict(gather=gathered, expected_gather=expected_gather, reduced=reduced, expected_reduced=contrib_EX[owned],
                sent=plan.experts_sent)


@pytest.mark.parametrize("world,replicas", [
    (2, [[0], [0, 1], [1], [1, 0]]),                         # one replica each way
    (4, [[0, 1, 2, 3], [0], [1], [1, 3], [2], [2], [3], [3]]),  # expert 0 needed by everybody, experts 1,4,5 by nobody else
    (2, [[0], [0], [1], [1]]),                              # nothing to move
])
def test_sparse_collectives_match_dense_reference(world, replicas):
    results = run_distributed(_collectives_body, world, replicas)
    for r in results:
        torch.testing.assert_close(r["gather"], r["expected_gather"])
        torch.testing.assert_close(r["reduced"], r["expected_reduced"])
    # Volume: exactly one send per (expert, non-owner replica).
    assert sum(r["sent"] for r in results) == sum(len(rep) - 1 for rep in replicas)


# --------------------------------------------------------------------------------------------------- the layer

D, F = 8, 16


def make_layer(E, K, group=None, fssdp=None, **router_kw):
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, 0, RouterConfig(top_k=K, **router_kw), layer_id=1, ep_group=group, fssdp=fssdp)
    torch.manual_seed(1)
    layer.reset_parameters(0.3, 0.3, seed=0)
    return layer


def fssdp_layer_body(rank, world, E, K, tokens, bias, load, budget, remat):
    layer = make_layer(E, K, dist.group.WORLD, FSSDPConfig(budget=budget, rematerialize=remat))
    state = layer.experts.state
    state.placement = place_replicas(state.owners, load, world, budget)
    x, dy = global_inputs(tokens * world, D)
    sl = slice(rank * tokens, (rank + 1) * tokens)
    gc.collect()
    y, dx, grads, record, alive = run_layer(layer, x[sl], dy[sl], bias)
    return dict(y=y, dx=dx, grads=grads, owned=list(layer.experts.expert_ids), alive=alive,
                replicas=state.placement.replicas,
                materialized=state.placement.materialized(rank),
                computed=record.tokens_per_local_expert_L.sum().item())


SKEW = [0.0, -9.0, -9.0, -9.0, 0.0, -9.0, -9.0, -9.0]  # experts 0 and 4 take every token


@pytest.mark.parametrize("world,tokens,bias,load,budget,remat", [
    (2, 6, None, [1.0] * 8, 1, False),                              # balanced, no replicas needed
    (2, 6, SKEW, [50, 0, 0, 0, 50, 0, 0, 0], 2, False),              # skewed, hot experts replicated
    (2, 6, SKEW, [50, 0, 0, 0, 50, 0, 0, 0], 2, True),               # ... with re-materialization
    (4, 4, SKEW, [50, 0, 0, 0, 50, 0, 0, 0], 1, False),              # 4 ranks
    (4, 4, None, [8, 7, 6, 5, 4, 3, 2, 1], 2, True),
], ids=["balanced", "skewed", "skewed_remat", "skewed_4ranks", "zipf_4ranks_remat"])
def test_fssdp_layer_matches_single_process(world, tokens, bias, load, budget, remat):
    E, K = 8, 2
    results = run_distributed(fssdp_layer_body, world, E, K, tokens, bias, load, budget, remat)
    ref = make_layer(E, K)
    x, dy = global_inputs(tokens * world, D)
    y_ref, dx_ref, grads, _, _ = run_layer(ref, x, dy, bias)
    assert_ranks_match_reference(results, y_ref, dx_ref, grads, ids_key="owned")  # each expert owned exactly once
    if not Placement(tuple(tuple(p) for p in results[0]["replicas"]), world).has_replicas():
        assert all(r["alive"] is None for r in results)  # owners only: parameters used in place, no gather
    elif remat:
        assert all(r["alive"] is False for r in results)  # gathered weights freed after forward
    else:
        assert all(r["alive"] for r in results)
    if bias is SKEW:
        computed = [r["computed"] for r in results]
        assert max(computed) <= 1.1 * (sum(computed) / world)  # replicas spread the two hot experts' load


def fssdp_capacity_body(rank, world, tokens, load, capacity_factor, pad):
    layer = make_layer(8, 2, dist.group.WORLD, FSSDPConfig(budget=2), capacity_factor=capacity_factor,
                       pad_to_capacity=pad)
    state = layer.experts.state
    state.placement = place_replicas(state.owners, load, world, 2)
    x, dy = global_inputs(tokens * world, D)
    sl = slice(rank * tokens, (rank + 1) * tokens)
    y, dx, grads, record, _ = run_layer(layer, x[sl], dy[sl], SKEW)
    return dict(y=y, dx=dx, grads=grads, owned=list(layer.experts.expert_ids), dropped=record.num_dropped)


@pytest.mark.parametrize("pad", [False, True])
def test_fssdp_capacity_mode_matches_per_rank_reference(pad):
    world, tokens, load = 2, 8, [50, 0, 0, 0, 50, 0, 0, 0]
    results = run_distributed(fssdp_capacity_body, world, tokens, load, 1.0, pad)
    ref = make_layer(8, 2, capacity_factor=1.0, pad_to_capacity=pad)
    x, dy = global_inputs(tokens * world, D)
    ys, dxs, grads = [], [], None
    for r in range(world):  # capacity is per source rank: the reference applies it to each rank's slice
        ref.zero_grad()
        y, dx, g, _, _ = run_layer(ref, x[r * tokens:(r + 1) * tokens], dy[r * tokens:(r + 1) * tokens], SKEW)
        ys.append(y)
        dxs.append(dx)
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), torch.cat(ys), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), torch.cat(dxs), rtol=1e-5, atol=1e-6)
    for name in ("experts.w1_EDF", "experts.w2_EFD"):
        got = torch.zeros_like(grads[name])
        for r in results:
            got[r["owned"]] += r["grads"][name]
        torch.testing.assert_close(got, grads[name], rtol=1e-5, atol=1e-6)
    assert all(r["dropped"] > 0 for r in results)
