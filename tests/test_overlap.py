"""The scheduled chunk exchange (moetrain/moe/overlap.py): the pipelined MoE layer keeps outputs and every
gradient equal to the single-process reference (2 and 4 gloo ranks, degrees 1/2/4, shared experts with a gate,
selective recomputation, ranks and chunks that receive no rows), and its backward issues each chunk's reverse
all-to-all as soon as that chunk is differentiated, before the next chunk's backward runs."""

import pytest
import torch

from moetrain.config.schema import RouterConfig
from moetrain.parallel.mesh import ParallelContext, build_groups
from moetrain.parallel.moe_layer import build_moe_layer
from tests.distributed import run_distributed
from tests.moe_reference import assert_ranks_match_reference, global_inputs, run_layer

D, F = 8, 16
SHARED = ("shared_experts.w1.weight", "shared_experts.w2.weight", "shared_experts.w3.weight", "shared_gate.weight")


def make_layer(E, K, group=None, degree="1", shared=True, recompute=False, split="experts"):
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, 1 if shared else 0, RouterConfig(top_k=K), layer_id=1, ep_group=group,
                            pipeline_degree=degree, shared_gate=shared, pipeline_split=split)
    torch.manual_seed(1)
    layer.reset_parameters(0.3, 0.3, seed=0)
    layer.recompute_experts = recompute
    return layer


def _body(rank, world, E, K, tokens_per_rank, bias, degree, shared, recompute, split):
    ctx = build_groups(ParallelContext(ep=world))
    layer = make_layer(E, K, ctx.ep_group, degree, shared, recompute, split)
    assert layer.degree == int(degree)
    x, dy = global_inputs(sum(tokens_per_rank), D)
    start = sum(tokens_per_rank[:rank])
    sl = slice(start, start + tokens_per_rank[rank])
    y, dx, grads, record, _ = run_layer(layer, x[sl], dy[sl], bias)
    return dict(y=y, dx=dx, grads=grads, expert_ids=layer.experts.expert_ids,
                received=record.tokens_per_local_expert_L.tolist())


CASES = {
    # name: (world, E, K, tokens_per_rank, router bias, degree, shared experts, selective recomputation)
    "w2_d1_shared_recompute": (2, 4, 2, [6, 6], None, "1", True, True),
    "w2_d2_shared": (2, 4, 2, [7, 3], None, "2", True, False),
    "w2_d4_recompute": (2, 8, 2, [8, 8], None, "4", True, True),
    # experts 0-3 (rank 0) only: every chunk of rank 1 is empty
    "w2_d4_rank_receives_nothing": (2, 8, 1, [5, 5], [9.0] * 4 + [0.0] * 4, "4", True, False),
    # expert 1 (rank 0's chunk 1 at degree 4) never picked: one empty chunk among full ones
    "w2_d4_one_empty_chunk": (2, 8, 1, [6, 6], [0.0, -9.0] + [0.0] * 6, "4", False, False),
    "w4_d2_uneven_and_empty_rank": (4, 8, 2, [5, 1, 0, 6], None, "2", True, False),
    "w4_d2_recompute": (4, 8, 2, [4, 4, 4, 4], None, "2", True, True),
}
# The same schedule with chunks of tokens (parallel.pipeline_split=tokens) instead of chunks of experts.
CASES.update({f"{name}/tokens": CASES[name] for name in ("w2_d4_recompute", "w2_d4_rank_receives_nothing",
                                                          "w2_d4_one_empty_chunk", "w4_d2_uneven_and_empty_rank")})


@pytest.mark.parametrize("case", list(CASES))
def test_scheduled_exchange_matches_single_process(case):
    world, E, K, tokens, bias, degree, shared, recompute = CASES[case]
    results = run_distributed(_body, world, E, K, tokens, bias, degree, shared, recompute,
                              "tokens" if case.endswith("/tokens") else "experts")
    x, dy = global_inputs(sum(tokens), D)
    y_ref, dx_ref, grads, _, _ = run_layer(make_layer(E, K, shared=shared), x, dy, bias)
    assert_ranks_match_reference(results, y_ref, dx_ref, grads)
    for name in SHARED if shared else ():  # dense, data parallel over the ranks: the sum is the reference
        torch.testing.assert_close(sum(r["grads"][name] for r in results), grads[name], rtol=1e-5, atol=1e-6)
    if case.startswith("w2_d4_rank_receives_nothing"):
        assert results[1]["received"] == [0] * 4 and sum(results[0]["received"]) == 10
    if case.startswith("w2_d4_one_empty_chunk"):
        assert results[0]["received"][1] == 0 and min(results[0]["received"][i] for i in (0, 2, 3)) > 0


# ------------------------------------------------------------------------------------ the backward's schedule
class _Log(torch.autograd.Function):
    """Identity that appends `event` to `log` when its backward runs."""

    @staticmethod
    def forward(ctx, x, log, event):
        ctx.log, ctx.event = log, event
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(ctx.event)
        return grad, None, None


def _order_body(rank, world):
    ctx = build_groups(ParallelContext(ep=world))
    layer = make_layer(8, 2, ctx.ep_group, "4", shared=True)
    log, d, experts = [], layer.dispatcher, layer.experts
    combine_grad, dispatch_grad, compute, shared = (d.combine_comm_grad, d.dispatch_comm_grad, experts.compute,
                                                     layer.shared_experts.forward)
    d.combine_comm_grad = lambda g, plan, c: (log.append(f"gradient arrives {c}"), combine_grad(g, plan, c))[1]
    d.dispatch_comm_grad = lambda g, plan, c: (log.append(f"gradient home {c}"), dispatch_grad(g, plan, c))[1]
    chunk = iter(range(4))
    experts.compute = lambda *a, **k: _Log.apply(compute(*a, **k), log, f"experts backward {next(chunk)}")
    layer.shared_experts.forward = lambda x: _Log.apply(shared(x), log, "shared backward")
    x, dy = global_inputs(16, D)
    run_layer(layer, x[rank * 8:(rank + 1) * 8], dy[rank * 8:(rank + 1) * 8])
    return log


def test_backward_sends_each_chunk_home_as_soon_as_it_is_differentiated():
    expected = [f"gradient arrives {c}" for c in (3, 2, 1, 0)]
    for c in (3, 2, 1, 0):
        expected += [f"experts backward {c}", f"gradient home {c}"]
    expected += ["shared backward"]  # while the chunks travel home
    assert run_distributed(_order_body, 2) == [expected, expected]


def test_no_grad_forward_and_inputs_without_grad():
    """One process (LocalDispatcher): a no_grad forward equals the grad forward, and with an input that does not
    require grad the weights still get the reference gradients."""
    layer = make_layer(4, 2, shared=True)
    x, dy = global_inputs(10, D)
    with torch.no_grad():
        y0 = layer(x[None])
    y = layer(x[None])
    torch.testing.assert_close(y0, y)
    (y[0] * dy).sum().backward()
    ref = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    _, _, grads, _, _ = run_layer(layer, x, dy)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recompute", [False, True])
def test_cuda_matches_cpu(recompute):
    """One process on the GPU (LocalDispatcher: the exchange's Functions, placeholders and transposes on CUDA)."""
    x, dy = global_inputs(64, D)

    def run(device):
        layer = make_layer(8, 2, shared=True, recompute=recompute).to(device)
        xi = x.to(device).requires_grad_()
        y = layer(xi[None])
        (y[0] * dy.to(device)).sum().backward()
        return [y.cpu(), xi.grad.cpu()] + [p.grad.cpu() for p in layer.parameters()]

    for a, b in zip(run("cpu"), run("cuda")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
