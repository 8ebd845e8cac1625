"""moetrain-compress: calibration (one process and ep=2 agree), every method on a tiny model, the exact cases
(merging identical experts, pruning never-used experts), per-layer expert counts through training under ep=2, and
the one-line errors."""

import copy

import pytest
import torch

from moetrain.cli import train_main
from moetrain.compress.calibration import LayerStats, calibrate
from moetrain.compress.cli import main as compress_main
from moetrain.compress.experts import routed_output
from moetrain.compress.methods import METHODS
from moetrain.compress.writer import compress_model, layer_experts, write_compressed
from moetrain.config.compose import compose_config
from moetrain.config.validate import ConfigError, validate
from moetrain.interop.run_dir import load_run_model, write_run_dir
from moetrain.model.transformer import TransformerLM, count_parameters
from tests.distributed import run_distributed
from tests.train_utils import losses, overrides, read_metrics

# 3 layers, the last two MoE with 4 experts each
TINY = ["model.n_layers=3", "model.first_k_dense=1"]


def _cfg(tmp, *extra):
    return compose_config(overrides(tmp / "run", tmp / "cache", *TINY, *extra))


def _model(cfg, seed=3):
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(seed)
    return model.eval()


def _batches(n=4, B=2, S=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (B, S), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(cfg, model, stats) of the tiny model calibrated on 4 random batches (shared by the method tests)."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = _cfg(tmp)
    model = _model(cfg)
    return cfg, model, calibrate(model, _batches())


# ---- calibration ------------------------------------------------------------------------------------------------
def test_calibration_statistics_match_a_direct_computation(tiny):
    cfg, model, stats = tiny
    assert [s.layer_id for s in stats] == [1, 2]
    s = stats[0]
    assert s.num_tokens == 4 * 2 * 16
    assert float(s.freq_E.sum()) == s.num_tokens * cfg.router.top_k
    assert float(s.mass_E.sum()) == pytest.approx(s.num_tokens)
    # the statistics of layer 1 from its input, computed by hand
    layer = model.layers[1].ffn
    x_ND = s.inputs_ND
    ex = layer_experts(layer)
    y_END = ex.outputs(x_ND).double()
    gram = torch.einsum("end,fnd->ef", y_END, y_END)
    torch.testing.assert_close(s.out_gram_EE, gram, rtol=1e-6, atol=1e-9)
    logits = (x_ND.double() @ ex.gate_ED.double().t())
    torch.testing.assert_close(s.logit_gram_EE, logits.t() @ logits, rtol=1e-6, atol=1e-9)
    assert torch.allclose(s.out_sim_EE.diagonal(), torch.ones(4, dtype=torch.float64))


def _calibrate_ep2(rank, world_size, args, state, batches):
    from moetrain.parallel.mesh import ParallelContext, build_groups
    from moetrain.parallel.moe_layer import moe_layer_factory

    cfg = compose_config(args)
    ctx = build_groups(ParallelContext(ep=2))
    model = TransformerLM(cfg.model, cfg.router, moe_layer_factory(cfg.router, ctx.ep_group, ctx.world_group))
    own = model.state_dict()
    for name, t in own.items():  # this rank's experts: rows expert_ids of the full tensors
        full = state[name]
        if t.shape != full.shape:
            ids = model.get_parameter(name).expert_ids
            full = full[ids]
        own[name] = full
    model.load_state_dict(own)
    mine = batches[rank::2]  # each rank its own tokens
    return [(s.num_tokens, s.freq_E, s.mass_E, s.logit_gram_EE, s.out_gram_EE) for s in
            calibrate(model, mine, world_group=ctx.world_group)]


def test_calibration_under_ep2_equals_one_process(tmp_path, tiny):
    cfg, model, _ = tiny
    args = overrides(tmp_path / "run", tmp_path / "cache", *TINY)
    batches = _batches(4)
    one = calibrate(model, batches)
    per_rank = run_distributed(_calibrate_ep2, 2, args, model.state_dict(), batches)
    for got in per_rank:
        for s, (tokens, freq, mass, lgram, ogram) in zip(one, got):
            assert tokens == s.num_tokens
            torch.testing.assert_close(freq, s.freq_E)
            torch.testing.assert_close(mass, s.mass_E)
            torch.testing.assert_close(lgram, s.logit_gram_EE)
            torch.testing.assert_close(ogram, s.out_gram_EE)


# ---- methods ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_compresses_each_layer_to_its_count(tiny, method):
    cfg, model, stats = tiny
    c = compress_model(cfg, model, stats, method, [3, 2], seed=1)
    assert c.cfg.model.experts_per_layer == [3, 2] and c.cfg.model.num_experts == 3
    assert [m.num_experts for m in c.model.moe_layers()] == [3, 2]
    validate(c.cfg, 1)
    logits = c.model(_batches(1)[0])
    assert torch.isfinite(logits).all()
    layers = c.report["layers"]
    assert [len(layer["sources"]) for layer in layers] == [3, 2]
    if method in ("merge",):  # every original expert goes into exactly one merged expert
        for layer in layers:
            assert sorted(e for group in layer["sources"] for e in group) == [0, 1, 2, 3]
    # the non-expert weights are copied unchanged
    torch.testing.assert_close(c.model.layers[0].attn.wq.weight, model.layers[0].attn.wq.weight, rtol=0, atol=0)
    assert c.report["expert_bytes_after"] == c.report["expert_bytes_before"] * 5 // 8
    counts = count_parameters(c.cfg.model, c.cfg.router)
    assert counts["total"] == sum(p.numel() for p in c.model.parameters())


def test_keeping_every_expert_changes_nothing(tiny):
    cfg, model, stats = tiny
    tokens = _batches(1)[0]
    for method in ("frequency", "reconstruction", "merge", "dern"):
        c = compress_model(cfg, model, stats, method, [4, 4])
        torch.testing.assert_close(c.model(tokens), model(tokens), rtol=0, atol=0)


def test_merging_two_identical_experts_gives_the_same_output(tmp_path):
    """Expert 1 is expert 0 with its hidden neurons permuted and the same router row: the neuron matching undoes the
    permutation, so the merged expert has exactly expert 0's weights; with top-1 sigmoid routing (each expert's
    score independent of the others') the layer output is the same as before: a token routed to either expert now
    goes to the merged one, with the same gate."""
    cfg = _cfg(tmp_path, "router.top_k=1", "router.score_func=sigmoid")
    model = _model(cfg)
    layer = model.layers[1].ffn
    perm = torch.randperm(layer.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ex = layer.experts
        ex.w1_EDF[1], ex.w3_EDF[1], ex.w2_EFD[1] = ex.w1_EDF[0][:, perm], ex.w3_EDF[0][:, perm], ex.w2_EFD[0][perm]
        layer.router.gate.weight[1] = layer.router.gate.weight[0]
    stats = calibrate(model, _batches())
    s = stats[0]
    s.freq_E.copy_(torch.tensor([30.0, 10.0, 20.0, 20.0]))  # expert 1 the least used: it joins expert 0's group
    c = compress_model(cfg, model, stats, "merge", [3, 4])
    assert c.report["layers"][0]["sources"][0] == [0, 1]
    merged = c.model.layers[1].ffn.experts
    for new, old in ((merged.w1_EDF, ex.w1_EDF), (merged.w3_EDF, ex.w3_EDF), (merged.w2_EFD, ex.w2_EFD)):
        assert torch.equal(new[0], old[0])
    x_ND = s.inputs_ND
    torch.testing.assert_close(routed_output(layer_experts(c.model.layers[1].ffn), x_ND, cfg.router),
                               routed_output(layer_experts(layer), x_ND, cfg.router), rtol=1e-6, atol=1e-6)


def test_pruning_never_used_experts_leaves_the_output_unchanged(tmp_path):
    """Experts 2 and 3 of the first MoE layer are never selected (a very low selection bias, which never scales a
    gate): frequency pruning drops exactly them and the model's output on the calibration tokens is unchanged (the
    top-k gates are renormalised over the chosen experts, so the survivors' softmax rescaling cancels)."""
    cfg = _cfg(tmp_path)
    model = _model(cfg)
    with torch.no_grad():
        model.layers[1].ffn.router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, -1e4, -1e4]))
    batches = _batches()
    stats = calibrate(model, batches)
    assert stats[0].freq_E[2:].sum() == 0
    c = compress_model(cfg, model, stats, "frequency", [2, 4])
    assert c.report["layers"][0]["sources"] == [[0], [1]]
    for tokens in batches:
        torch.testing.assert_close(c.model(tokens), model(tokens), rtol=1e-5, atol=1e-5)


# ---- the compressed run directory ---------------------------------------------------------------------------------
def _train_body(rank, world_size, args):
    return train_main(args)


def test_compressed_run_trains_under_ep2_and_loads(tmp_path, tiny):
    """Per-layer counts (4 and 2 experts) through moetrain-train on 2 gloo ranks with parallel.ep=2 (each rank half of
    each layer's experts), then loaded whole in one process."""
    cfg, model, stats = tiny
    out = tmp_path / "compressed"
    write_compressed(out, compress_model(cfg, model, stats, "dern", [4, 2]), "test")
    args = ["-cd", str(out), "-cn", "config", "trainer.max_steps=2", "parallel.ep=2", "trainer.checkpoint_every=0",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert run_distributed(_train_body, 2, args) == [0, 0]
    assert sorted(losses(out)) == [1, 2]
    last = read_metrics(out)[-1]  # routing telemetry: each layer's own number of experts
    assert len(last["moe/layer1/tokens_per_expert"]) == 4 and len(last["moe/layer2/tokens_per_expert"]) == 2
    cfg2, loaded = load_run_model(out)
    assert cfg2.model.experts_per_layer == [4, 2]
    assert [m.num_experts for m in loaded.moe_layers()] == [4, 2]


def test_memory_plan_counts_each_layers_experts(tiny):
    from moetrain.train.memory_plan import plan_memory

    cfg, _, _ = tiny
    c = copy.deepcopy(cfg)
    c.model.experts_per_layer, c.model.num_experts, c.parallel.ep = [4, 2], 4, 2
    plan = plan_memory(c, 2)
    D, F = c.model.dim, c.model.moe_hidden
    assert plan.parameters.expert == 4 * (4 // 2 + 2 // 2) * 3 * D * F  # fp32, each rank half of each layer


def test_per_layer_counts_that_do_not_split_over_ep_are_one_line(tiny):
    cfg, _, _ = tiny
    bad = copy.deepcopy(cfg)
    bad.model.experts_per_layer, bad.model.num_experts = [4, 3], 4
    bad.parallel.ep = 2
    with pytest.raises(ConfigError, match=r"experts_per_layer=\[4, 3\].*parallel.ep=2") as e:
        validate(bad, 2)
    assert "\n" not in str(e.value)
    bad.parallel.ep, bad.model.experts_per_layer = 1, [4]
    with pytest.raises(ConfigError, match="one expert count per MoE layer"):
        validate(bad, 1)


# ---- command line -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny):
    cfg, model, _ = tiny
    run = tmp_path_factory.mktemp("saved") / "run"
    cfg = copy.deepcopy(cfg)
    cfg.data.max_corpus_bytes = 300000
    write_run_dir(run, cfg, model)
    return run


def test_cli_writes_a_run_directory(tmp_path, saved_run, capsys):
    out = tmp_path / "out"
    assert compress_main([str(saved_run), "--method", "merge", "--keep", "0.5", "--out", str(out),
                          "--tokens", "256"]) == 0
    assert "kept [2, 2] of [4, 4]" in capsys.readouterr().out
    cfg, model = load_run_model(out)
    assert cfg.model.num_experts == 2 and cfg.model.experts_per_layer is None
    assert (out / "compression.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--keep", "0"], "--keep 0 keeps no expert"),
    (["--keep", "0.0"], "--keep 0.0 is not a fraction in (0, 1]"),
    (["--keep", "5"], "--keep 5 asks for 5 experts but MoE layer 0 has 4"),
    (["--keep", "1.5"], "is not a fraction in (0, 1]"),
    (["--keep", "1"], "fewer than router.top_k=2"),
    (["--keep", "2", "data.tokenizer=/some/tokenizer.json"], "differs from the run's data.tokenizer=bytes"),
    (["--keep", "2", "trainer.max_steps=3"], "only data.KEY=VALUE overrides"),
])
def test_cli_bad_input_is_one_line(tmp_path, saved_run, capsys, argv, message):
    out = tmp_path / "out"
    assert compress_main([str(saved_run), "--method", "frequency", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetrain-compress: error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_run_without_checkpoint_and_foreign_shards_are_one_line(tmp_path, saved_run, capsys):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.yaml").write_text((saved_run / "config.yaml").read_text())
    assert compress_main([str(empty), "--method", "frequency", "--keep", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds no valid checkpoint" in err and err.count("\n") == 1
    # shards written with another tokenizer (their meta.json names it) are refused by the run's tokenizer
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text('{"format": 1, "vocab_size": 1000, "dtype": "uint16", "tokenizer": '
                                      '"hf:0123456789ab:1000", "train_tokens": 0, "val_tokens": 0}')
    assert compress_main([str(saved_run), "--method", "frequency", "--keep", "2", "--out", str(tmp_path / "o"),
                          "data.name=shards", f"data.path={shards}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetrain-compress: error: ") and "were tokenized with hf:0123456789ab:1000" in err
    assert err.count("\n") == 1


def test_hf_export_refuses_differing_per_layer_counts(tmp_path, tiny):
    from moetrain.interop import ConvertError
    from moetrain.interop.hf import export_hf

    cfg, model, stats = tiny
    out = tmp_path / "c"
    write_compressed(out, compress_model(cfg, model, stats, "frequency", [4, 2]), "test")
    with pytest.raises(ConvertError, match=r"experts_per_layer=\[4, 2\].*one expert count for all layers"):
        export_hf(out, tmp_path / "hf")


def test_layer_stats_similarity_is_cosine():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=torch.float64)
    s = LayerStats(0, 1, torch.zeros(2), torch.zeros(2), g, g, torch.zeros(0, 2))
    torch.testing.assert_close(s.logit_sim_EE, torch.tensor([[1.0, 1 / 3], [1 / 3, 1.0]], dtype=torch.float64))


def test_reconstruction_greedy_is_never_better_than_enumeration(tiny, monkeypatch):
    """Both search the same objective; enumeration is exhaustive, so the greedy subset's layer-output error is at
    least the enumerated one's."""
    from moetrain.compress.methods import LayerJob
    from moetrain.compress.methods import reconstruction as rec

    cfg, model, stats = tiny
    layer = model.layers[1].ffn
    job = LayerJob(1, layer_experts(layer), stats[0], 2, cfg.router)
    x_ND = stats[0].inputs_ND
    full = routed_output(job.experts, x_ND, cfg.router)

    def err(result):
        return float(((routed_output(result.experts, x_ND, cfg.router) - full) ** 2).sum())

    best = rec.reconstruction(job)
    monkeypatch.setattr(rec, "ENUMERATE_LIMIT", 0)
    greedy = rec.reconstruction(job)
    assert len(greedy.sources) == 2
    assert err(greedy) >= err(best) - 1e-9
