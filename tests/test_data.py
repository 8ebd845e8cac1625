"""Data: byte tokenizer, shards, the embedded stdlib corpus, deterministic data-parallel sampling, moetrain-prepare."""

import json

import numpy as np
import pytest
import torch

from moetrain.data import DataError
from moetrain.data.corpus import stdlib_files, stdlib_shards
from moetrain.data.loader import TokenLoader
from moetrain.data.prepare import main as prepare_main
from moetrain.data.shards import is_shard_dir, load_shards, write_shards
from moetrain.data.tokenizer import ByteTokenizer


def test_tokenizer_round_trip_utf8():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and tok.vocab_size == 256
    assert tok.decode(ids) == text


def test_write_and_load_shards(tmp_path):
    out = write_shards([b"a" * 90, b"b" * 9], tmp_path / "s", val_fraction=0.1)
    train, val, meta = load_shards(out)
    assert meta["train_tokens"] + meta["val_tokens"] == 101  # 99 bytes + 2 separators
    assert meta["val_tokens"] == 10 and len(train) == 91 and len(val) == 10
    assert train[90] == 0  # documents are NUL-separated
    # A complete directory is reused, not rewritten.
    again = write_shards([b"c" * 500], tmp_path / "s", val_fraction=0.1)
    assert load_shards(again)[2]["sha256"] == meta["sha256"]


def test_shard_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="moetrain-prepare"):
        load_shards(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no meta.json"):
        load_shards(tmp_path / "empty")
    out = write_shards([b"x" * 100], tmp_path / "t", val_fraction=0.1)
    (out / "val.bin").write_bytes(b"\0")
    with pytest.raises(DataError, match="truncated"):
        load_shards(out)
    with pytest.raises(DataError, match="too little"):
        write_shards([b"x"], tmp_path / "u", val_fraction=0.1)


def test_stdlib_corpus_is_deterministic_and_cached(tmp_path):
    files = stdlib_files()
    assert len(files) > 100 and files == sorted(files, key=lambda p: p.as_posix())
    a = stdlib_shards(str(tmp_path), 200_000, 0.05)
    meta = json.loads((a / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == 200_000
    mtime = (a / "train.bin").stat().st_mtime_ns
    b = stdlib_shards(str(tmp_path), 200_000, 0.05)
    assert a == b and (b / "train.bin").stat().st_mtime_ns == mtime
    other = stdlib_shards(str(tmp_path / "other"), 200_000, 0.05)
    assert json.loads((other / "meta.json").read_text())["sha256"] == meta["sha256"]


def _loader(train, dp_rank, dp_size, micro, global_batch=8, seq=16, seed=0):
    val = np.arange(200, dtype=np.uint8)
    return TokenLoader(train, val, seq, global_batch, micro, dp_rank, dp_size, seed)


def _step_union(train, dp_size, micro, step):
    """All sequences of a step, in global sample order g = (m * P + r) * B + b."""
    loaders = [_loader(train, r, dp_size, micro) for r in range(dp_size)]
    return torch.cat([loaders[r].train_batch(step, m)[0]
                      for m in range(loaders[0].grad_accum_steps) for r in range(dp_size)])


def test_global_batch_is_the_same_for_any_data_parallel_layout():
    train = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    ref = _step_union(train, 1, 8, step=3)
    for dp, micro in ((2, 4), (4, 2), (2, 2), (8, 1)):
        torch.testing.assert_close(_step_union(train, dp, micro, step=3), ref, rtol=0, atol=0)
    assert not torch.equal(_step_union(train, 1, 8, step=4), ref)
    torch.testing.assert_close(_step_union(train, 1, 8, step=3), ref, rtol=0, atol=0)


def test_targets_are_shifted_inputs_and_int64():
    train = np.arange(1000, dtype=np.int64).astype(np.uint8)
    x, y = _loader(train, 0, 1, 4).train_batch(0, 0)
    assert x.dtype == torch.int64 and x.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_val_batches_deterministic_and_split_across_ranks():
    train = np.zeros(1000, dtype=np.uint8)
    a = [x for x, _ in _loader(train, 0, 2, 2).val_batches(2)]
    b = [x for x, _ in _loader(train, 0, 2, 2).val_batches(2)]
    other = [x for x, _ in _loader(train, 1, 2, 2).val_batches(2)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], other[0])


def test_loader_errors():
    train = np.zeros(1000, dtype=np.uint8)
    with pytest.raises(DataError, match="data.global_batch_size=8 is not a multiple"):
        _loader(train, 0, 3, 2)
    with pytest.raises(DataError, match="training split"):
        _loader(np.zeros(10, dtype=np.uint8), 0, 1, 2)


def test_prepare_cli(tmp_path, capsys):
    src = tmp_path / "texts"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello world\n" * 50)
    (src / "sub" / "b.md").write_text("# title\n" * 40)
    (src / "blob.bin").write_bytes(bytes([0xff, 0xfe, 0x00]) * 10)  # not UTF-8: skipped
    out = tmp_path / "shards"
    assert prepare_main([str(src), "--out", str(out)]) == 0
    assert is_shard_dir(out)
    assert load_shards(out)[2]["sources"] == 2
    assert "prepared 2 files" in capsys.readouterr().out
    assert prepare_main([str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.strip() == f"moetrain-prepare: error: input {tmp_path / 'nope'} does not exist"
    assert prepare_main([str(src), "--out", str(tmp_path / "o3"), "--extensions", ".rst"]) == 2
    assert "no input files found" in capsys.readouterr().err


def test_training_on_prepared_shards(tmp_path):
    from moetrain.cli import train_main
    from tests.train_utils import losses, overrides

    src = tmp_path / "texts"
    src.mkdir()
    (src / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    assert prepare_main([str(src), "--out", str(tmp_path / "shards")]) == 0
    run = tmp_path / "run"
    args = overrides(run, tmp_path, "data=shards", f"data.path={tmp_path / 'shards'}", "data.seq_len=32",
                     "trainer.max_steps=3")
    assert train_main(args) == 0
    assert sorted(losses(run)) == [1, 2, 3]
