"""Dense-to-MoE upcycling: at step 0 (normalised top-k gates, no noise, no shared experts) the MoE's logits are the
dense model's, whole-FFN copies and fine-grained splits alike, from a moetrain run or a Hugging Face Llama / Qwen3;
noise makes copies differ; bad requests are one line with nothing written; the result trains with moetrain-train."""

import pytest
import torch

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.interop import ConvertError
from moetrain.interop.run_dir import load_run_model, write_run_dir
from moetrain.interop.upcycle import upcycle
from moetrain.model.transformer import TransformerLM

DENSE = ["data.seq_len=32", "model.dim=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden=48", "model.num_experts=0", "model.max_seq_len=64", "model.init_std=0.1"]
TOKENS = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    cfg = compose_config(DENSE)
    model = TransformerLM(cfg.model, cfg.router)
    model.init_weights(0)
    out = tmp_path_factory.mktemp("dense") / "run"
    write_run_dir(out, cfg, model)
    return out


@pytest.fixture(scope="module")
def dense_logits(dense_run):
    _, model = load_run_model(dense_run)
    with torch.no_grad():
        return model(TOKENS)


def _logits(run, tokens=TOKENS):
    cfg, model = load_run_model(run)
    with torch.no_grad():
        return cfg, model(tokens)


@pytest.mark.parametrize("num_experts,split,overrides", [
    (4, 1, []),
    (8, 2, []),
    (6, 3, ["router.score_func=sigmoid"]),
    (8, 4, ["router.top_k=4"]),  # one copy of the 4 segments
    (4, 2, ["model.first_k_dense=1"]),  # layer 0 stays dense
])
def test_upcycled_moe_reproduces_the_dense_logits(dense_run, dense_logits, tmp_path, num_experts, split, overrides):
    upcycle(dense_run, tmp_path / "moe", num_experts, split=split, overrides=overrides)
    cfg, logits = _logits(tmp_path / "moe")
    m = cfg.model
    assert (m.num_experts, m.moe_hidden, m.num_shared_experts) == (num_experts, 48 // split, 0)
    assert cfg.router.route_scale == split and cfg.router.top_k % split == 0 and cfg.router.norm_topk_prob
    assert (logits - dense_logits).abs().max().item() <= 1e-5


def test_the_equivalence_is_not_vacuous(dense_run, dense_logits, tmp_path):
    """Noise, or untied router rows under a split, do change the logits (the check above can fail)."""
    upcycle(dense_run, tmp_path / "noisy", 4, noise_std=0.05, seed=1)
    _, noisy = _logits(tmp_path / "noisy")
    assert (noisy - dense_logits).abs().max().item() > 1e-3
    cfg, model = load_run_model(tmp_path / "noisy")
    w1 = model.layers[0].ffn.experts.w1_EDF
    assert not torch.equal(w1[0], w1[1])
    upcycle(dense_run, tmp_path / "split", 8, split=2)
    cfg, model = load_run_model(tmp_path / "split")
    gate = model.layers[1].ffn.router.gate.weight
    assert torch.equal(gate[0], gate[1]) and not torch.equal(gate[1], gate[2])  # rows tied per copy
    with torch.no_grad():
        gate.copy_(torch.randn(gate.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
        assert (model(TOKENS) - dense_logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_upcycling_a_hugging_face_dense_model(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if family == "llama":
        hf_cfg = transformers.LlamaConfig(**common)
        hf = transformers.LlamaForCausalLM(hf_cfg)
    else:
        hf_cfg = transformers.Qwen3Config(**common, head_dim=12)
        hf = transformers.Qwen3ForCausalLM(hf_cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.eval().save_pretrained(tmp_path / "hf")
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    upcycle(tmp_path / "hf", tmp_path / "moe", 8, split=4, overrides=["data.seq_len=32"])
    cfg, got = _logits(tmp_path / "moe", tokens)
    assert cfg.model.num_experts == 8 and cfg.model.moe_hidden == 10 and cfg.model.vocab_size == 300
    assert (got - want).abs().max().item() <= 1e-4


def test_bad_requests_are_one_line_and_write_nothing(dense_run, tmp_path):
    moe_src = tmp_path / "moe-src"
    upcycle(dense_run, moe_src, 4)
    cases = [
        (dict(src=dense_run, num_experts=6, split=4), "--num-experts 6 must be a positive multiple of --split 4"),
        (dict(src=dense_run, num_experts=10, split=5), "--split 5 does not divide the dense FFN's hidden size"),
        (dict(src=dense_run, num_experts=4, noise_std=-1.0), "--noise -1.0 must be >= 0"),
        (dict(src=moe_src, num_experts=4), "is already an MoE"),
        (dict(src=tmp_path / "nothing", num_experts=4), "is not a directory"),
        (dict(src=tmp_path, num_experts=4), "is neither a moetrain run directory"),
        (dict(src=dense_run, num_experts=4, overrides=["model.dim=64"]), "the dense model has no tensor"),
    ]
    for kwargs, needle in cases:
        src = kwargs.pop("src")
        with pytest.raises(ConvertError) as info:
            upcycle(src, tmp_path / "out", **kwargs)
        assert needle in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConvertError, match="already holds a checkpoint"):
        upcycle(dense_run, moe_src, 4)


def test_the_upcycled_run_trains(dense_run, tmp_path):
    out = tmp_path / "moe"
    upcycle(dense_run, out, 4, split=2, overrides=[f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
                                                  "data.global_batch_size=4", "data.micro_batch_size=2",
                                                  "data.max_corpus_bytes=200000", "trainer.log_every=1",
                                                  "trainer.eval_every=0", "trainer.eval_batches=1",
                                                  "trainer.progress=false", "logger.console=false"])
    assert train_main(["-cd", str(out), "-cn", "config", "trainer.max_steps=4"]) == 0
    cfg, model = load_run_model(out)
    assert cfg.model.num_experts == 4 and (out / "checkpoints" / "step_00000004").is_dir()
