"""Rotary position embeddings (RoPE), optionally with YaRN scaling.

Legend: B batch, S sequence, H heads, Dh head dim (the rotated dims: Dh for gqa, qk_rope_head_dim for mla), P = Dh/2.

For position p and pair index i: theta_i = base^(-2i/Dh); the interleaved pair (x_2i, x_2i+1) is rotated by the angle
p * theta_i. (Hugging Face's Llama-family code rotates the halves (x_i, x_{i+P}) instead; a converter maps one onto the
other by permuting the rows of the q/k projections per head: the attention scores are the same.)

YaRN (model.rope_scaling=yarn, factor s, original length L0, beta_fast a, beta_slow b), as in Hugging Face's
`_compute_yarn_parameters`:
    find_dim(r)   = Dh * ln(L0 / (2 pi r)) / (2 ln base)                # the pair index that turns r times over L0
    low, high     = max(floor(find_dim(a)), 0), min(ceil(find_dim(b)), Dh - 1)   (high += 0.001 when equal)
    ramp_i        = clamp((i - low) / (high - low), 0, 1)                 # 0: keep (extrapolate), 1: interpolate
    inv_freq_i    = theta_i / s * ramp_i + theta_i * (1 - ramp_i)
    mscale(s, m)  = 0.1 * m * ln(s) + 1   (1 when s <= 1)
    cos, sin     *= mscale(s, mscale) / mscale(s, mscale_all_dim)  when both are non-zero, else mscale(s, 1)
MLA also multiplies its softmax scale by mscale(s, mscale_all_dim)^2 when mscale_all_dim is non-zero (model/mla.py).
"""

from __future__ import annotations

import math

import torch

from moetrain.config.schema import ModelConfig


def rope_inv_freq(head_dim: int, base: float, device=None) -> torch.Tensor:
    """theta_i = base^(-2i/Dh), [P] fp32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(head_dim: int, base: float, factor: float, original_max_seq_len: int, beta_fast: float,
                  beta_slow: float, device=None) -> torch.Tensor:
    """inv_freq_P blended between interpolation (theta / factor) and extrapolation (theta), see the module docstring."""
    def find_dim(rotations: float) -> float:
        return head_dim * math.log(original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(find_dim(beta_fast)), 0)
    high = min(math.ceil(find_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp_P = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    pos_freq_P = base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)  # 1 / theta
    extrapolate_P = 1 - ramp_P
    return 1.0 / (factor * pos_freq_P) * (1 - extrapolate_P) + 1.0 / pos_freq_P * extrapolate_P


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """The factor cos and sin are multiplied by under yarn."""
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def rope_dim(cfg: ModelConfig) -> int:
    """The rotated dims per head: qk_rope_head_dim for mla, the head dim for gqa."""
    if cfg.attention == "mla":
        return cfg.qk_rope_head_dim
    return cfg.head_dim or cfg.dim // cfg.n_heads


def rope_tables(cfg: ModelConfig, seq_len: int, start: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SP, sin_SP for positions start .. start+seq_len-1 under the model's rope settings, fp32."""
    Dh = rope_dim(cfg)
    if cfg.rope_scaling == "yarn":
        inv_freq = yarn_inv_freq(Dh, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_seq_len,
                                 cfg.rope_beta_fast, cfg.rope_beta_slow, device)
        scale = yarn_attention_factor(cfg.rope_factor, cfg.rope_mscale, cfg.rope_mscale_all_dim)
    else:
        inv_freq, scale = rope_inv_freq(Dh, cfg.rope_theta, device), 1.0
    cos, sin = _angles_cos_sin(inv_freq, seq_len, start)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos, sin


def _angles_cos_sin(inv_freq_P: torch.Tensor, seq_len: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(start, start + seq_len, device=inv_freq_P.device, dtype=torch.float32)
    angles_SP = torch.outer(positions, inv_freq_P)
    return angles_SP.cos(), angles_SP.sin()


def apply_rope(x_BSHDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim; cos/sin are [S, Dh/2]."""
    x = x_BSHDh.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x_BSHDh)
