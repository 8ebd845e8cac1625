"""Expert parallelism, layer level: the all-to-all MoE layer on 2 and 4 gloo ranks against one process.

Every rank holds a slice of the same global batch; the loss is sum(y * dy) over the global batch, so
    outputs:       concatenation over ranks == single process
    input grads:   per-rank slices == single process
    router grads:  sum over ranks == single process (dense parameter, data parallel over the world)
    expert grads:  for each expert, sum over its dp replicas == single process
"""

import pytest
import torch

from moetrain.config.schema import RouterConfig
from moetrain.parallel.moe_layer import build_moe_layer
from moetrain.parallel.mesh import ParallelContext, build_groups
from tests.distributed import run_distributed
from tests.moe_reference import assert_ranks_match_reference, global_inputs, run_layer

D, F = 8, 16


def make_layer(E, K, ep_group=None, degree="1", **router_kw):
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, 0, RouterConfig(top_k=K, **router_kw), layer_id=1, ep_group=ep_group,
                            pipeline_degree=degree)
    torch.manual_seed(1)
    layer.reset_parameters(0.3, 0.3, seed=0)
    return layer


def ep_body(rank, world_size, ep, E, K, tokens_per_rank, bias, router_kw, degree="1"):
    ctx = build_groups(ParallelContext(ep=ep))
    layer = make_layer(E, K, ctx.ep_group, degree, **router_kw)
    x, dy = global_inputs(sum(tokens_per_rank), D)
    start = sum(tokens_per_rank[:rank])
    sl = slice(start, start + tokens_per_rank[rank])
    y, dx, grads, stats, _ = run_layer(layer, x[sl], dy[sl], bias)
    return dict(y=y, dx=dx, grads=grads, expert_ids=layer.experts.expert_ids,
                received=stats.tokens_per_local_expert_L.sum().item())


CASES = {
    # name: (world, ep, E, K, tokens_per_rank, bias, router kwargs)
    "ep2": (2, 2, 4, 2, [6, 6], None, {}),
    "ep4": (4, 4, 8, 2, [5, 5, 5, 5], None, {}),
    "dp2xep2": (4, 2, 4, 2, [4, 4, 4, 4], None, {}),
    "uneven_tokens": (2, 2, 4, 2, [7, 2], None, {}),
    "rank_receives_nothing": (2, 2, 4, 1, [5, 5], [9.0, 9.0, 0.0, 0.0], {}),  # only experts 0,1 (rank 0) used
    "expert_nobody_picks": (2, 2, 4, 1, [6, 6], [0.0, -9.0, 0.0, 0.0], {}),
    "all_to_one_expert": (2, 2, 4, 1, [4, 4], [0.0, 0.0, 0.0, 9.0], {}),
    "top_k_equals_E": (2, 2, 4, 4, [3, 3], None, {}),
    "one_token_per_rank": (2, 2, 4, 2, [1, 1], None, {}),
    "capacity_drop": (2, 2, 4, 2, [8, 8], None, {"capacity_factor": 0.5}),
    "capacity_pad": (2, 2, 4, 2, [8, 8], None, {"capacity_factor": 1.0, "pad_to_capacity": True}),
    # pipelined all-to-all: name ends with "@degree"
    "ep2@2": (2, 2, 4, 2, [6, 6], None, {}),
    "ep4_uneven@2": (4, 4, 8, 2, [5, 1, 0, 6], None, {}),
    "rank_receives_nothing@2": (2, 2, 4, 1, [5, 5], [9.0, 9.0, 0.0, 0.0], {}),
    "capacity_pad@4": (2, 2, 8, 2, [8, 8], None, {"capacity_factor": 1.0, "pad_to_capacity": True}),
    "more_chunks_than_experts@8": (2, 2, 4, 2, [6, 6], None, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ep_layer_matches_single_process(case):
    world, ep, E, K, tokens_per_rank, bias, router_kw = CASES[case]
    degree = case.split("@")[1] if "@" in case else "1"
    results = run_distributed(ep_body, world, ep, E, K, tokens_per_rank, bias, router_kw, degree)
    ref_layer = make_layer(E, K, None, **router_kw)
    x, dy = global_inputs(sum(tokens_per_rank), D)
    if router_kw.get("capacity_factor"):
        # Capacity is per source rank (local T): the reference applies it per rank slice, like the ranks do.
        ys, dxs, grads = [], [], None
        start = 0
        for n in tokens_per_rank:
            ref_layer.zero_grad()
            y, dx, g, _, _ = run_layer(ref_layer, x[start:start + n], dy[start:start + n], bias)
            ys.append(y)
            dxs.append(dx)
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
            start += n
        y_ref, dx_ref = torch.cat(ys), torch.cat(dxs)
    else:
        y_ref, dx_ref, grads, _, _ = run_layer(ref_layer, x, dy, bias)

    assert_ranks_match_reference(results, y_ref, dx_ref, grads)
    if case.startswith("rank_receives_nothing"):
        assert results[1]["received"] == 0 and results[0]["received"] > 0
    if case == "expert_nobody_picks":
        for name in ("experts.w1_EDF", "experts.w2_EFD"):
            assert torch.all(grads[name][1] == 0)
