"""Routed experts: L local SwiGLU experts stored as stacked weights, computed dropless by a grouped GEMM.

Legend: R routed rows on this rank (grouped by local expert), D model dim, F expert hidden dim, L local experts.

    h_RF = silu(x_RD @ w1_LDF[e]) * (x_RD @ w3_LDF[e]);   y_RD = h_RF @ w2_LFD[e]     for the rows of expert e

The parameters keep the global names `w1_EDF`, `w3_EDF`, `w2_EFD` (their dim 0 holds this rank's experts) and carry
`expert_ids`, the global expert id of each row, which checkpoints and gradient synchronisation use. Each expert is
initialised from its own generator seeded by (seed, layer, global id), so the weights of an expert do not depend on
how experts are split over ranks.

Mixed precision: the weights stay fp32 (master weights); under autocast the grouped GEMM computes on bf16 copies of
them and of the rows, accumulating in fp32, and the weight gradients arrive in fp32 (kernels/grouped_gemm.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moetrain.kernels.grouped_gemm import ChunkWeightGrads, grouped_swiglu
from moetrain.moe.dispatch import NoStepState


class GroupedExperts(NoStepState, nn.Module):
    """Per-step hooks (moe/dispatch.py): none for local experts; FSSDP's ShardedExperts overrides them."""

    def __init__(self, dim: int, hidden: int, expert_ids: list[int], backend: str = "auto"):
        super().__init__()
        L = len(expert_ids)
        self.expert_ids, self.backend = list(expert_ids), backend
        self.w1_EDF = nn.Parameter(torch.empty(L, dim, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(L, dim, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(L, hidden, dim))
        for p in self.parameters():
            p.expert_ids = self.expert_ids

    @contextmanager
    def materialize(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The stacked weights of the experts this rank computes (here: its own), for the duration of a forward."""
        yield self.w1_EDF, self.w3_EDF, self.w2_EFD

    def compute(self, x_RD: torch.Tensor, tokens_per_expert_L: torch.Tensor, weights, experts: slice = slice(None),
                chunks: Optional[ChunkWeightGrads] = None) -> torch.Tensor:
        """The experts `experts` (a slice of the materialized ones) on rows grouped by expert. The pipeline chunks of
        one forward pass one shared `chunks` (ChunkWeightGrads): their weight gradients are then written into one
        full-size gradient per weight (kernels/grouped_gemm.py) instead of autograd adding up a gradient per chunk
        (split by tokens) or concatenating the slices' gradients (split by experts)."""
        w1, w3, w2 = weights
        return swiglu_experts(x_RD, tokens_per_expert_L, w1, w3, w2, self.backend, experts, chunks)

    def forward(self, x_RD: torch.Tensor, tokens_per_expert_L: torch.Tensor) -> torch.Tensor:
        with self.materialize() as weights:
            return self.compute(x_RD, tokens_per_expert_L, weights)

    @torch.no_grad()
    def reset_parameters(self, init_std: float, out_std: float, seed: int, layer_id: int) -> None:
        for i, gid in enumerate(self.expert_ids):
            g = torch.Generator().manual_seed(seed * 1_000_003 + layer_id * 10_007 + gid)
            for w, std in ((self.w1_EDF, init_std), (self.w3_EDF, init_std), (self.w2_EFD, out_std)):
                cpu = torch.empty(w.shape[1:], dtype=torch.float32)
                nn.init.trunc_normal_(cpu, std=std, a=-3 * std, b=3 * std, generator=g)
                w[i].copy_(cpu)


def swiglu_experts(x_RD, tokens_per_expert_L, w1_EDF, w3_EDF, w2_EFD, backend: str = "auto",
                   experts: slice = slice(None), chunks: Optional[ChunkWeightGrads] = None) -> torch.Tensor:
    """The grouped SwiGLU of the module docstring on given stacked weights (rows grouped by expert).

    One fused autograd function (kernels/grouped_gemm.py): the same math as three `grouped_mm` calls, fewer passes
    over the activations in backward and fewer saved activations.
    """
    return grouped_swiglu(x_RD, w1_EDF, w3_EDF, w2_EFD, tokens_per_expert_L, backend, experts, chunks)


def reference_experts(x_RD: torch.Tensor, tokens_per_expert_L: torch.Tensor, w1_EDF, w3_EDF, w2_EFD) -> torch.Tensor:
    """The simple per-expert loop the grouped GEMM is tested against."""
    outs, start = [], 0
    for e, n in enumerate(tokens_per_expert_L.tolist()):
        x = x_RD[start:start + n]
        outs.append((F.silu(x @ w1_EDF[e]) * (x @ w3_EDF[e])) @ w2_EFD[e])
        start += n
    return torch.cat(outs) if outs else x_RD.new_zeros(0, w2_EFD.shape[-1])
