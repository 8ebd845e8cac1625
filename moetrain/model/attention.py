"""Causal grouped-query self-attention through scaled_dot_product_attention.

Legend: B batch, S sequence, D model dim, H query heads, G key/value heads (H % G == 0), Dh = D / H.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.model.rope import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q_BSHDh = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim)
        k_BSGDh = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        v_BSGDh = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim)
        q_BSHDh, k_BSGDh = apply_rope(q_BSHDh, cos, sin), apply_rope(k_BSGDh, cos, sin)
        out_BHSDh = F.scaled_dot_product_attention(
            q_BSHDh.transpose(1, 2), k_BSGDh.transpose(1, 2), v_BSGDh.transpose(1, 2),
            is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out_BHSDh.transpose(1, 2).reshape(B, S, -1))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
