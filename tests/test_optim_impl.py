"""AdamW implementations: fused, foreach and the per-tensor loop take the same steps; `optim.impl=auto` picks fused
wherever torch supports it (CPU included) and trains like `optim.impl=foreach`."""

import pytest
import torch
from torch import nn

from moetrain.cli import train_main
from moetrain.config.schema import OptimConfig
from moetrain.train.optim import build_optimizer, fused_supported, param_groups
from tests.train_utils import losses, overrides, read_metrics

IMPLS = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 50))


def _adamw_steps(impl: str, steps: int = 5) -> list[torch.Tensor]:
    model = _model()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **IMPLS[impl])
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, 50, (4, 8), generator=data)
        loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_foreach_and_loop_adamw_take_the_same_steps():
    ref = _adamw_steps("loop")
    start = [p.detach() for p in _model().parameters()]
    for impl in ("fused", "foreach"):
        for got, want, p0 in zip(_adamw_steps(impl), ref, start):
            assert not torch.equal(want, p0)  # the parameters moved
            # fp32: the kernels order the same arithmetic differently; a few ulps after 5 steps.
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_auto_picks_fused_on_cpu_and_explicit_choices_are_kept():
    model = _model()
    assert fused_supported(model.parameters())
    auto = build_optimizer(model, OptimConfig(impl="auto"), torch.device("cpu"))
    assert all(g["fused"] and not g["foreach"] for g in auto.param_groups)
    foreach = build_optimizer(model, OptimConfig(impl="foreach"), torch.device("cpu"))
    assert all(not g["fused"] and g["foreach"] for g in foreach.param_groups)
    fused = build_optimizer(model, OptimConfig(impl="fused"), torch.device("cpu"))
    assert all(g["fused"] for g in fused.param_groups)
    # A parameter type without a fused kernel (integer here) keeps auto on foreach.
    assert not fused_supported([torch.zeros(2, dtype=torch.int64)])
    assert not fused_supported([])


def test_auto_training_follows_foreach(tmp_path):
    cache = tmp_path / "cache"
    runs = {}
    for impl in ("auto", "foreach"):
        run = tmp_path / impl
        assert train_main(overrides(run, cache, "trainer.max_steps=20", f"optim.impl={impl}")) == 0
        runs[impl] = run
    auto, foreach = losses(runs["auto"]), losses(runs["foreach"])
    assert sorted(auto) == list(range(1, 21))
    for step in auto:
        assert auto[step] == pytest.approx(foreach[step], rel=1e-5), step
    norms = [{r["step"]: r["grad_norm"] for r in read_metrics(run) if "grad_norm" in r} for run in runs.values()]
    for step in norms[0]:
        assert norms[0][step] == pytest.approx(norms[1][step], rel=1e-5), step
