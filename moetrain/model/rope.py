"""Rotary position embeddings (RoPE).

Legend: B batch, S sequence, H heads, Dh head dim.
For position p and pair index i: theta_i = base^(-2i/Dh); (x_2i, x_2i+1) is rotated by angle p * theta_i.
"""

import torch


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SH2, sin_SH2 of shape [S, Dh/2] in fp32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x_BSHDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim; cos/sin are [S, Dh/2]."""
    x = x_BSHDh.float().unflatten(-1, (-1, 2))
    x0, x1 = x[..., 0], x[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x_BSHDh)
