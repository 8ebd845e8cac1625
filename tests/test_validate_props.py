"""Every value checked: range and allowed-value checks for every schema key, nearest-key suggestions, malformed shard
metadata, and property-based tests that throw random overrides at compose+validate and random token batches at the
model. A user error is always a ConfigError / DataError / ValueError with one line per problem, never a traceback.
"""

import dataclasses
import json
import math
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.config.schema import TrainConfig
from moetrain.config.validate import ConfigError, validate
from moetrain.data import DataError
from moetrain.data.shards import load_shards, write_shards
from moetrain.model.transformer import TransformerLM
from tests.train_utils import SMALL

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def leaf_fields(cls=TrainConfig, prefix=""):
    """(dotted key, type) of every leaf of the schema, read from the dataclasses themselves."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


FIELDS = dict(leaf_fields())


def bad_candidates(tp) -> list[str]:
    """Override values that some key of type `tp` cannot take; a key whose check accepts all of them is unchecked."""
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if typing.get_origin(tp) is typing.Union else tp
    base = typing.get_origin(base) or base  # list[int] -> list
    return {
        bool: ["maybe"],
        int: ["-1", "-1000000000"],  # not 2**64: every int key fails that (64-bit check), checked or not
        float: ["nan", "-1", "inf", "0", "2"],
        str: ["bogus-value", "''", "/proc/moetrain-no-such-dir/x"],
        list: ["[-1]", "[0,0,0]"],
    }[base]


def rejection(overrides: list[str]):
    """The ConfigError message for `overrides` (compose + validate, world size 1), or None when they are valid."""
    try:
        validate(compose_config(overrides), world_size=1)
    except ConfigError as e:
        return str(e)
    return None


def assert_one_line_per_problem(message: str) -> None:
    lines = message.splitlines()
    assert lines and all(line.isprintable() for line in lines), repr(message)
    if len(lines) > 1:  # "N config problems:" then one "  - " line each
        assert lines[0] == f"{len(lines) - 1} config problems:", repr(message)
        assert all(line.startswith("  - ") for line in lines[1:]), repr(message)


# ----------------------------------------------------------------------------------------- every key is checked
@pytest.mark.parametrize("key", sorted(FIELDS))
def test_every_schema_key_rejects_a_bad_value(key, tmp_path):
    run_dir = f"trainer.run_dir={tmp_path / 'run'}"
    tried = {}
    for value in bad_candidates(FIELDS[key]):
        tried[value] = rejection([run_dir, f"{key}={value}"])
        if tried[value] is not None and key in tried[value]:
            assert_one_line_per_problem(tried[value])
            return
    pytest.fail(f"{key} accepts every bad value tried (or the error does not name it): {tried}; add a check for it "
                f"in moetrain/config/validate.py")


BRIEF_VALUES = [  # reported by users: a traceback, or silently accepted
    "optim.beta1=1.5", "optim.eps=-1", "model.init_std=-1", "logger.wandb_mode=bogus", "optim.lr=inf",
    "optim.weight_decay=-1", "model.norm_eps=-1", "router.route_scale=nan", "model.rope_theta=0",
    "optim.beta2=1.0", "optim.min_lr_ratio=1.5", "model.max_seq_len=0", "model.vocab_size=100", "model.ffn_hidden=0",
    "model.moe_hidden=0", "model.num_shared_experts=-1", "model.first_k_dense=-1", "router.bias_update_rate=-0.1",
    "router.bias_update_stop_frac=1.5", "parallel.fssdp.budget=-1", "parallel.fssdp.window=0",
    "parallel.fssdp.reshard_every=-1", "data.max_corpus_bytes=0", "trainer.max_bad_steps=0",
    "trainer.eval_batches=-1", "parallel.timeout_s=inf", "parallel.timeout_s=0", "trainer.seed=-1",
    "optim.name=sgd", "router.num_groups=0",
]


@pytest.mark.parametrize("override", BRIEF_VALUES)
def test_bad_value_exits_2_with_one_line_naming_the_key(override, tmp_path, capsys):
    key = override.split("=")[0]
    assert train_main([f"trainer.run_dir={tmp_path / 'run'}", override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moetrain-train: error: {key}="), err
    assert len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", [k for k, tp in FIELDS.items() if tp is int])
def test_integers_beyond_64_bits_are_refused(key, tmp_path):
    message = rejection([f"trainer.run_dir={tmp_path}", f"{key}={2**64}"])
    assert message == f"{key}={2**64} does not fit in 64 bits; use a smaller value"


def test_defaults_and_the_tiny_overrides_are_valid(tmp_path):
    assert rejection([f"trainer.run_dir={tmp_path}"]) is None
    assert rejection(SMALL + [f"trainer.run_dir={tmp_path}", "model.num_experts=0"]) is None


def test_one_bad_value_gives_one_message(tmp_path):
    # model.num_experts=-1 is also read by the top_k and parallel.ep checks; they stay quiet
    assert rejection([f"trainer.run_dir={tmp_path}", "model.num_experts=-1"]) == \
        "model.num_experts=-1 must be >= 0 (0 = dense model)"


# --------------------------------------------------------------------------------------------- did you mean ...
@pytest.mark.parametrize("override,expected", [
    ("trainer.max_step=5", "unknown config key 'trainer.max_step'; did you mean trainer.max_steps?"),
    ("model.num_expert=8", "unknown config key 'model.num_expert'; did you mean model.num_experts?"),
    ("rooter.top_k=3", "unknown config key 'rooter.top_k'; did you mean router.top_k?"),
    ("parallel.fssdp.budgt=2", "unknown config key 'parallel.fssdp.budgt'; did you mean parallel.fssdp.budget?"),
    ("+trainer.max_stepz=5", "unknown config key 'trainer.max_stepz'; did you mean trainer.max_steps?"),
    ("router=mixtrl", "Could not find 'router/mixtrl'; did you mean router=mixtral? (available: "),
    ("model=tny", "Could not find 'model/tny'; did you mean model=tiny? (available: "),
])
def test_misspelling_suggests_the_nearest_key(override, expected):
    with pytest.raises(ConfigError) as info:
        compose_config([override])
    assert expected in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_an_added_key_the_schema_lacks_is_rejected_not_dropped():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer\.foo' \(check the spelling"):
        compose_config(["+trainer.foo=1"])


# ------------------------------------------------------------------------------------------ shard metadata
GOOD_META = {"format": 1, "vocab_size": 256, "train_tokens": 900, "val_tokens": 100, "sources": 1, "sha256": "x"}


@pytest.fixture
def shard_dir(tmp_path):
    return write_shards([bytes(range(256)) * 4], tmp_path / "shards", val_fraction=0.1)


@pytest.mark.parametrize("meta_text,needle", [
    ("[1, 2]", "holds a JSON array, expected an object"),
    ('"shards"', "holds a JSON string, expected an object"),
    ("null", "holds a JSON null, expected an object"),
    ("{", "is not valid JSON"),
    (json.dumps({k: v for k, v in GOOD_META.items() if k != "train_tokens"}), "has no 'train_tokens'"),
    (json.dumps({**GOOD_META, "val_tokens": "100"}), 'has val_tokens="100", expected a positive integer'),
    (json.dumps({**GOOD_META, "format": 1.0}), "has format=1.0, expected a positive integer"),
    (json.dumps({**GOOD_META, "format": True}), "has format=true, expected a positive integer"),
    (json.dumps({**GOOD_META, "format": 2}), "has format 2, expected 1"),
    (json.dumps({**GOOD_META, "vocab_size": 50000}), "has vocab_size=50000, expected 256"),
])
def test_malformed_meta_json_is_one_line_data_error(shard_dir, meta_text, needle):
    (shard_dir / "meta.json").write_text(meta_text)
    with pytest.raises(DataError) as info:
        load_shards(shard_dir)
    message = str(info.value)
    assert needle in message and "moetrain-prepare" in message, message
    assert len(message.splitlines()) == 1


def test_malformed_shards_fail_validation_before_launch(shard_dir, tmp_path):
    (shard_dir / "meta.json").write_text("[]")
    message = rejection([f"trainer.run_dir={tmp_path / 'run'}", "data=shards", f"data.path={shard_dir}"])
    assert message.startswith(f"data.path={shard_dir}: {shard_dir}/meta.json holds a JSON array"), message


def test_meta_json_that_is_not_utf8_is_a_data_error(shard_dir):
    (shard_dir / "meta.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(DataError, match="meta.json cannot be read"):
        load_shards(shard_dir)


# ------------------------------------------------------------------------------- random overrides (hypothesis)
KEYS = sorted(FIELDS)
GROUP_OPTIONS = ["model=tiny", "model=small", "router=deepseek_v3", "router=mixtral", "router=olmoe", "router=qwen3",
                 "router=switch_aux", "parallel=ep2", "data=shards", "logger=wandb", "router=mixtrl", "model=",
                 "optim=adamw"]

values = st.one_of(
    st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.integers(min_value=-3, max_value=70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "-0.0", "1e-300", "0.5", "1", "0"]),
    st.sampled_from(["", "''", "null", "true", "false", "auto", "none", "cuda", "fssdp", "shards", "sigmoid", "[1,2]",
                     "{a: 1}", "${model.dim}", "${nope}", "a,b", "'", "\"x", "~", "/", "/proc/x", "runs/x y"]),
    st.text(max_size=12),
)
override = st.one_of(
    st.tuples(st.sampled_from(KEYS), values).map(lambda kv: f"{kv[0]}={kv[1]}"),
    st.sampled_from(GROUP_OPTIONS),
    st.tuples(st.sampled_from(KEYS), st.text(max_size=3)).map(lambda kv: f"{kv[0]}{kv[1]}=1"),  # misspelled keys
)


@PROPS
@given(st.lists(override, min_size=1, max_size=4))
def test_random_overrides_validate_or_raise_one_line_config_error(tmp_path, overrides):
    try:
        cfg = compose_config([f"trainer.run_dir={tmp_path / 'run'}", *overrides])
        validate(cfg, world_size=1)
    except ConfigError as e:
        assert_one_line_per_problem(str(e))
    assert not (tmp_path / "run").exists()  # validation probes the run directory without creating it


# ---------------------------------------------------------------------------------- random batches (hypothesis)
MAX_SEQ_LEN = 12


@pytest.fixture(scope="module")
def tiny_models():
    """A tiny MoE and a tiny dense TransformerLM (vocab 256, max_seq_len 12)."""
    models = []
    for extra in ([], ["model.num_experts=0"]):
        cfg = compose_config(SMALL + [f"model.max_seq_len={MAX_SEQ_LEN}", "data.seq_len=8", *extra])
        model = TransformerLM(cfg.model, cfg.router)
        model.init_weights(0)
        models.append(model)
    return models


ids = st.one_of(st.integers(0, 255), st.integers(-2**40, -1), st.integers(256, 2**40), st.sampled_from([-1, 256]))


@st.composite
def token_batches(draw):
    B, S = draw(st.integers(0, 3)), draw(st.integers(0, MAX_SEQ_LEN + 3))
    values = draw(st.lists(ids, min_size=B * S, max_size=B * S))
    dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32]))
    return torch.tensor(values, dtype=torch.int64).view(B, S).to(dtype) if B * S else torch.zeros(B, S, dtype=dtype)


@PROPS
@given(token_batches(), st.integers(0, 1))
def test_random_token_batches_run_or_raise_one_line_value_error(tiny_models, tokens_BS, which):
    model = tiny_models[which]
    B, S = tokens_BS.shape
    valid = B > 0 and 0 < S <= MAX_SEQ_LEN and bool(((tokens_BS >= 0) & (tokens_BS < 256)).all())
    try:
        with torch.no_grad():
            logits_BSV = model(tokens_BS)
    except ValueError as e:
        assert not valid, f"a valid batch was refused: {e}"
        message = str(e)
        assert len(message.splitlines()) == 1 and message, message
        assert any(word in message for word in ("empty batch", "model.max_seq_len", "model.vocab_size")), message
        return
    assert valid, f"an invalid batch of shape {(B, S)} ran"
    assert logits_BSV.shape == (B, S, 256) and torch.isfinite(logits_BSV).all()


@pytest.mark.parametrize("tokens_BS,needle", [
    (torch.zeros(0, 4, dtype=torch.int64), "empty batch of shape (0, 4)"),
    (torch.zeros(2, 0, dtype=torch.int64), "empty batch of shape (2, 0)"),
    (torch.tensor([[1, -1]]), "token ids must be in [0, 256) (model.vocab_size=256), got ids from -1 to 1"),
    (torch.tensor([[256]]), "got ids from 256 to 256"),
    (torch.zeros(1, MAX_SEQ_LEN + 1, dtype=torch.int64), "sequence length 13 exceeds model.max_seq_len=12"),
    (torch.zeros(2, 3), "tokens must be int64 or int32 token ids, got dtype torch.float32"),
    (torch.zeros(3, dtype=torch.int64), "tokens must have shape (batch, sequence), got shape (3,)"),
])
def test_bad_batches_name_the_problem(tiny_models, tokens_BS, needle):
    with pytest.raises(ValueError) as info:
        tiny_models[0](tokens_BS)
    assert needle in str(info.value)


def test_one_token_runs(tiny_models):
    for model in tiny_models:
        with torch.no_grad():
            logits_BSV = model(torch.tensor([[7]]))
        assert logits_BSV.shape == (1, 1, 256) and math.isfinite(float(logits_BSV.sum()))
