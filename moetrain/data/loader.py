"""Deterministic, resumable sampling of fixed-length windows, split across data-parallel ranks.

Legend: B micro-batch size, S sequence length, G global batch size (sequences per optimizer step), P dp size.

Step s draws G window offsets uniformly from [0, N - S - 1] with a generator seeded by (seed, s). Sample g of that list
goes to micro-batch m of rank r, position b, where g = (m * P + r) * B + b. So the union of what all ranks read in a
step is the same whatever P and B are (one process reproduces a data-parallel run), and resuming at step s needs only
s: the loader has no iterator state. Targets are the inputs shifted by one token.

Validation reads fixed, non-overlapping windows from the start of the validation split: the same windows whatever
the number of ranks, so `val_loss` does not depend on the layout.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from moetrain.data import DataError


class TokenLoader:
    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, seq_len: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, seed: int):
        if global_batch_size <= 0 or global_batch_size % (micro_batch_size * dp_size):
            raise DataError(f"data.global_batch_size={global_batch_size} is not a multiple of data.micro_batch_size="
                            f"{micro_batch_size} x {dp_size} data-parallel ranks; change one of them")
        if len(train_tokens) < seq_len + 2:
            raise DataError(f"the training split has {len(train_tokens)} tokens, fewer than data.seq_len+2="
                            f"{seq_len + 2}; lower data.seq_len or give more text")
        if len(val_tokens) < seq_len + 1:
            raise DataError(f"the validation split has {len(val_tokens)} tokens, fewer than data.seq_len+1="
                            f"{seq_len + 1}; raise data.val_fraction or lower data.seq_len")
        self.train, self.val = train_tokens, val_tokens
        self.seq_len, self.global_batch_size, self.micro_batch_size = seq_len, global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def _windows(self, tokens: np.ndarray, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = offsets[:, None] + np.arange(self.seq_len + 1)[None, :]
        window = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        return window[:, :-1], window[:, 1:]

    def step_offsets(self, step: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        high = len(self.train) - self.seq_len - 1
        return torch.randint(0, high, (self.global_batch_size,), generator=g).numpy()

    def train_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BS, targets_BS) int64 for micro-batch `micro` of step `step` on this rank."""
        if not 0 <= micro < self.grad_accum_steps:
            raise IndexError(f"micro-batch {micro} out of range [0, {self.grad_accum_steps})")
        start = (micro * self.dp_size + self.dp_rank) * self.micro_batch_size
        return self._windows(self.train, self.step_offsets(step)[start:start + self.micro_batch_size])

    def val_batches(self, num_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the validation set: `num_batches` global batches, i.e. windows 0 .. n-1 with
        n = num_batches * G (non-overlapping, wrapping around a short split). Window j goes to rank
        (j // B) % P, in micro-batches of B, so every rank scores n / P windows and the mean over ranks of the
        per-rank means is the mean over the same n windows for every layout (P, B)."""
        n_windows = (len(self.val) - 1) // self.seq_len
        B, P = self.micro_batch_size, self.dp_size
        for m in range(num_batches * self.grad_accum_steps):
            first = (m * P + self.dp_rank) * B
            window_ids = (np.arange(first, first + B) % n_windows).astype(np.int64)
            yield self._windows(self.val, window_ids * self.seq_len)


def build_loader(data_cfg, seed: int, dp_rank: int, dp_size: int) -> TokenLoader:
    from moetrain.data.corpus import stdlib_shards
    from moetrain.data.shards import load_shards
    from moetrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_cfg.tokenizer)
    if data_cfg.name == "stdlib":
        path = stdlib_shards(data_cfg.cache_dir, data_cfg.max_corpus_bytes, data_cfg.val_fraction, tokenizer)
    elif data_cfg.name == "shards":
        if not data_cfg.path:
            raise DataError("data.name=shards needs data.path=DIR; create DIR with `moetrain-prepare INPUT --out DIR`")
        path = data_cfg.path
    else:
        raise DataError(f"data.name={data_cfg.name!r} is unknown; use stdlib or shards")
    train, val, _ = load_shards(path, tokenizer)
    return TokenLoader(train, val, data_cfg.seq_len, data_cfg.global_batch_size, data_cfg.micro_batch_size,
                       dp_rank, dp_size, seed)
