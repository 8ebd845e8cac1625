"""Every routing method, through its preset (`router=<method>`), under every parallel mode: expert parallelism over 2
gloo ranks and FSSDP over 2 ranks equal one process, for one MoE layer (outputs, input gradients, every parameter
gradient including the method's own parameters, with the router losses in the objective) and for a 20-step training
run through moetrain-train (the loss curve and the global routing counts).

The methods are read from the registry, so a new routing method is covered here without touching this file; its
own behaviour (what it selects, its loss) is tested in its own test file.

Legend: B sequences, S sequence length, D model dim, F expert hidden dim, E experts.
"""

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.moe.routers import ROUTERS
from moetrain.parallel.mesh import ParallelContext, build_groups
from moetrain.parallel.moe_layer import build_moe_layer
from tests.distributed import run_distributed
from tests.train_utils import losses, overrides, read_metrics

B, S, D, F, E = 4, 6, 8, 16, 8
METHODS = sorted(ROUTERS)
EXPERT_WEIGHTS = ("experts.w1_EDF", "experts.w3_EDF", "experts.w2_EFD")


def router_cfg(method: str):
    """The method's preset (configs/router/<method>.yaml), as a user selects it, on a model of E experts."""
    return compose_config([f"router={method}", f"model.num_experts={E}"]).router


def global_batch(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)


def make_layer(method, group=None, fssdp=None):
    torch.manual_seed(0)
    layer = build_moe_layer(D, F, E, 0, router_cfg(method), layer_id=1, ep_group=group, dp_group=group, fssdp=fssdp)
    layer.reset_parameters(0.3, 0.3, seed=0)
    with torch.no_grad():  # non-zero values for parameters a method initialises to zero (e.g. residual gates)
        g = torch.Generator().manual_seed(1)
        for name, p in layer.named_parameters():
            if not name.startswith("experts.") and not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return layer


def run(layer, x_BSD, dy_BSD, share: float):
    """Forward, then backward of sum(y * dy) + share * (router losses): `share` is this rank's fraction of the
    global tokens, so the ranks' objectives add up to the one-process objective (the losses are token means)."""
    x = x_BSD.clone().requires_grad_()
    y, record = layer(x, return_record=True)
    objective = (y * dy_BSD).sum()
    if record.loss is not None:
        objective = objective + share * record.loss
    objective.backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return dict(y=y.detach(), dx=x.grad, grads=grads, expert_ids=list(layer.experts.expert_ids),
                copies=record.num_copies, losses={k: v.detach().item() for k, v in record.losses.items()},
                counts=record.tokens_per_expert_E.clone())


def _two_ranks(rank, world, method, mode):
    from moetrain.config.schema import FSSDPConfig

    ctx = build_groups(ParallelContext(ep=world))
    layer = make_layer(method, ctx.ep_group, FSSDPConfig(budget=1, flops_per_byte=0.0) if mode == "fssdp" else None)
    x, dy = global_batch()
    mine = slice(rank * B // world, (rank + 1) * B // world)  # whole sequences per rank
    return run(layer, x[mine], dy[mine], 1 / world)


@pytest.mark.parametrize("mode", ["ep", "fssdp"])
@pytest.mark.parametrize("method", METHODS)
def test_layer_on_two_ranks_matches_one_process(method, mode):
    results = run_distributed(_two_ranks, 2, method, mode)
    x, dy = global_batch()
    ref = run(make_layer(method), x, dy, 1.0)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), ref["y"], **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), ref["dx"], **tol)
    assert sum(r["copies"] for r in results) == ref["copies"]
    torch.testing.assert_close(sum(r["counts"] for r in results), ref["counts"])
    for name, g_ref in ref["grads"].items():
        if name in EXPERT_WEIGHTS:  # each expert's gradient is the sum over the ranks that hold it
            got = torch.zeros_like(g_ref)
            for r in results:
                got[r["expert_ids"]] += r["grads"][name]
        else:  # replicated parameters: the ranks' gradients add up to the one-process gradient
            got = sum(r["grads"][name] for r in results)
        torch.testing.assert_close(got, g_ref, **tol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------------- 20-step training runs
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def _train_body(rank, world_size, args):
    from moetrain.cli import train_main

    return train_main(args)


def train(run, cache_dir, method, world, *extra):
    from moetrain.cli import train_main

    args = overrides(run, cache_dir, "trainer.max_steps=20", f"router={method}", "model.num_experts=8",
                     "router.bias_update_rate=0.01", *extra)
    if world == 1:
        assert train_main(args) == 0
    else:
        assert run_distributed(_train_body, world, args) == [0] * world
    return run


@pytest.mark.parametrize("method", [m for m in METHODS if m != "topk"])  # top-k: tests/test_ep_train.py, fssdp_train
def test_training_curve_on_two_ranks_matches_one_process(tmp_path, cache_dir, method):
    # The reference's micro-batch is the union of the 2 ranks' micro-batches (the loader gives micro-batch m of every
    # rank consecutive windows): losses over global counts (the aux loss) are per micro-batch, so with another split
    # they would legitimately differ.
    ref = train(tmp_path / "one", cache_dir, method, 1, "data.micro_batch_size=4")
    ref_losses, ref_rows = losses(ref), read_metrics(ref)
    for mode, extra in (("ep2", ["parallel.ep=2"]), ("fssdp2", ["parallel.mode=fssdp"])):
        run = train(tmp_path / mode, cache_dir, method, 2, *extra)
        got = losses(run)
        assert sorted(got) == list(range(1, 21)), mode
        for step in ref_losses:
            assert got[step] == pytest.approx(ref_losses[step], rel=1e-4, abs=1e-5), (mode, step)
        rows = read_metrics(run)
        for key in ("moe/layer0/tokens_per_expert", "moe/layer0/experts_per_token", "moe/layer0/flops_per_token"):
            assert rows[-1][key] == pytest.approx(ref_rows[-1][key], rel=1e-6), (mode, key)
