"""Byte-level tokenizer: token id = UTF-8 byte value, vocabulary 256. Documents are joined with byte 0 (NUL)."""

from __future__ import annotations

import numpy as np

SEPARATOR = 0


class ByteTokenizer:
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
