"""Key/value cache for incremental decoding (generation), for gqa and mla attention.

Legend: B batch, M max_len (cached positions), G key/value heads, Dh head dim, C mla's kv_lora_rank, R mla's
qk_rope_head_dim, S new tokens.

Per layer the cache holds two buffers, filled at positions [0, pos):
    gqa: keys_BMGDh (after the q/k norm and rope), values_BMGDh
    mla: the normalised latent c_BMC and the rotated shared rope key k_BM1R: what DeepSeek's attention keeps per
         token (C + R numbers instead of H * (nope + rope + v)); the per-head keys and values are expanded from
         them by wkv_b at every step.
`TransformerLM.forward(tokens_BS, cache=cache)` treats tokens_BS as positions pos .. pos+S-1 (rope and the causal
mask offset by pos), appends each layer's new entries and advances `pos` by S. Generation runs in eval mode without
gradients; each batch row must be at the same position (no padding support).
"""

from __future__ import annotations

from typing import Optional

import torch

from moetrain.config.schema import ModelConfig


class LayerKV:
    """One layer's two buffers; `append` writes the S new entries at [pos, pos+S) and returns the filled prefix."""

    def __init__(self, cache: "KVCache", a: torch.Tensor, b: torch.Tensor):
        self.cache, self.a, self.b = cache, a, b

    @property
    def pos(self) -> int:
        return self.cache.pos

    def append(self, a_new: torch.Tensor, b_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, S = self.pos, a_new.shape[1]
        self.a[:, start:start + S] = a_new
        self.b[:, start:start + S] = b_new
        return self.a[:, :start + S], self.b[:, :start + S]


class KVCache:
    """Per-layer buffers of `max_len` positions for `batch_size` sequences and the number `pos` already cached."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], max_len: int):
        self.max_len, self.pos = max_len, 0
        self.layers = [LayerKV(self, a, b) for a, b in layers]

    @classmethod
    def create(cls, model_cfg: ModelConfig, batch_size: int, max_len: int, device=None,
               dtype: torch.dtype = torch.float32) -> "KVCache":
        """Empty buffers for every layer of `model_cfg` (max_len <= model.max_seq_len); `dtype` is the dtype the
        attention computes in (the model's parameters' dtype, or the autocast dtype), `device` the model's."""
        if not 1 <= max_len <= model_cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} must be between 1 and model.max_seq_len={model_cfg.max_seq_len}")
        if batch_size < 1:
            raise ValueError(f"cache batch size {batch_size} must be >= 1")
        m = model_cfg
        if m.attention == "mla":
            shapes = ((batch_size, max_len, m.kv_lora_rank), (batch_size, max_len, 1, m.qk_rope_head_dim))
        else:
            Dh = m.head_dim or m.dim // m.n_heads
            shapes = ((batch_size, max_len, m.n_kv_heads, Dh),) * 2
        layers = [tuple(torch.zeros(s, device=device, dtype=dtype) for s in shapes) for _ in range(m.n_layers)]
        return cls(layers, max_len)

    @property
    def batch_size(self) -> int:
        return self.layers[0].a.shape[0]

    def layer(self, i: int) -> LayerKV:
        return self.layers[i]

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused)."""
        self.pos = 0


def causal_mask(q_len: int, kv_len: int, device) -> Optional[torch.Tensor]:
    """mask_SL[i, j] = j <= (kv_len - q_len) + i: query i sits at absolute position kv_len - q_len + i. None when every
    key is visible (a single new token)."""
    if q_len == 1:
        return None
    offset = kv_len - q_len
    return torch.arange(kv_len, device=device)[None, :] <= (offset + torch.arange(q_len, device=device))[:, None]
