"""Tokenizers: the byte tokenizer (the default) and Hugging Face tokenizers (`data.tokenizer=PATH`).

    data.tokenizer=bytes                     token id = UTF-8 byte value, vocabulary 256 (needs nothing installed)
    data.tokenizer=PATH/tokenizer.json       a `tokenizers` file
    data.tokenizer=DIR                       a Hugging Face tokenizer directory: DIR/tokenizer.json through the
                                             `tokenizers` library, else transformers' AutoTokenizer (e.g. a
                                             sentencepiece tokenizer.model), converted to its fast form

Every tokenizer has
    vocab_size  the largest token id + 1 (the embedding rows a model needs at least);
    separator   the id that joins documents in shards (bytes: 0, NUL; Hugging Face: the end-of-text token, if any);
    eos_id      the id generation stops at (bytes: 0, the document separator; Hugging Face: the EOS token, if any);
    identity    a string that names the tokenizer exactly (`bytes`, or `hf:<sha256 prefix of its JSON>:<vocab>`),
                recorded in shard metadata, so shards are never read with another tokenizer;
    dtype       the narrowest unsigned integer type that holds every id (uint8, uint16 up to 65536 ids, else uint32).

Documents are encoded without special tokens and joined with the separator; a prompt is encoded with the
tokenizer's own special tokens (e.g. a beginning-of-sequence token), as transformers does by default.
The EOS token of a bare tokenizer.json is the first of its special added tokens named like one (`<|endoftext|>`,
`</s>`, `<eos>`, `<|end_of_text|>`, `<|im_end|>`); a directory's tokenizer_config.json `eos_token` wins.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from moetrain.data import DataError

SEPARATOR = 0  # the byte tokenizer's document separator (NUL)
HF_MISSING = "needs the tokenizers package; install it with pip install 'moetrain[hf]'"
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type for ids in [0, vocab_size)."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class ByteTokenizer:
    identity = "bytes"
    vocab_size = 256
    separator: Optional[int] = SEPARATOR
    eos_id: Optional[int] = SEPARATOR
    dtype = np.dtype(np.uint8)

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def describe(self) -> str:
        return "byte tokens"


class HFTokenizer:
    """A `tokenizers.Tokenizer` with the identity, separator and EOS described in the module docstring."""

    def __init__(self, backend, source: str, json_text: str, eos_id: Optional[int]):
        self.backend, self.source, self.eos_id = backend, source, eos_id
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self.separator = eos_id
        self.dtype = ids_dtype(self.vocab_size)
        digest = hashlib.sha256(json_text.encode("utf-8")).hexdigest()[:16]
        self.identity = f"hf:{digest}:{self.vocab_size}"

    def encode(self, text: str, add_special_tokens: bool = False) -> np.ndarray:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return np.asarray(ids, dtype=self.dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=self.dtype)
                for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def describe(self) -> str:
        return f"the tokenizer {self.source}"


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: str, option: str = "data.tokenizer") -> Tokenizer:
    """The tokenizer `spec` names (see the module docstring); a problem is a one-line DataError naming `option`."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not (path.is_file() or path.is_dir()):
        raise DataError(f"{option}={spec} is neither bytes nor an existing tokenizer.json file or Hugging Face "
                        f"tokenizer directory; give one of them")
    try:
        import tokenizers
    except ImportError:
        raise DataError(f"{option}={spec} {HF_MISSING}") from None
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        if file.is_file():
            json_text = file.read_text(encoding="utf-8")
            backend = tokenizers.Tokenizer.from_str(json_text)
            eos_id = _eos_from_config(path, backend) if path.is_dir() else None
            eos_id = eos_id if eos_id is not None else _guess_eos(backend)
        else:
            backend, eos_id = _auto_tokenizer(path, option)
            json_text = backend.to_str()
    except DataError:
        raise
    except Exception as e:  # tokenizers / transformers raise many types for a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{option}={spec} cannot be loaded as a tokenizer ({first[:160]}); give a tokenizer.json "
                        f"file or a Hugging Face tokenizer directory") from None
    if not backend.get_vocab(with_added_tokens=True):
        raise DataError(f"{option}={spec} has an empty vocabulary; give a trained tokenizer")
    return HFTokenizer(backend, str(path), json_text, eos_id)


def _eos_from_config(directory: Path, backend) -> Optional[int]:
    cfg_file = directory / "tokenizer_config.json"
    if not cfg_file.is_file():
        return None
    eos = json.loads(cfg_file.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return backend.token_to_id(eos) if isinstance(eos, str) else None


def _guess_eos(backend) -> Optional[int]:
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    for name in EOS_NAMES:
        if name in special:
            return backend.token_to_id(name)
    return None


def _auto_tokenizer(directory: Path, option: str):
    """(fast backend, EOS id) of a directory without tokenizer.json, through transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(f"{option}={directory} has no tokenizer.json and reading it needs the transformers package; "
                        f"install it with pip install 'moetrain[hf]'") from None
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"{option}={directory} has no fast (Rust) form; save it with tokenizer.json")
    return backend, tok.eos_token_id
