"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x = x_TD.float()
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x_TD)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
