"""Generation: greedy decoding with the KV cache equals recomputing the whole sequence, top-p -> 0 is greedy, a seed
reproduces sampling, the nucleus is what is sampled from, and moetrain-generate prints text or one-line errors."""

import numpy as np
import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.schema import ModelConfig, RouterConfig
from moetrain.data.tokenizer import load_tokenizer
from moetrain.generate import GenerateError, SamplingConfig, generate_ids, main, next_token
from moetrain.interop.run_dir import write_run_dir
from moetrain.model.transformer import TransformerLM
from tests.tokenizer_utils import train_bpe

GQA = dict(vocab_size=300, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=24, ffn_hidden=48,
           num_experts=4, moe_hidden=24, first_k_dense=1, init_std=0.1)
MLA = dict(GQA, attention="mla", q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
           v_head_dim=8)


def _model(fields, seed=0):
    model = TransformerLM(ModelConfig(**fields), RouterConfig(top_k=2))
    model.init_weights(seed)
    return model.eval()


@pytest.fixture(scope="module")
def gqa_model():
    return _model(GQA)


PROMPT = [5, 17, 250, 3, 99, 42, 7]


@torch.no_grad()
def greedy_by_recomputing(model, prompt, n):
    """Reference: the argmax of a full forward over the whole sequence, one new token at a time (no cache)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("fields", [GQA, MLA], ids=["gqa", "mla"])
def test_greedy_with_the_kv_cache_equals_recomputing_the_sequence(fields, gqa_model):
    model = gqa_model if fields is GQA else _model(fields)
    n = model.cfg.max_seq_len - len(PROMPT)  # up to the longest sequence the model takes
    new = generate_ids(model, PROMPT, SamplingConfig(max_new_tokens=n, greedy=True))
    assert new == greedy_by_recomputing(model, PROMPT, n)
    assert len(set(new)) > 3  # a model that repeats one token would not tell the two apart


def test_top_p_towards_zero_is_greedy(gqa_model):
    greedy = generate_ids(gqa_model, PROMPT, SamplingConfig(max_new_tokens=12, greedy=True))
    assert generate_ids(gqa_model, PROMPT, SamplingConfig(max_new_tokens=12, temperature=0)) == greedy
    for seed in (0, 1):
        nucleus = SamplingConfig(max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=seed)
        assert generate_ids(gqa_model, PROMPT, nucleus) == greedy


def test_a_seed_reproduces_sampling(gqa_model):
    def sample(seed):
        return generate_ids(gqa_model, PROMPT, SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95,
                                                              seed=seed))

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_top_p_samples_only_from_the_nucleus():
    logits_BV = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)

    def support(top_p):
        drawn = next_token(logits_BV, SamplingConfig(top_p=top_p), g)
        return sorted(set(drawn.tolist())), drawn

    assert support(0.5)[0] == [1]  # 0.5 alone reaches the mass
    kept, drawn = support(0.8)
    assert kept == [1, 3]  # 0.5 + 0.3 >= 0.8
    assert abs((drawn == 1).float().mean().item() - 0.5 / 0.8) < 0.03  # renormalised: 0.625 / 0.375
    assert support(1.0)[0] == [0, 1, 2, 3]


def test_generation_stops_at_eos(gqa_model):
    first = generate_ids(gqa_model, PROMPT, SamplingConfig(max_new_tokens=5, greedy=True))
    assert generate_ids(gqa_model, PROMPT, SamplingConfig(max_new_tokens=5, greedy=True), eos_id=first[2]) == \
        first[:3]


def test_only_ids_of_the_tokenizer_are_drawn(gqa_model):
    """A model's embedding may be padded beyond its tokenizer's vocabulary: those ids are never generated."""
    full = generate_ids(gqa_model, PROMPT, SamplingConfig(max_new_tokens=12, temperature=2.0))
    assert max(full) >= 20
    for sampling in (SamplingConfig(max_new_tokens=12, temperature=2.0), SamplingConfig(max_new_tokens=12,
                                                                                        greedy=True)):
        assert max(generate_ids(gqa_model, PROMPT, sampling, vocab_size=20)) < 20


@pytest.mark.parametrize("sampling,needle", [
    (SamplingConfig(max_new_tokens=18), "the prompt's 7 tokens + --max-new-tokens 18 = 25 exceed model.max_seq_len=24"),
    (SamplingConfig(max_new_tokens=0), "--max-new-tokens 0 must be >= 1"),
    (SamplingConfig(top_p=0.0), "--top-p 0.0 must be in (0, 1]"),
    (SamplingConfig(temperature=float("nan")), "--temperature nan must be >= 0 and finite"),
])
def test_bad_requests_are_one_line_errors(gqa_model, sampling, needle):
    with pytest.raises(GenerateError) as info:
        generate_ids(gqa_model, PROMPT, sampling)
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1


# ------------------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two run directories: a byte-level model and one with a BPE tokenizer (data.tokenizer in its config)."""
    root = tmp_path_factory.mktemp("gen")
    bpe = train_bpe(root / "tokenizer.json", vocab_size=300)
    small = ["model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=48",
             "model.num_experts=4", "model.moe_hidden=24", "model.max_seq_len=64", "model.init_std=0.1"]
    out = {}
    for name, extra in (("bytes", []), ("bpe", [f"data.tokenizer={bpe}", "model.vocab_size=300"])):
        cfg = compose_config(small + extra)
        model = TransformerLM(cfg.model, cfg.router)
        model.init_weights(0)
        write_run_dir(root / name, cfg, model)
        out[name] = root / name
    out["tokenizer"] = bpe
    return out


@pytest.mark.parametrize("name", ["bytes", "bpe"])
def test_cli_prints_the_prompt_and_its_continuation(runs, name, capsys):
    args = [str(runs[name]), "--prompt", "def main(", "--max-new-tokens", "12", "--greedy"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("def main(") and len(printed) > len("def main(\n")
    assert main(args) == 0 and capsys.readouterr().out == printed  # greedy: the same text again
    assert main(args[:-1] + ["--temperature", "1.0", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def main(")


def test_cli_continuation_is_the_decoded_greedy_tokens(runs, capsys):
    from moetrain.interop.run_dir import load_run_model

    _, model = load_run_model(runs["bpe"])
    tok = load_tokenizer(str(runs["tokenizer"]))
    prompt = "import os\n"
    new = generate_ids(model, list(tok.encode(prompt)), SamplingConfig(max_new_tokens=10, greedy=True), tok.eos_id)
    assert main([str(runs["bpe"]), "--prompt", prompt, "--max-new-tokens", "10", "--greedy"]) == 0
    shown = new[:-1] if new[-1] == tok.eos_id else new
    assert capsys.readouterr().out == tok.decode(np.array(tok.encode(prompt).tolist() + shown)) + "\n"


def test_cli_errors_are_one_line_and_exit_2(runs, tmp_path, capsys):
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text((runs["bytes"] / "config.yaml").read_text())
    cases = [
        ([str(runs["bytes"]), "--prompt", ""], "--prompt is empty"),
        ([str(runs["bytes"]), "--prompt", "x" * 60, "--max-new-tokens", "5"], "exceed model.max_seq_len=64"),
        ([str(tmp_path / "nope"), "--prompt", "x"], "is not a directory"),
        ([str(empty_run), "--prompt", "x"], "holds no valid checkpoint"),
        ([str(runs["bytes"]), "--prompt", "x", "--step", "7"], "has no checkpoint of step 7"),
        ([str(runs["bytes"]), "--prompt", "x", "--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
        ([str(runs["bytes"]), "--prompt", "x", "--tokenizer", str(tmp_path / "missing.json")],
         "--tokenizer=" + str(tmp_path / "missing.json") + " is neither bytes nor"),
    ]
    big = train_bpe(tmp_path / "big.json", vocab_size=400)
    cases.append(([str(runs["bytes"]), "--prompt", "x", "--tokenizer", str(big)],
                  "has 400 ids but the model's vocabulary is model.vocab_size=256"))
    for args, needle in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("moetrain-generate: error: ") and needle in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err
