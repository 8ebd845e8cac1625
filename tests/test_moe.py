"""Single-process MoE building blocks: grouped GEMM, experts, router, routing plan, the layer."""

import math

import pytest
import torch

from moetrain.config.schema import RouterConfig
from moetrain.kernels.grouped_gemm import ChunkWeightGrads, grouped_mm, grouped_swiglu
from moetrain.moe.experts import GroupedExperts, reference_experts
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers.topk import TopKRouter as Router, balanced_assignment, select_topk
from moetrain.moe.plan import build_plan, capacity_for, permute, unpermute
from tests.moe_reference import dense_moe_reference


from moetrain.kernels.permute import triton_available

GEMM_BACKENDS = ["grouped_mm", "loop"] + (["triton"] if triton_available() else [])


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("counts", [[3, 0, 7, 2], [0, 0, 0, 0], [20, 0, 0, 0], [1, 1, 1, 1]])
def test_grouped_mm_matches_per_group_matmul(backend, counts):
    """The Triton kernels (interpreter on CPU), torch._grouped_mm and the loop pass the same test."""
    torch.manual_seed(0)
    R, D, F = sum(counts), 16, 24
    x = torch.randn(R, D, requires_grad=True)
    w = torch.randn(len(counts), D, F, requires_grad=True)
    c = torch.tensor(counts)
    y = grouped_mm(x, w, c, backend)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    outs, s = [], 0
    for e, n in enumerate(counts):
        outs.append(xr[s:s + n] @ wr[e])
        s += n
    yr = torch.cat(outs)
    (yr * dy).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.all(w.grad[e] == 0)


def test_grouped_mm_survives_stride0_gradient():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 8, 4, requires_grad=True)
    grouped_mm(x, w, torch.tensor([2, 4]), "grouped_mm").sum().backward()  # sum() gives a stride-0 gradient
    assert w.grad is not None and x.grad is not None


def test_grouped_experts_equal_per_expert_loop_including_empty_expert():
    torch.manual_seed(1)
    experts = GroupedExperts(8, 16, [0, 1, 2, 3])
    experts.reset_parameters(0.1, 0.1, seed=0, layer_id=0)
    counts = torch.tensor([5, 0, 3, 4])
    x = torch.randn(12, 8, requires_grad=True)
    y = experts(x, counts)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    grads = [p.grad.clone() for p in (experts.w1_EDF, experts.w3_EDF, experts.w2_EFD)]
    xr = x.detach().clone().requires_grad_()
    ws = [p.detach().clone().requires_grad_() for p in (experts.w1_EDF, experts.w3_EDF, experts.w2_EFD)]
    yr = reference_experts(xr, counts, *ws)
    (yr * dy).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    for g, wr in zip(grads, ws):
        torch.testing.assert_close(g, wr.grad)
    assert all(torch.all(g[1] == 0) for g in grads)


class _FullSizeOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops among `names` that produce a tensor of `numel` elements (a whole stacked weight)."""

    def __init__(self, numel, names=("add", "add_", "cat", "sum")):
        super().__init__()
        self.numel, self.names, self.seen = numel, names, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.names and isinstance(out, torch.Tensor) and out.numel() == self.numel:
            self.seen.append(name)
        return out


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("chunks", [
    [slice(0, 2), slice(2, 5), slice(5, 6)],  # split by experts, in order
    [slice(3, 6), slice(0, 3)],  # out of order
    [slice(0, 0), slice(0, 6)],  # an empty chunk
    [slice(0, 6)] * 3,  # split by tokens: every chunk computes every expert, on its own rows
    [slice(0, 6)],  # one chunk
    [slice(0, 2), slice(4, 6)],  # experts 2, 3 in no chunk: zero gradients
])
def test_chunk_weight_grads_are_built_in_place_and_equal_per_chunk_slices(chunks, backend):
    """ChunkWeightGrads: the chunks of one forward write their weight gradients into one buffer per weight, with no
    full-size addition or concatenation in backward, and the gradients equal the reference computed on each chunk's
    weight slices (autograd adding them up: a full-size addition per extra chunk and weight); an expert with no rows
    or in no chunk gets zeros; a second backward of the same shape starts from scratch."""
    torch.manual_seed(0)
    ex = GroupedExperts(4, 8, list(range(6)), backend)  # 16-byte rows: torch._grouped_mm's alignment
    ex.reset_parameters(0.3, 0.3, seed=0, layer_id=1)
    weights = (ex.w1_EDF, ex.w3_EDF, ex.w2_EFD)
    counts = [torch.tensor([3, 0, 2, 1, 4, 2][s]) + i % 2 * (torch.arange(6)[s] % 3)
              for i, s in enumerate(chunks)]
    xs = [torch.randn(int(c.sum()), 4) for c in counts]
    dy = torch.randn(sum(x.shape[0] for x in xs), 4)

    for rep in range(2):
        ex.zero_grad(set_to_none=True)
        grads = ChunkWeightGrads(len(chunks))
        y = torch.cat([ex.compute(x, c, weights, s, grads) for x, c, s in zip(xs, counts, chunks)])
        ops = _FullSizeOps(ex.w1_EDF.numel())
        with ops:
            (y * dy).sum().backward()
        # The loop accumulates with addmm; the other backends return a fresh product, added in place to the buffer.
        assert set(ops.seen) <= ({"add_"} if backend != "loop" else set()) and grads.pending == len(chunks)
        ws = [w.detach().clone().requires_grad_() for w in weights]
        yr = torch.cat([reference_experts(x, c, *(w[s] for w in ws)) for x, c, s in zip(xs, counts, chunks)])
        (yr * dy).sum().backward()
        torch.testing.assert_close(y, yr)
        for w, wr in zip(weights, ws):
            torch.testing.assert_close(w.grad, wr.grad if wr.grad is not None else torch.zeros_like(w))


def test_chunk_weight_grads_accumulate_over_micro_batches():
    """Gradient accumulation: each micro-batch's chunks build their gradient in their own buffer, and autograd adds
    the second into the first (now `.grad`) without the workspace handing the busy buffer out again."""
    torch.manual_seed(0)
    ex = GroupedExperts(4, 8, list(range(3)))
    ex.reset_parameters(0.3, 0.3, seed=0, layer_id=0)
    weights = (ex.w1_EDF, ex.w3_EDF, ex.w2_EFD)
    ws = [w.detach().clone().requires_grad_() for w in weights]
    for micro in range(2):
        counts = [torch.tensor([2, 1 + micro, 0]), torch.tensor([1, 0, 3])]  # split by tokens
        xs = [torch.randn(int(c.sum()), 4) for c in counts]
        grads = ChunkWeightGrads(2)
        y = torch.cat([ex.compute(x, c, weights, slice(None), grads) for x, c in zip(xs, counts)])
        yr = torch.cat([reference_experts(x, c, *ws) for x, c in zip(xs, counts)])
        dy = torch.randn_like(y)
        (y * dy).sum().backward()
        (yr * dy).sum().backward()
    for w, wr in zip(weights, ws):
        torch.testing.assert_close(w.grad, wr.grad)


def test_chunk_weight_grads_under_autocast_cast_once_and_sum_in_fp32():
    """Under bf16 autocast the chunks share one bf16 copy of each weight, and their gradient is summed in the fp32
    master weights' dtype: equal to autograd's sum through per-chunk casts."""
    torch.manual_seed(0)
    ex = GroupedExperts(8, 16, list(range(4)))
    ex.reset_parameters(0.3, 0.3, seed=0, layer_id=0)
    weights = (ex.w1_EDF, ex.w3_EDF, ex.w2_EFD)
    counts = [torch.tensor([3, 0, 2, 5]), torch.tensor([1, 4, 0, 2])]  # split by tokens
    xs = [torch.randn(int(c.sum()), 8) for c in counts]
    dy = torch.randn(sum(x.shape[0] for x in xs), 8)
    grads = ChunkWeightGrads(2)
    casts = _FullSizeOps(ex.w1_EDF.numel(), names=("_to_copy",))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with casts:
            ys = [ex.compute(x, c, weights, slice(None), grads) for x, c in zip(xs, counts)]
        assert len(casts.seen) == 3  # one bf16 copy per weight for both chunks
        ws = [w.detach().clone().requires_grad_() for w in weights]
        yr = torch.cat([grouped_swiglu(x, *ws, c, "loop") for x, c in zip(xs, counts)])  # a chunk each
    y = torch.cat(ys)
    assert y.dtype == torch.bfloat16
    (y.float() * dy).sum().backward()
    (yr.float() * dy).sum().backward()
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    for w, wr in zip(weights, ws):
        assert w.grad.dtype == torch.float32
        torch.testing.assert_close(w.grad, wr.grad)


def test_expert_init_does_not_depend_on_split():
    full = GroupedExperts(8, 16, [0, 1, 2, 3])
    full.reset_parameters(0.02, 0.01, seed=3, layer_id=2)
    half = GroupedExperts(8, 16, [2, 3])
    half.reset_parameters(0.02, 0.01, seed=3, layer_id=2)
    torch.testing.assert_close(full.w1_EDF[2:], half.w1_EDF, rtol=0, atol=0)
    torch.testing.assert_close(full.w2_EFD[2:], half.w2_EFD, rtol=0, atol=0)


def test_router_bias_selects_but_does_not_scale_gates():
    torch.manual_seed(0)
    router = Router(8, 4, RouterConfig(top_k=1, norm_topk_prob=False))
    router.reset_parameters(0.5)
    x = torch.randn(16, 8)
    before = router(x)
    router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    after = router(x)
    assert torch.all(after.topk_idx_TK == 3)
    torch.testing.assert_close(after.gates_TK[:, 0], after.scores_TE[:, 3])
    torch.testing.assert_close(after.scores_TE, before.scores_TE)


def test_router_counts_its_decision_once():
    router = Router(8, 4, RouterConfig(top_k=2))
    router.reset_parameters(0.5)
    out = router(torch.randn(10, 8))
    assert out.tokens_per_expert_E.sum() == 20
    assert out.tokens_per_expert_E.tolist() == torch.bincount(out.topk_idx_TK.flatten(), minlength=4).float().tolist()


def test_router_gates_renormalised_and_scaled_sigmoid():
    router = Router(8, 6, RouterConfig(top_k=3, score_func="sigmoid", norm_topk_prob=True, route_scale=2.5))
    router.reset_parameters(0.5)
    out = router(torch.randn(7, 8))
    torch.testing.assert_close(out.gates_TK.sum(-1), torch.full((7,), 2.5))


def test_group_limited_routing_stays_in_best_groups():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.1, 0.5, 0.0, 0.95, 0.0]])  # groups of 2: [1.7, 0.2, 0.5, 0.95]
    idx = select_topk(scores, k=2, num_groups=4, topk_groups=2)
    assert set(idx[0].tolist()) <= {0, 1, 6, 7}
    assert set(idx[0].tolist()) == {0, 6}


def test_balanced_assignment_is_even():
    idx = balanced_assignment(12, 8, 2, "cpu")
    assert torch.bincount(idx.flatten(), minlength=8).tolist() == [3] * 8
    assert all(len(set(row.tolist())) == 2 for row in idx)


def test_plan_dropless_permute_unpermute_roundtrip():
    torch.manual_seed(0)
    T, K, E, D = 9, 2, 4, 3
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    gates = torch.rand(T, K)
    plan = build_plan(idx, gates, E)
    assert plan.tokens_per_expert_E.tolist() == torch.bincount(idx.flatten(), minlength=E).tolist()
    x = torch.randn(T, D)
    x_RD = permute(x, plan)
    expert_of_row = idx.flatten()[torch.argsort(idx.flatten(), stable=True)]
    assert torch.all(expert_of_row[1:] >= expert_of_row[:-1])
    y = unpermute(x_RD, plan)
    torch.testing.assert_close(y, x * gates.sum(1, keepdim=True))


def test_capacity_drops_lowest_gates_and_pads():
    # 4 tokens all pick expert 0 first; capacity = ceil(4*1/2 * 1.0) = 2 -> keep the 2 highest gates.
    idx = torch.tensor([[0], [0], [0], [1]])
    gates = torch.tensor([[0.1], [0.9], [0.5], [0.7]])
    assert capacity_for(4, 1, 2, 1.0) == 2
    plan = build_plan(idx, gates, 2, capacity_factor=1.0)
    assert plan.num_dropped == 1
    assert plan.token_idx_R.tolist() == [1, 2, 3]
    assert plan.tokens_per_expert_E.tolist() == [2, 1]
    padded = build_plan(idx, gates, 2, capacity_factor=1.0, pad_to_capacity=True)
    assert padded.tokens_per_expert_E.tolist() == [2, 2]
    assert padded.token_idx_R.tolist() == [1, 2, 3, 4]  # 4 = T: the zero padding row
    x = torch.randn(4, 3)
    x_RD = permute(x, padded)
    assert torch.all(x_RD[3] == 0)
    y = unpermute(x_RD, padded)
    torch.testing.assert_close(y[0], torch.zeros(3))
    torch.testing.assert_close(y[1], 0.9 * x[1])


def _layer(E=4, K=2, shared=0, **router_kw):
    torch.manual_seed(0)
    layer = MoELayer(8, 16, E, shared, RouterConfig(top_k=K, **router_kw), layer_id=1)
    layer.reset_parameters(0.2, 0.2, seed=0)
    return layer


@pytest.mark.parametrize("E,K", [(4, 2), (4, 4), (8, 1)])
def test_layer_matches_dense_reference_forward_and_backward(E, K):
    layer = _layer(E, K)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    routed = layer.router(x.detach().view(-1, 8))
    xr = x.detach().clone().requires_grad_()
    ws = [p.detach().clone().requires_grad_() for p in (layer.experts.w1_EDF, layer.experts.w3_EDF,
                                                         layer.experts.w2_EFD)]
    gate_w = layer.router.gate.weight.detach().clone().requires_grad_()
    scores = torch.softmax(xr.view(-1, 8) @ gate_w.t(), -1)
    gates = scores.gather(1, routed.topk_idx_TK)
    if K > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    yr = dense_moe_reference(xr.view(-1, 8), routed.topk_idx_TK, gates, *ws).view_as(y)
    (yr * dy).sum().backward()
    torch.testing.assert_close(y, yr)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.router.gate.weight.grad, gate_w.grad)
    for p, wr in zip((layer.experts.w1_EDF, layer.experts.w3_EDF, layer.experts.w2_EFD), ws):
        torch.testing.assert_close(p.grad, wr.grad)


def test_layer_single_token_and_all_to_one_expert():
    layer = _layer(4, 1)
    layer.router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))  # every token picks expert 2
    x = torch.randn(1, 1, 8, requires_grad=True)
    y, record = layer(x, return_record=True)
    y.pow(2).sum().backward()
    assert record.tokens_per_expert_E.tolist() == [0, 0, 1, 0]
    assert torch.all(layer.experts.w1_EDF.grad[[0, 1, 3]] == 0)
    assert layer.experts.w1_EDF.grad[2].abs().sum() > 0


def test_layer_shared_experts_added():
    layer = _layer(4, 2, shared=1)
    x = torch.randn(1, 3, 8)
    routed_only = layer.shared_experts
    layer.shared_experts = None
    y0 = layer(x)
    layer.shared_experts = routed_only
    y1 = layer(x)
    torch.testing.assert_close(y1 - y0, routed_only(x.view(-1, 8)).view_as(y1))


def test_layer_capacity_mode_matches_reference_with_drops():
    layer = _layer(4, 2, capacity_factor=0.5)
    x = torch.randn(2, 8, 8)
    y, record = layer(x, return_record=True)
    assert record.num_dropped > 0
    routed = layer.router(x.view(-1, 8))
    plan = build_plan(routed.topk_idx_TK, routed.gates_TK, 4, 0.5)
    expert_of_row = torch.repeat_interleave(torch.arange(4), plan.tokens_per_expert_E)
    keep_TK = torch.zeros(16, 2)  # 1 where the copy (t, k) survived the capacity cut
    for t, e in zip(plan.token_idx_R.tolist(), expert_of_row.tolist()):
        keep_TK[t, (routed.topk_idx_TK[t] == e).nonzero()[0, 0]] = 1
    assert int(keep_TK.sum()) == 32 - plan.num_dropped
    yr = dense_moe_reference(x.view(-1, 8), routed.topk_idx_TK, routed.gates_TK, layer.experts.w1_EDF,
                             layer.experts.w3_EDF, layer.experts.w2_EFD, keep_TK)
    torch.testing.assert_close(y.view(-1, 8), yr)
    assert math.isclose(record.num_dropped / record.num_copies, plan.num_dropped / 32)


@pytest.mark.parametrize("backend", [b for b in GEMM_BACKENDS if b != "loop"])
def test_fused_grouped_swiglu_backends_match_the_loop(backend):
    from moetrain.kernels.grouped_gemm import grouped_swiglu

    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 17, 3])
    x = torch.randn(25, 16)
    ws = [torch.randn(4, 16, 32) * 0.2, torch.randn(4, 16, 32) * 0.2, torch.randn(4, 32, 16) * 0.2]
    dy = torch.randn(25, 16)
    outs = {}
    for b in ("loop", backend):
        xi = x.clone().requires_grad_()
        wi = [w.clone().requires_grad_() for w in ws]
        y = grouped_swiglu(xi, *wi, counts, b)
        (y * dy).sum().backward()
        outs[b] = [y.detach(), xi.grad] + [w.grad for w in wi]
    for got, want in zip(outs[backend], outs["loop"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
