"""Dense SwiGLU feed-forward: y = (silu(x W1) * (x W3)) W2.

Legend: T tokens, D model dim, F hidden dim.
"""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_TD)) * self.w3(x_TD))

    def reset_parameters(self, init_std: float, out_std: float) -> None:
        for lin, std in ((self.w1, init_std), (self.w3, init_std), (self.w2, out_std)):
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
