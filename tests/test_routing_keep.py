"""The router's keep mask, the routing seam's one mechanism for "this copy computes nothing": a token may get fewer
than K experts, or none (null experts, dynamic k, expert choice), and the plan, the dispatchers and FSSDP skip the
copies the router did not keep exactly like capacity drops. Checked against the dense reference in one process and
against one process on 2 gloo ranks under expert parallelism and FSSDP (outputs, input and parameter gradients)."""

import dataclasses

import pytest
import torch

from moetrain.config.schema import FSSDPConfig, RouterConfig
from moetrain.moe.plan import build_plan
from moetrain.parallel.mesh import ParallelContext, build_groups
from moetrain.parallel.moe_layer import build_moe_layer
from tests.distributed import run_distributed
from tests.moe_reference import assert_ranks_match_reference, dense_moe_reference, global_inputs, run_layer

D, F, E, K = 8, 16, 4, 2


def keep_pattern(x_TD: torch.Tensor) -> torch.Tensor:
    """A deterministic, content-based mask (the same on any rank): every token keeps its first expert when its
    feature 0 is positive, its second when feature 1 is, and tokens with feature 2 > 1 keep none."""
    keep_TK = torch.stack([x_TD[:, 0] > 0, x_TD[:, 1] > 0], dim=1)
    return keep_TK & (x_TD[:, 2] <= 1.0)[:, None]


def with_keep_mask(layer):
    """Make the layer's router keep only the copies of `keep_pattern` (counts recomputed, as a router would)."""
    router, original = layer.router, layer.router.forward

    def forward(x_TD, ctx=None):
        out = original(x_TD, ctx)
        keep_TK = keep_pattern(x_TD.detach())
        counts_E = torch.bincount(out.topk_idx_TK[keep_TK], minlength=E).float()
        return dataclasses.replace(out, keep_TK=keep_TK, tokens_per_expert_E=counts_E)

    router.forward = forward
    return layer


def make_layer(group=None, fssdp=None):
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, 0, RouterConfig(top_k=K), layer_id=1, ep_group=group, fssdp=fssdp)
    layer.reset_parameters(0.3, 0.3, seed=0)
    return with_keep_mask(layer)


def test_plan_skips_copies_the_router_did_not_keep():
    topk_TK = torch.tensor([[0, 1], [1, 2], [2, 0]])
    gates_TK = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    keep_TK = torch.tensor([[True, False], [False, False], [True, True]])
    plan = build_plan(topk_TK, gates_TK, 3, keep_TK=keep_TK)
    assert plan.tokens_per_expert_E.tolist() == [2, 0, 1] and plan.num_dropped == 0
    assert sorted(plan.copy_idx_R.tolist()) == [0, 4, 5]
    assert plan.row_TK[1].tolist() == [-1, -1]  # token 1 has no expert at all
    capped = build_plan(topk_TK, gates_TK, 3, capacity_factor=1.0, keep_TK=keep_TK)  # capacity ceil(3/3) = 1
    assert capped.tokens_per_expert_E.tolist() == [1, 0, 1] and capped.num_dropped == 1


def test_local_layer_matches_the_dense_reference_with_a_keep_mask():
    layer = make_layer()
    x, dy = global_inputs(24, D)
    y, dx, grads, record, _ = run_layer(layer, x, dy)
    routed = layer.router(x)
    assert 0 < int(routed.keep_TK.sum()) < routed.keep_TK.numel() and (~routed.keep_TK).all(1).any()
    w = layer.experts
    y_ref = dense_moe_reference(x, routed.topk_idx_TK, routed.gates_TK, w.w1_EDF, w.w3_EDF, w.w2_EFD,
                                routed.keep_TK.float())
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-6)
    assert torch.all(y[(~routed.keep_TK).all(1)] == 0)  # a token with no expert gets nothing from the layer
    assert record.num_copies == int(routed.keep_TK.sum()) and record.num_dropped == 0
    assert record.tokens_per_local_expert_L.sum().item() == record.num_copies


def _two_rank_body(rank, world, mode):
    ctx = build_groups(ParallelContext(ep=world))
    layer = make_layer(ctx.ep_group, FSSDPConfig(budget=1, flops_per_byte=0.0) if mode == "fssdp" else None)
    x, dy = global_inputs(24, D)
    sl = slice(rank * 12, (rank + 1) * 12)
    y, dx, grads, _, _ = run_layer(layer, x[sl], dy[sl])
    return dict(y=y, dx=dx, grads=grads, expert_ids=list(layer.experts.expert_ids))


@pytest.mark.parametrize("mode", ["ep", "fssdp"])
def test_keep_mask_on_two_ranks_matches_one_process(mode):
    results = run_distributed(_two_rank_body, 2, mode)
    x, dy = global_inputs(24, D)
    y_ref, dx_ref, grads, _, _ = run_layer(make_layer(), x, dy)
    assert_ranks_match_reference(results, y_ref, dx_ref, grads)


def test_experts_per_token_is_logged_per_layer(tmp_path):
    from moetrain.cli import train_main
    from tests.train_utils import overrides, read_metrics

    run = tmp_path / "run"
    assert train_main(overrides(run, tmp_path / "cache", "trainer.max_steps=2", "router.top_k=3")) == 0
    rows = [r for r in read_metrics(run) if "loss" in r]
    assert all(r["moe/layer0/experts_per_token"] == 3.0 for r in rows)
