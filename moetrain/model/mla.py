"""Multi-head Latent Attention (MLA, DeepSeek-V2/V3), selected by model.attention=mla.

Legend: B batch, S new positions, L key positions (S, or pos + S with a KV cache), D model dim, H heads,
Qr q_lora_rank, C kv_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, Q = N + R, Dv v_head_dim.

    q_BSH(N+R)  = x Wq                                  (q_lora_rank = 0)
                = RMSNorm(x Wq_a) Wq_b                  (q_lora_rank = Qr > 0: queries through a rank-Qr bottleneck)
    [c_BSC | kr_BSR] = x Wkv_a                          (one latent and one rope key per token, shared by the heads)
    c = RMSNorm(c)
    q = [q_nope | rope(q_rope)] per head;  kr = rope(kr)
    [k_nope | v]_BLH(N+Dv) = c Wkv_b                    (every head's non-rope key and value from the latent)
    k = [k_nope | kr] per head (kr broadcast over heads)
    out = softmax(q k^T * scale + causal) v;  y = out_BSHDv Wo
    scale = 1 / sqrt(N + R), times mscale(factor, mscale_all_dim)^2 under yarn with a non-zero mscale_all_dim
Per head, rows of Wq (or Wq_b) are [nope | rope] and rows of Wkv_b are [k_nope | v]: DeepSeek's reference layout.
Rope rotates interleaved pairs (model/rope.py), as DeepSeek's own code does. The latent norms use eps 1e-6, as in
DeepSeek's reference code and Hugging Face's DeepseekV3Attention (whatever model.norm_eps is).
A KV cache (model/kv_cache.py) keeps c and kr per position, the (C + R) numbers per token that make MLA's cache
small; the keys and values of all cached positions are expanded through Wkv_b at each step.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.config.schema import ModelConfig
from moetrain.model.kv_cache import LayerKV, causal_mask
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import apply_rope, yarn_mscale

LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(cfg: ModelConfig) -> float:
    scale = 1.0 / math.sqrt(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
        scale *= yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim) ** 2
    return scale


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, N, R, Dv, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_rank = H, N, R, Dv, C
        self.q_rank = cfg.q_lora_rank
        self.scale = mla_softmax_scale(cfg)
        if self.q_rank == 0:
            self.wq = nn.Linear(cfg.dim, H * (N + R), bias=False)
        else:
            self.wq_a = nn.Linear(cfg.dim, self.q_rank, bias=False)
            self.q_norm = RMSNorm(self.q_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(self.q_rank, H * (N + R), bias=False)
        self.wkv_a = nn.Linear(cfg.dim, C + R, bias=False)
        self.kv_norm = RMSNorm(C, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(C, H * (N + Dv), bias=False)
        self.wo = nn.Linear(H * Dv, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: Optional[LayerKV] = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        H, N, R, Dv, C = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_rank
        q = self.wq(x_BSD) if self.q_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x_BSD)))
        q_nope_BSHN, q_rope_BSHR = q.view(B, S, H, N + R).split((N, R), dim=-1)
        c_BSC, kr_BSR = self.wkv_a(x_BSD).split((C, R), dim=-1)
        c_BSC = self.kv_norm(c_BSC)
        q_rope_BSHR = apply_rope(q_rope_BSHR, cos, sin)
        kr_BS1R = apply_rope(kr_BSR.unsqueeze(2), cos, sin)
        if kv is None:
            mask, causal = None, True
        else:
            c_BSC, kr_BS1R = kv.append(c_BSC, kr_BS1R)  # now all L = pos + S cached positions
            mask, causal = causal_mask(S, c_BSC.shape[1], x_BSD.device), False
        L = c_BSC.shape[1]
        k_nope_BLHN, v_BLHDv = self.wkv_b(c_BSC).view(B, L, H, N + Dv).split((N, Dv), dim=-1)
        q_BSHQ = torch.cat((q_nope_BSHN, q_rope_BSHR), dim=-1)
        k_BLHQ = torch.cat((k_nope_BLHN, kr_BS1R.to(k_nope_BLHN.dtype).expand(B, L, H, R)), dim=-1)
        out_BHSDv = F.scaled_dot_product_attention(
            q_BSHQ.transpose(1, 2), k_BLHQ.transpose(1, 2), v_BLHDv.transpose(1, 2),
            attn_mask=mask, is_causal=causal, scale=self.scale)
        return self.wo(out_BHSDv.transpose(1, 2).reshape(B, S, H * Dv))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        ins = (self.wq,) if self.q_rank == 0 else (self.wq_a, self.wq_b)
        for lin in ins + (self.wkv_a, self.wkv_b):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)
        self.kv_norm.reset_parameters()
        if self.q_rank:
            self.q_norm.reset_parameters()
