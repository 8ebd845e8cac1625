"""Hugging Face import/export (moetrain.interop.hf, moetrain-convert): tiny random transformers models of each
supported architecture (several layers, unusual sizes, random norm weights and biases so that every permutation is
exercised) against transformers' own forward; bit-exact round trips; the import under expert parallelism on 2 gloo
ranks; refusals; the command line; training that continues from an import."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moetrain.interop import ConvertError  # noqa: E402
from moetrain.interop.cli import main as convert_main  # noqa: E402
from moetrain.interop.hf import (FAMILIES, export_hf, hf_config_to_moetrain, import_hf, load_hf_model,  # noqa: E402
                                 read_hf_state)
from moetrain.interop.run_dir import load_run_model  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.train_utils import losses  # noqa: E402

V = 263  # >= 256 (the byte corpus), and not a round number
DATA = ["data.seq_len=32", "data.global_batch_size=8", "data.micro_batch_size=4", "data.max_corpus_bytes=300000"]


def _configs() -> dict:
    T = transformers
    common = dict(vocab_size=V, max_position_embeddings=256, tie_word_embeddings=False)
    return {
        "mixtral": T.MixtralConfig(hidden_size=40, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                                   rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, **common),
        "qwen2_moe": T.Qwen2MoeConfig(hidden_size=48, intermediate_size=36, moe_intermediate_size=20,
                                      shared_expert_intermediate_size=28, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=6, num_experts_per_tok=3,
                                      decoder_sparse_step=2, norm_topk_prob=False, **common),
        "qwen3_moe": T.Qwen3MoeConfig(hidden_size=40, intermediate_size=36, moe_intermediate_size=20, head_dim=12,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True,
                                      **common),
        "olmoe": T.OlmoeConfig(hidden_size=40, intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, clip_qkv=0.08,
                               norm_topk_prob=False, **common),
        "deepseek_v3": T.DeepseekV3Config(
            hidden_size=48, intermediate_size=36, moe_intermediate_size=20, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
            qk_rope_head_dim=6, v_head_dim=10, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
            first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=2.5,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
                             "mscale": 1.0, "mscale_all_dim": 1.0}, **common),
        # q projected directly, rope in halves (rope_interleave=false): the rope rows are permuted
        "deepseek_v3_halves": T.DeepseekV3Config(
            hidden_size=32, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=10, qk_nope_head_dim=6,
            qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            first_k_dense_replace=0, n_shared_experts=1, rope_interleave=False, norm_topk_prob=False,
            routed_scaling_factor=1.5, **common),
        "llama": T.LlamaConfig(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, **common),
        "qwen2": T.Qwen2Config(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, **common),
        "qwen3": T.Qwen3Config(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=12, **common),
    }


ARCHS = list(_configs())
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@torch.no_grad()
def _randomize(model) -> None:
    """Norm weights, biases and the DeepSeek selection bias away from their constant initial values."""
    g = torch.Generator().manual_seed(1)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "norm" in name or name.endswith(".bias"):
            t.copy_(0.5 + torch.rand(t.shape, generator=g))
        elif name.endswith("e_score_correction_bias"):
            t.copy_(0.1 * torch.randn(t.shape, generator=g))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory written by save_pretrained, transformers model in eval mode)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, config in _configs().items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        _randomize(model)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


TOKENS = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _hf_logits(model) -> torch.Tensor:
    return model(TOKENS).logits.float()


@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_logits_match_transformers(hf_models, name):
    src, hf = hf_models[name]
    cfg, ours = load_hf_model(src, DATA)
    if name in MOE_ARCHS:
        assert cfg.model.num_experts > 0
    diff = (ours(TOKENS) - _hf_logits(hf)).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
@torch.no_grad()
def test_fused_expert_layout_imports(hf_models, tmp_path, name):
    """transformers 5 holds experts fused (gate_up_proj (E, 2F, D), down_proj (E, D, F)); a file of that layout
    imports as well as the hub's per-expert one."""
    from safetensors.torch import save_file

    src, hf = hf_models[name]
    fused = tmp_path / "fused"
    fused.mkdir()
    shutil.copy(src / "config.json", fused / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(fused / "model.safetensors"))
    _, ours = load_hf_model(fused, DATA)
    assert (ours(TOKENS) - _hf_logits(hf)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ARCHS)
@torch.no_grad()
def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_models, tmp_path, name):
    """HF -> moetrain run -> HF (sharded) -> moetrain: identical state dicts; the exported directory loads with
    AutoModelForCausalLM.from_pretrained and computes the original logits."""
    src, hf = hf_models[name]
    import_hf(src, tmp_path / "run", DATA)
    cfg, first = load_run_model(tmp_path / "run")
    files = export_hf(tmp_path / "run", tmp_path / "hf", max_shard_size="40KB")
    assert any(f.name == "model.safetensors.index.json" for f in files)
    _, second = load_hf_model(tmp_path / "hf", DATA)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (_hf_logits(back) - _hf_logits(hf)).abs().max().item() <= 1e-5
    assert (first(TOKENS) - _hf_logits(back)).abs().max().item() <= 1e-4
    if name in MOE_ARCHS:  # transformers' greedy decoding of the export = moetrain-generate's (KV cache) of the run
        from moetrain.generate import SamplingConfig, generate_ids

        prompt = TOKENS[0, :5]
        theirs = back.generate(prompt[None], max_new_tokens=10, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 5:].tolist()
        assert generate_ids(first, prompt.tolist(), SamplingConfig(max_new_tokens=10, greedy=True)) == theirs


def _ep_body(rank, world, sources, out):
    """Each architecture built under parallel.ep=2 from its checkpoint; the keys each rank read."""
    from moetrain.interop.hf import io

    read = []
    get, get_row = io.HFCheckpoint.get, io.HFCheckpoint.get_row
    io.HFCheckpoint.get = lambda self, key: read.append(key) or get(self, key)
    io.HFCheckpoint.get_row = lambda self, key, row: read.append(f"{key}[{row}]") or get_row(self, key, row)
    results = {}
    for name, src in sources.items():
        read.clear()
        cfg, model = load_hf_model(src, DATA + ["parallel.ep=2"])
        held = {m.layer_id: list(m.experts.expert_ids) for m in model.moe_layers()}
        with torch.no_grad():
            results[name] = (model(TOKENS), held, list(read))
    read.clear()
    cfg, model = load_hf_model(sources["mixtral"], DATA + ["parallel.mode=fssdp"])  # experts owned, not split
    with torch.no_grad():
        results["fssdp"] = (model(TOKENS), {m.layer_id: list(m.experts.expert_ids) for m in model.moe_layers()},
                            list(read))
    import_hf(sources["mixtral"], out, DATA + ["parallel.ep=2"])  # the collective write
    return results


def test_import_under_expert_parallelism(hf_models, tmp_path):
    """parallel.ep=2 on 2 gloo ranks: each rank holds (and reads) only its half of the experts (more than one per
    rank), and the layer-parallel model computes transformers' logits; likewise under parallel.mode=fssdp (each rank
    owning its experts); the run directory written collectively loads in one process with the same weights."""
    sources = {name: hf_models[name][0] for name in MOE_ARCHS}
    results = run_distributed(_ep_body, 2, sources, tmp_path / "run")
    for name in MOE_ARCHS:
        ref = _hf_logits(hf_models[name][1])
        E = FAMILIES[name].to_moetrain(json.loads((sources[name] / "config.json").read_text()))[0]["num_experts"]
        for rank, per_rank in enumerate(results):
            logits, held, read = per_rank[name]
            assert (logits - ref).abs().max().item() <= 1e-4, (name, rank)
            for ids in held.values():
                assert ids == list(range(rank * E // 2, (rank + 1) * E // 2)) and len(ids) > 1
            experts_read = {int(k.split(".experts.")[1].split(".")[0]) for k in read if ".experts." in k}
            assert experts_read == set(held[next(iter(held))]), (name, rank, experts_read)
    for rank, per_rank in enumerate(results):  # FSSDP: each rank owns (and reads) its experts too
        logits, held, read = per_rank["fssdp"]
        assert (logits - _hf_logits(hf_models["mixtral"][1])).abs().max().item() <= 1e-4
        owned = set(held[0])
        assert len(owned) == 3 and {int(k.split(".experts.")[1].split(".")[0]) for k in read if ".experts." in k} \
            == owned
    _, single = load_hf_model(sources["mixtral"], DATA)
    _, written = load_run_model(tmp_path / "run")
    for key, value in single.state_dict().items():
        assert torch.equal(value, written.state_dict()[key]), key


# ---------------------------------------------------------------------------------------------------- refusals
def _edited(hf_models, tmp_path, name, **changes):
    """A copy of a saved model whose config.json has `changes` (None deletes a key)."""
    src = hf_models[name][0]
    dst = tmp_path / f"{name}_edited"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _refused(src, out, match):
    with pytest.raises(ConvertError, match=match) as err:
        import_hf(src, out, DATA)
    assert "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "model_type=\"gpt2\""),
    ({"hidden_act": "gelu"}, "hidden_act=\"gelu\""),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    ({"sliding_window": 64}, "sliding_window=64"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}}, "rope_type=\"dynamic\""),
    ({"intermediate_size": 30}, "shape"),
    ({"tie_word_embeddings": True}, "lm_head.weight differs"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quant_method=\"fp8\""),
])
def test_unsupported_settings_are_refused(hf_models, tmp_path, changes, match):
    _refused(_edited(hf_models, tmp_path, "mixtral", **changes), tmp_path / "out", match)


def test_unrepresentable_layer_patterns_are_refused(hf_models, tmp_path):
    src = _edited(hf_models, tmp_path, "qwen2_moe", decoder_sparse_step=1, mlp_only_layers=[2])
    _refused(src, tmp_path / "out", "MoE layers \\[0, 1, 3\\]")


def test_a_missing_shard_is_named(hf_models, tmp_path):
    import_hf(hf_models["mixtral"][0], tmp_path / "run", DATA)
    export_hf(tmp_path / "run", tmp_path / "hf", max_shard_size="40KB")
    victim = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
    victim.unlink()
    _refused(tmp_path / "hf", tmp_path / "out", f"lists shard {victim.name}, which is missing")


def test_an_existing_checkpoint_is_not_overwritten(hf_models, tmp_path):
    import_hf(hf_models["mixtral"][0], tmp_path / "run", DATA)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(ConvertError, match="already holds a checkpoint"):
        import_hf(hf_models["olmoe"][0], tmp_path / "run", DATA)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_export_refuses_what_the_format_cannot_hold(hf_models, tmp_path):
    """A trained (non-zero) balancing bias has no place in Mixtral; a model with dense layers is not a Mixtral;
    nothing is written."""
    import_hf(hf_models["mixtral"][0], tmp_path / "run", DATA)
    cfg, model = load_run_model(tmp_path / "run")
    family = FAMILIES["mixtral"]
    with torch.no_grad():
        model.layers[1].ffn.router.expert_bias_E[0] = 0.5
    from moetrain.interop.hf.convert import hf_tensors

    with pytest.raises(ConvertError, match="expert_bias_E is not zero"):
        next(hf_tensors(model, cfg, family))
    cfg.model.first_k_dense = 1
    with pytest.raises(ConvertError, match="every Mixtral layer is MoE"):
        family.to_hf(cfg)
    cfg.model.first_k_dense = 0
    cfg.router.score_func = "sigmoid"
    with pytest.raises(ConvertError, match="router.score_func=sigmoid"):
        family.to_hf(cfg)
    with pytest.raises(ConvertError, match="--arch gpt2"):
        export_hf(tmp_path / "run", tmp_path / "hf", arch="gpt2")
    assert not (tmp_path / "hf").exists()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # transformers' size-0 shared expert
@torch.no_grad()
def test_a_native_moetrain_model_exports(tmp_path):
    """A model trained from scratch with moetrain's defaults (a dense first layer, no shared experts, no q/k norms)
    exports as Qwen2-MoE with a zero-size shared expert; transformers computes its logits, and it imports back
    bit-exactly."""
    from moetrain.config.compose import compose_config
    from moetrain.interop.run_dir import write_run_dir
    from moetrain.model.transformer import TransformerLM

    cfg = compose_config(["model.dim=40", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
                          "model.ffn_hidden=56", "model.num_experts=4", "model.moe_hidden=24",
                          "model.first_k_dense=1", "model.vocab_size=263", *DATA])
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(3)
    write_run_dir(tmp_path / "run", cfg, model)
    export_hf(tmp_path / "run", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["shared_expert_intermediate_size"] == 0
    assert config["mlp_only_layers"] == [0] and config["qkv_bias"] is False
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (model(TOKENS) - _hf_logits(hf)).abs().max().item() <= 1e-4
    _, back = load_hf_model(tmp_path / "hf", DATA)
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_older_config_files_map_the_same(hf_models):
    """Hub files written before transformers 5 keep rope in `rope_theta` + `rope_scaling` (with "type") and Qwen3-MoE's
    expert count in `num_experts`; they map as the transformers 5 keys do."""
    for name in ("deepseek_v3", "qwen3_moe"):
        new = json.loads((hf_models[name][0] / "config.json").read_text())
        old = dict(new)
        params = dict(old.pop("rope_parameters"))
        old["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        old["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
        if "num_local_experts" in old:
            old["num_experts"] = old.pop("num_local_experts")
        assert hf_config_to_moetrain(old) == hf_config_to_moetrain(new)


def test_config_mapping_for_upcycling_and_reader(hf_models):
    """The API the upcycling uses: a dense config maps to num_experts=0; the reader lists and reads tensors."""
    src = hf_models["qwen3"][0]
    model, router = hf_config_to_moetrain(json.loads((src / "config.json").read_text()))
    assert model["num_experts"] == 0 and model["head_dim"] == 12 and model["qk_norm"] == "head"
    with read_hf_state(src) as ckpt:
        assert "model.embed_tokens.weight" in ckpt.keys()
        assert tuple(ckpt.get("model.embed_tokens.weight").shape) == (V, 40)


# ------------------------------------------------------------------------------------------ command line, training
def test_command_line(hf_models, tmp_path, capsys):
    src = hf_models["deepseek_v3"][0]
    assert convert_main([str(src), "--out", str(tmp_path / "run"), *DATA]) == 0
    assert convert_main([str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf"),
                         "--dtype", "bfloat16"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["dtype"] == "bfloat16"
    with read_hf_state(tmp_path / "hf") as ckpt:
        assert ckpt.get("lm_head.weight").dtype == torch.bfloat16
    step0 = tmp_path / "run" / "checkpoints" / "step_00000000"  # a checkpoint directory, or a run with --step
    assert convert_main([str(step0), "--to", "hf", "--out", str(tmp_path / "hf_ckpt")]) == 0
    assert convert_main([str(tmp_path / "run"), "--to", "hf", "--step", "0", "--out", str(tmp_path / "hf_step")]) == 0
    capsys.readouterr()
    (tmp_path / "empty").mkdir()
    bad = [[str(src), "--out", str(tmp_path / "run")],  # holds a checkpoint already
           [str(tmp_path / "run"), "--to", "hf", "--out", str(tmp_path / "hf2"), "model.dim=8"],
           [str(tmp_path / "run"), "--to", "hf", "--step", "7", "--out", str(tmp_path / "hf3")],
           [str(tmp_path / "empty"), "--out", str(tmp_path / "run2")],
           [str(src), "--out", str(tmp_path / "run3"), "--arch", "mixtral"]]
    assert [convert_main(args) for args in bad] == [2] * len(bad)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == len(bad) and all(line.startswith("moetrain-convert: error: ") for line in err), err
    assert not any((tmp_path / d).exists() for d in ("hf2", "hf3", "run2", "run3"))


def test_an_imported_model_continues_training(hf_models, tmp_path):
    """moetrain-train -cd OUT -cn config trains an imported Mixtral on the default byte corpus: finite, falling."""
    from moetrain.cli import train_main

    out = tmp_path / "run"
    import_hf(hf_models["mixtral"][0], out, DATA + [f"data.cache_dir={tmp_path / 'cache'}"])
    args = ["-cd", str(out), "-cn", "config", "trainer.max_steps=12", "optim.lr=1e-2", "optim.warmup_steps=2",
            "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=0", "trainer.progress=false",
            "logger.console=false"]
    assert train_main(args) == 0
    curve = losses(out)
    values = [curve[s] for s in sorted(curve)]
    assert all(math.isfinite(v) for v in values)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3 - 0.1, values
    # Mixtral has no selection bias, so the import trains without one and the trained run exports as Mixtral.
    export_hf(out, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"
