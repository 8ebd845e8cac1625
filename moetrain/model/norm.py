"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32.

The output has the input's dtype, except under autocast, where it has the autocast dtype (bf16): the norm is where
the fp32 residual stream enters the low-precision compute of the attention and the FFN, so the tokens an MoE layer
dispatches are already bf16 (moetrain/train/precision.py). Autocast would not do this by itself: the norm's ops are
elementwise and keep the fp32 residual's dtype.
"""

import torch
from torch import nn

from moetrain.kernels.grouped_gemm import autocast_dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x = x_TD.float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(autocast_dtype(x_TD) or x_TD.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
