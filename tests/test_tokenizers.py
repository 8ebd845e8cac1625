"""Tokenizers: data.tokenizer=bytes|PATH, shards in the tokenizer's dtype with its identity, vocabulary checks
against the model, shards read only with the tokenizer that made them, training on the default corpus."""

import json

import numpy as np
import pytest

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.config.validate import ConfigError, validate
from moetrain.data import DataError
from moetrain.data.corpus import stdlib_shards
from moetrain.data.prepare import main as prepare_main
from moetrain.data.shards import load_shards, write_shards
from moetrain.data.tokenizer import ByteTokenizer, ids_dtype, load_tokenizer
from tests.tokenizer_utils import EOS, train_bpe
from tests.train_utils import losses, overrides

TEXT = "def f(x):\n    return 'héllo ✓'  # a comment\n"


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json", vocab_size=400)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def test_hf_tokenizer_round_trip_vocab_eos_and_identity(bpe, tmp_path):
    tok = load_tokenizer(str(bpe))
    assert tok.vocab_size == 400 and tok.dtype == np.uint16
    assert tok.eos_id == tok.separator == tok.backend.token_to_id(EOS)
    ids = tok.encode(TEXT)
    assert ids.dtype == np.uint16 and len(ids) < len(TEXT.encode()) and ids.max() < 400
    assert tok.decode(ids) == TEXT
    # The identity names the content, not the path; another tokenizer has another identity.
    copy = tmp_path / "copy.json"
    copy.write_bytes(bpe.read_bytes())
    assert load_tokenizer(str(copy)).identity == tok.identity
    assert load_tokenizer(str(train_bpe(tmp_path / "other.json", vocab_size=300))).identity != tok.identity


def test_tokenizer_directory_takes_eos_from_its_config(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(bpe), eos_token="<|im_end|>",
                                 additional_special_tokens=["<|im_end|>"])
    hf.save_pretrained(tmp_path / "dir")
    tok = load_tokenizer(str(tmp_path / "dir"))
    assert tok.vocab_size == 401 and tok.eos_id == 400 and tok.eos_id == hf.eos_token_id
    assert list(tok.encode(TEXT)) == hf(TEXT)["input_ids"]


def test_tokenizer_directory_without_tokenizer_json_goes_through_transformers(bpe, tmp_path):
    """A GPT-2 style directory (vocab.json + merges.txt, no tokenizer.json): AutoTokenizer converts it."""
    from tokenizers import Tokenizer

    (tmp_path / "slow").mkdir()
    Tokenizer.from_file(str(bpe)).model.save(str(tmp_path / "slow"))
    (tmp_path / "slow" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "eos_token": EOS, "bos_token": EOS, "unk_token": EOS}))
    slow, fast = load_tokenizer(str(tmp_path / "slow")), load_tokenizer(str(bpe))
    assert slow.vocab_size == 400 and slow.eos_id == fast.eos_id
    assert list(slow.encode(TEXT)) == list(fast.encode(TEXT)) and slow.decode(slow.encode(TEXT)) == TEXT


def test_ids_dtype_widths():
    assert [ids_dtype(v) for v in (256, 257, 65536, 65537)] == [np.uint8, np.uint16, np.uint16, np.uint32]


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "nothing-here", "is neither bytes nor an existing tokenizer.json file"),
    (lambda p: (p / "bad.json").write_text("{not json") and p / "bad.json", "cannot be loaded as a tokenizer"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "cannot be loaded as a tokenizer"),
])
def test_bad_tokenizer_is_one_line_data_error(tmp_path, make, needle):
    with pytest.raises(DataError) as info:
        load_tokenizer(str(make(tmp_path)))
    assert needle in str(info.value) and "data.tokenizer=" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_prepare_writes_uint16_shards_with_the_tokenizer_identity(bpe, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [TEXT * 20, "import os\nprint(os.getcwd())\n" * 30]
    for i, text in enumerate(texts):
        (docs / f"{i}.py").write_text(text)
    out = tmp_path / "shards"
    assert prepare_main([str(docs), "--out", str(out), "--tokenizer", str(bpe), "--val-fraction", "0.1"]) == 0
    assert "uint16" in capsys.readouterr().out
    tok = load_tokenizer(str(bpe))
    train, val, meta = load_shards(out, tok)
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == tok.identity and meta["vocab_size"] == 400
    assert train.dtype == np.uint16 and (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    # Documents tokenized separately and joined by the end-of-text token.
    expected = np.concatenate([np.append(tok.encode(t), tok.eos_id) for t in texts])
    np.testing.assert_array_equal(np.concatenate([train, val]), expected)


def test_shards_made_with_another_tokenizer_are_refused(bpe, tmp_path):
    tok = load_tokenizer(str(bpe))
    hf_shards = write_shards([TEXT.encode() * 50], tmp_path / "hf", 0.1, tokenizer=tok)
    byte_shards = write_shards([TEXT.encode() * 50], tmp_path / "bytes", 0.1)
    for path, reader, needle in ((hf_shards, ByteTokenizer(), f"was tokenized with \"{tok.identity}\" but "
                                  "data.tokenizer gives bytes"),
                                 (byte_shards, tok, f"was tokenized with \"bytes\" but data.tokenizer gives "
                                  f"{tok.identity}")):
        with pytest.raises(DataError) as info:
            load_shards(path, reader)
        assert needle in str(info.value) and "moetrain-prepare" in str(info.value)
        assert len(str(info.value).splitlines()) == 1
    # Before launch too: the config validator reads the shards' metadata.
    with pytest.raises(ConfigError) as info:
        validate(compose_config(["data=shards", f"data.path={hf_shards}", f"trainer.run_dir={tmp_path / 'r'}"]), 1)
    assert "was tokenized with" in str(info.value) and len(str(info.value).splitlines()) == 1


def test_vocabulary_larger_than_the_model_exits_2_before_anything_is_written(bpe, tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main([f"trainer.run_dir={run}", f"data.tokenizer={bpe}", f"data.cache_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"moetrain-train: error: model.vocab_size=256 is smaller than the vocabulary of "
                   f"data.tokenizer={bpe} (400 ids); set model.vocab_size=400 or more")
    assert not run.exists() and not any(tmp_path.glob("stdlib-*"))


def test_default_corpus_with_a_tokenizer_is_cached_apart_from_bytes(bpe, cache_dir):
    tok = load_tokenizer(str(bpe))
    byte_dir = stdlib_shards(str(cache_dir), 300_000, 0.05)
    hf_dir = stdlib_shards(str(cache_dir), 300_000, 0.05, tok)
    assert hf_dir != byte_dir and hf_dir.name.startswith(byte_dir.name) and tok.identity.split(":")[1] in hf_dir.name
    meta = json.loads((hf_dir / "meta.json").read_text())
    assert meta["tokenizer"] == tok.identity and meta["dtype"] == "uint16"
    assert json.loads((byte_dir / "meta.json").read_text())["tokenizer"] == "bytes"
    # Same text: the byte shards decode to what the tokenized shards decode to (up to the separators).
    byte_train, _, _ = load_shards(byte_dir)
    hf_train, _, _ = load_shards(hf_dir, tok)
    first_doc = bytes(byte_train[:100_000]).split(b"\0")[0].decode()
    first_eos = int(np.flatnonzero(np.asarray(hf_train[:100_000]) == tok.eos_id)[0])
    assert tok.decode(hf_train[:first_eos]) == first_doc
    assert stdlib_shards(str(cache_dir), 300_000, 0.05, tok) == hf_dir  # cached


def test_training_on_the_default_corpus_with_a_tokenizer(bpe, tmp_path, cache_dir):
    run = tmp_path / "run"
    assert train_main(overrides(run, cache_dir, "trainer.max_steps=12", "optim.lr=1e-2", "model.vocab_size=400",
                                f"data.tokenizer={bpe}")) == 0
    loss = losses(run)
    assert len(loss) == 12 and all(np.isfinite(list(loss.values())))
    assert loss[12] < loss[1] - 0.5, loss
