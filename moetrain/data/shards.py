"""On-disk token shards: DIR/train.bin, DIR/val.bin (raw token ids) and DIR/meta.json.

The ids are stored in the tokenizer's dtype (meta.json `dtype`: uint8 for bytes, uint16 for up to 65536 ids, else
uint32) and meta.json records the tokenizer's identity (`tokenizer`, see moetrain/data/tokenizer.py), so shards are
only ever read with the tokenizer that made them. Shards without these two keys hold bytes (uint8, `bytes`).

Documents are tokenized separately and joined with the tokenizer's separator (bytes: NUL). `max_bytes` caps the text
(counted in bytes, with one byte per separator); for the byte tokenizer that is the number of tokens exactly.
The validation split is the last `val_fraction` of the concatenated tokens. Writing is atomic: everything goes to
`DIR.tmp-<pid>` first and is renamed to DIR; if DIR appeared meanwhile (another rank won the race), ours is discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from moetrain.data import DataError
from moetrain.data.tokenizer import SEPARATOR, ByteTokenizer, Tokenizer

FORMAT = 1


def is_shard_dir(path: Path) -> bool:
    path = Path(path)
    return (path / "meta.json").is_file() and (path / "train.bin").is_file() and (path / "val.bin").is_file()


def write_shards(docs: Iterable[bytes], out_dir: Path, val_fraction: float, max_bytes: int | None = None,
                 tokenizer: Optional[Tokenizer] = None) -> Path:
    """Tokenize documents with `tokenizer` (default: bytes), join them with its separator and write train/val shards;
    returns out_dir."""
    out_dir = Path(out_dir)
    if is_shard_dir(out_dir):
        return out_dir
    tokenizer = tokenizer or ByteTokenizer()
    chunks, total, sources = [], 0, 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            break
        piece = doc + bytes([SEPARATOR])
        chunks.append(piece)
        total += len(piece)
        sources += 1
    if isinstance(tokenizer, ByteTokenizer):
        tokens = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        if max_bytes is not None:
            tokens = tokens[:max_bytes]
    else:
        tokens = _tokenize(chunks, tokenizer, max_bytes)
    n_val = int(len(tokens) * val_fraction)
    if n_val < 1 or len(tokens) - n_val < 1:
        raise DataError(f"only {len(tokens)} tokens of text: too little for a train and a validation split "
                        f"(val_fraction={val_fraction}); give more text")
    tmp = out_dir.parent / f"{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokens[:-n_val].tofile(tmp / "train.bin")
    tokens[-n_val:].tofile(tmp / "val.bin")
    meta = {"format": FORMAT, "vocab_size": tokenizer.vocab_size, "dtype": tokens.dtype.name,
            "tokenizer": tokenizer.identity, "train_tokens": int(len(tokens) - n_val), "val_tokens": int(n_val),
            "sources": sources, "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # someone else finished first
        if not is_shard_dir(out_dir):
            raise DataError(f"{out_dir} exists and is not a shard directory; remove it or choose another output")
    return out_dir


def _tokenize(chunks: list[bytes], tokenizer: Tokenizer, max_bytes: int | None) -> np.ndarray:
    """The documents (each ending with a NUL counted against max_bytes) as one id array in tokenizer.dtype."""
    if max_bytes is not None and chunks and sum(map(len, chunks)) > max_bytes:
        chunks[-1] = chunks[-1][:max(0, max_bytes - sum(map(len, chunks[:-1])))]
    texts = [(c[:-1] if c.endswith(bytes([SEPARATOR])) else c).decode("utf-8", errors="ignore") for c in chunks]
    sep = [] if tokenizer.separator is None else [np.asarray([tokenizer.separator], dtype=tokenizer.dtype)]
    pieces: list[np.ndarray] = []
    batch = 256  # documents per encode_batch call
    for i in range(0, len(texts), batch):
        for ids in tokenizer.encode_batch(texts[i:i + batch]):
            pieces += [ids] + sep
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=tokenizer.dtype)


# meta.json keys a reader needs, each a positive integer (write_shards also records sources and sha256).
META_INT_KEYS = ("format", "vocab_size", "train_tokens", "val_tokens")
_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def read_meta(path: Path, tokenizer: Optional[Tokenizer] = None) -> dict:
    """DIR/meta.json as a dict, checked: a JSON object with every key of META_INT_KEYS a positive integer, the
    current FORMAT, made by `tokenizer` (default: bytes; its identity, vocabulary and dtype). Any problem is a
    one-line DataError."""
    tokenizer = tokenizer or ByteTokenizer()
    fix = f"re-create the shards with `moetrain-prepare INPUT --out {path}{_tokenizer_flag(tokenizer)}`"
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}/meta.json cannot be read ({type(e).__name__}); {fix}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}/meta.json is not valid JSON ({e}); {fix}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}/meta.json holds a JSON {_JSON_TYPES.get(type(meta), 'value')}, expected an object; "
                        f"{fix}")
    for key in META_INT_KEYS:
        if key not in meta:
            raise DataError(f"{path}/meta.json has no {key!r}; {fix}")
        value = meta[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DataError(f"{path}/meta.json has {key}={json.dumps(value)[:40]}, expected a positive integer; "
                            f"{fix}")
    if meta["format"] != FORMAT:
        raise DataError(f"{path}/meta.json has format {meta['format']}, expected {FORMAT}; {fix}")
    made_with = meta.setdefault("tokenizer", ByteTokenizer.identity)
    if made_with != tokenizer.identity:
        raise DataError(f"{path} was tokenized with {json.dumps(made_with)[:80]} but data.tokenizer gives "
                        f"{tokenizer.identity} ({tokenizer.describe()}); set data.tokenizer to the tokenizer the "
                        f"shards were made with, or {fix[0].lower() + fix[1:]}")
    if meta["vocab_size"] != tokenizer.vocab_size:
        raise DataError(f"{path}/meta.json has vocab_size={meta['vocab_size']}, expected {tokenizer.vocab_size} "
                        f"({tokenizer.describe()}); {fix}")
    if meta.setdefault("dtype", "uint8") != tokenizer.dtype.name:
        raise DataError(f"{path}/meta.json has dtype={json.dumps(meta['dtype'])[:40]}, expected "
                        f"{tokenizer.dtype.name} ({tokenizer.describe()}); {fix}")
    return meta


def _tokenizer_flag(tokenizer: Tokenizer) -> str:
    return "" if isinstance(tokenizer, ByteTokenizer) else f" --tokenizer {tokenizer.source}"


def load_shards(path: Path, tokenizer: Optional[Tokenizer] = None) -> tuple[np.memmap, np.memmap, dict]:
    """(train tokens, validation tokens, meta) of a shard directory made with `tokenizer` (default: bytes); a
    missing, malformed or truncated directory, or one made with another tokenizer, is a one-line DataError naming
    the file and the fix."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"data.path={path} does not exist; create shards with `moetrain-prepare INPUT --out {path}`")
    if not (path / "meta.json").is_file():
        raise DataError(f"data.path={path} has no meta.json; create shards with `moetrain-prepare INPUT --out {path}`")
    meta = read_meta(path, tokenizer)
    dtype = np.dtype(meta["dtype"])
    for split in ("train", "val"):
        f = path / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta[f"{split}_tokens"] * dtype.itemsize:
            raise DataError(f"{f} is missing or truncated; re-create the shards with moetrain-prepare")
    return (np.memmap(path / "train.bin", dtype=dtype, mode="r"),
            np.memmap(path / "val.bin", dtype=dtype, mode="r"), meta)
