"""Causal grouped-query self-attention through scaled_dot_product_attention.

Legend: B batch, S new positions, L key positions (S, or pos + S with a KV cache), D model dim, H query heads,
G key/value heads (H % G == 0), Dh head dim (model.head_dim, default D / H).

    q_BSHDh, k_BSGDh, v_BSGDh = x Wq (+ bq), x Wk (+ bk), x Wv (+ bv)      (biases: model.qkv_bias)
    qk_norm=full: q, k = RMSNorm(q over all H*Dh), RMSNorm(k over all G*Dh)  (OLMoE)
    clip_qkv=c:   q, k, v = clamp(., -c, c)                                   (OLMoE)
    qk_norm=head: q, k = RMSNorm over each head's Dh (one weight of Dh shared by the heads)  (Qwen3-MoE)
    q, k = rope(q), rope(k);  out = softmax(q k^T / sqrt(Dh) + causal) v;  y = out Wo
The norms use model.norm_eps and come before rope, as in those models. With a KV cache (model/kv_cache.py) the new
keys and values are appended to the cached ones and query i attends to the keys at positions <= pos + i.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import ModelConfig
from moetrain.model.kv_cache import LayerKV, causal_mask
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope


def gqa_head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.dim // cfg.n_heads


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, G, Dh = cfg.n_heads, cfg.n_kv_heads, gqa_head_dim(cfg)
        self.n_heads, self.n_kv_heads, self.head_dim = H, G, Dh
        self.qk_norm, self.clip_qkv = cfg.qk_norm, cfg.clip_qkv
        self.wq = nn.Linear(cfg.dim, H * Dh, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, G * Dh, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, G * Dh, bias=cfg.qkv_bias)
        self.wo = nn.Linear(H * Dh, cfg.dim, bias=False)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.norm_eps), RMSNorm(Dh, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Dh, cfg.norm_eps), RMSNorm(G * Dh, cfg.norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: Optional[LayerKV] = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self.wq(x_BSD), self.wk(x_BSD), self.wv(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q_BSHDh = q.view(B, S, self.n_heads, self.head_dim)
        k_BSGDh = k.view(B, S, self.n_kv_heads, self.head_dim)
        v_BSGDh = v.view(B, S, self.n_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q_BSHDh, k_BSGDh = self.q_norm(q_BSHDh), self.k_norm(k_BSGDh)
        q_BSHDh, k_BSGDh = apply_rope(q_BSHDh, cos, sin), apply_rope(k_BSGDh, cos, sin)
        if kv is None:
            mask, causal = None, True
        else:
            k_BSGDh, v_BSGDh = kv.append(k_BSGDh, v_BSGDh)  # now all L = pos + S cached positions
            mask, causal = causal_mask(S, k_BSGDh.shape[1], x_BSD.device), False
        out_BHSDh = F.scaled_dot_product_attention(
            q_BSHDh.transpose(1, 2), k_BSGDh.transpose(1, 2), v_BSGDh.transpose(1, 2),
            attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, -1))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        if self.qk_norm != "none":
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()
