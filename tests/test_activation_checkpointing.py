"""Activation checkpointing none | full | selective (moetrain/model/transformer.py, MoELayer.recompute_experts).

- The three modes give the same loss, parameter gradients and routing counts (a tiny model with a dense block, an
  MoE block with a shared expert and router losses).
- Communication: full repeats each MoE layer's dispatch and combine in backward, selective does not; the expert
  computation is recomputed under both (one process, counting calls on the LocalDispatcher, and 2 gloo ranks with
  ep=2, counting the all-to-all dispatcher's dispatch_comm/combine_comm).
- The bytes autograd saves during forward are ordered full < selective < none.
- 20 training steps through moetrain-train with selective follow the none run.
"""

import pytest
import torch
import torch.nn.functional as Fn

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.model.transformer import ACTIVATION_CHECKPOINTING, TransformerLM
from tests.distributed import run_distributed
from tests.train_utils import SavedTensorBytes, losses, overrides, read_metrics

MODES = ACTIVATION_CHECKPOINTING  # none, full, selective

TINY = ["model.dim=16", "model.n_layers=3", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=32",
        "model.num_experts=4", "model.moe_hidden=32", "model.first_k_dense=1", "model.num_shared_experts=1",
        "router.top_k=2", "router.aux_loss_coeff=0.01", "router.z_loss_coeff=0.001"]


def tiny_cfg(*extra):
    return compose_config([*TINY, *extra])


def batch(B=2, S=12, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, S), generator=g), torch.randint(0, 256, (B, S), generator=g)


def count_calls(obj, name: str, counter: dict, key: str) -> None:
    """Wrap the bound method `obj.name` so each call adds one to counter[key]."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        counter[key] = counter.get(key, 0) + 1
        return original(*args, **kwargs)
    setattr(obj, name, wrapped)


def instrument(model) -> dict:
    counter = {}
    for moe in model.moe_layers():
        count_calls(moe.dispatcher, "dispatch_comm", counter, "dispatch")
        count_calls(moe.dispatcher, "combine_comm", counter, "combine")
        count_calls(moe.experts, "compute", counter, "experts")
    return counter


def step(model, counter, inputs_BS, targets_BS):
    """Forward + backward; (loss, grads, routing counts, calls in forward, calls in backward)."""
    model.zero_grad(set_to_none=True)
    counter.clear()
    logits, records = model(inputs_BS, return_records=True)
    loss = Fn.cross_entropy(logits.flatten(0, 1), targets_BS.flatten()) + sum(r.loss for r in records)
    forward_calls = dict(counter)
    counter.clear()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, [r.tokens_per_expert_E for r in records], forward_calls, dict(counter)


def assert_same(results: dict, rtol=1e-5, atol=1e-7):
    loss0, grads0, counts0 = results["none"][:3]
    for mode in results.keys() - {"none"}:
        loss, grads, counts = results[mode][:3]
        torch.testing.assert_close(loss, loss0, rtol=rtol, atol=atol)
        assert grads.keys() == grads0.keys()
        for name in grads0:
            torch.testing.assert_close(grads[name], grads0[name], rtol=rtol, atol=atol,
                                       msg=lambda m: f"{mode} {name}: {m}")
        assert all(torch.equal(a, b) for a, b in zip(counts, counts0))  # each token counted once


# ----------------------------------------------------------------------------------------------- one process
def test_modes_agree_and_selective_repeats_no_communication():
    cfg = tiny_cfg()
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(0)
    assert model.activation_checkpointing == "none"
    counter = instrument(model)
    inputs_BS, targets_BS = batch()
    results = {}
    for mode in MODES:
        model.activation_checkpointing = mode
        assert [m.recompute_experts for m in model.moe_layers()] == [mode == "selective"] * 2
        results[mode] = step(model, counter, inputs_BS, targets_BS)
    assert_same(results)
    assert len(results["none"][1]) == len(list(model.parameters()))  # every parameter got a gradient
    moe = 2  # MoE layers (layers 1 and 2)
    for mode in MODES:
        assert results[mode][3] == {"dispatch": moe, "combine": moe, "experts": moe}, mode  # forward
    assert results["none"][4] == {}
    assert results["full"][4] == {"dispatch": moe, "combine": moe, "experts": moe}  # the whole block again
    assert results["selective"][4] == {"experts": moe}  # only the experts again

    # A fresh model built with the mode gives the same; booleans (the former setting) are refused.
    sel = TransformerLM(cfg.model, cfg.router, activation_checkpointing="selective")
    sel.init_weights(0)
    assert_same({"none": results["none"], "selective": step(sel, {}, inputs_BS, targets_BS)})
    for bad in (True, False, "on", ""):
        with pytest.raises(ValueError, match="use none, full or selective"):
            TransformerLM(cfg.model, cfg.router, activation_checkpointing=bad)


def test_no_grad_forward_checkpoints_nothing():
    cfg = tiny_cfg()
    model = TransformerLM(cfg.model, cfg.router, activation_checkpointing="selective")
    model.init_weights(0)
    counter = instrument(model)
    inputs_BS, _ = batch()
    with torch.no_grad():
        out = model(inputs_BS)
    model.activation_checkpointing = "none"
    with torch.no_grad():
        torch.testing.assert_close(out, model(inputs_BS))
    assert counter["experts"] == 4


def saved_bytes(model, inputs_BS, targets_BS) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward and loss (parameters
    excluded), the checkpoints' kept inputs included."""
    with SavedTensorBytes(model.parameters()) as saved:
        logits, records = model(inputs_BS, return_records=True)
        Fn.cross_entropy(logits.flatten(0, 1), targets_BS.flatten()) + sum(r.loss for r in records)
    return saved.total


def test_saved_bytes_are_ordered_full_selective_none(capsys):
    cfg = tiny_cfg("model.dim=32", "model.moe_hidden=128", "model.ffn_hidden=128", "model.max_seq_len=64")
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(0)
    inputs_BS, targets_BS = batch(4, 64)
    got = {}
    for mode in MODES:
        model.activation_checkpointing = mode
        got[mode] = saved_bytes(model, inputs_BS, targets_BS)
    with capsys.disabled():
        print("\nsaved bytes per forward: " + ", ".join(f"{m} {b:,d}" for m, b in got.items()))
    assert got["full"] < got["selective"] < got["none"]


# ------------------------------------------------------------------------------------------------ 2 gloo ranks
def _ep_body(rank, world_size):
    from moetrain.parallel.mesh import ParallelContext, build_groups
    from moetrain.parallel.moe_layer import moe_layer_factory

    ctx = build_groups(ParallelContext(ep=2))
    cfg = tiny_cfg()
    model = TransformerLM(cfg.model, cfg.router, moe_layer_factory(cfg.router, ctx.ep_group, ctx.world_group))
    model.init_weights(0)
    counter = instrument(model)
    inputs_BS, targets_BS = batch(seed=rank)
    results = {}
    for mode in MODES:
        model.activation_checkpointing = mode
        results[mode] = step(model, counter, inputs_BS, targets_BS)
    assert_same(results)
    return {mode: (r[3], r[4]) for mode, r in results.items()}


def test_ep2_selective_repeats_no_all_to_all():
    for calls in run_distributed(_ep_body, 2):
        once = {"dispatch": 2, "combine": 2, "experts": 2}
        assert all(calls[mode][0] == once for mode in MODES), calls
        assert calls["none"][1] == {} and calls["full"][1] == once and calls["selective"][1] == {"experts": 2}, calls


# --------------------------------------------------------------------------------------------------- training
def test_selective_training_follows_the_none_curve(tmp_path):
    runs = {}
    for mode in ("none", "selective"):
        runs[mode] = tmp_path / mode
        args = overrides(runs[mode], tmp_path / "cache", "trainer.max_steps=20", "model.first_k_dense=1",
                         "model.n_layers=3", f"trainer.activation_checkpointing={mode}")
        assert train_main(args) == 0
    ref, got = losses(runs["none"]), losses(runs["selective"])
    assert sorted(got) == list(range(1, 21))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-5, abs=1e-6), (s, got[s], ref[s])
    for a, b in zip(read_metrics(runs["none"]), read_metrics(runs["selective"])):
        for key in ("moe/layer1/tokens_per_expert", "moe/layer2/tokens_per_expert"):
            assert b.get(key) == a.get(key), key


def test_a_boolean_is_refused_with_the_new_values(tmp_path, capsys):
    for value in ("true", "false"):
        assert train_main([f"trainer.run_dir={tmp_path / 'run'}", f"trainer.activation_checkpointing={value}"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "trainer.activation_checkpointing" in err and "none, full or selective" in err
