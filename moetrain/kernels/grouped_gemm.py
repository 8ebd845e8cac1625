"""Grouped GEMM for dropless experts: rows of x are grouped by expert, each group times its own weight.

Legend: R routed rows (grouped by expert, contiguous), E groups (experts), D in features, F out features.

    y_RF[offs[e-1]:offs[e]] = x_RD[offs[e-1]:offs[e]] @ w_EDF[e]          (offs = cumsum(tokens_per_expert_E))

Backward:  dx_RD = grouped(dy_RF, w_EDF^T),   dw_EDF[e] = x_e^T @ dy_e   (zeros for an empty group).

Two backends share one autograd function: `torch._grouped_mm` (CPU fp32/bf16 in torch >= 2.8, and CUDA bf16 on
sm90+), and a loop of `torch.mm` per group (any device/dtype, and the reference the tests compare against).
`torch._grouped_mm` needs 16-byte aligned strides; shapes that are not fall back to the loop. The explicit backward
also sidesteps a torch 2.13 CPU bug where `_grouped_mm`'s own backward fails on a stride-0 incoming gradient.
"""

from __future__ import annotations

import torch


def _aligned(*tensors: torch.Tensor) -> bool:
    return all((t.shape[-1] * t.element_size()) % 16 == 0 for t in tensors)


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether torch._grouped_mm can run this problem on this device."""
    if not hasattr(torch, "_grouped_mm") or not _aligned(x, w) or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return False


def _offsets(tokens_per_group_E: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(tokens_per_group_E, 0).to(torch.int32)


def _forward(x_RD, w_EDF, counts: list[int], offs_E, use_gmm: bool) -> torch.Tensor:
    if use_gmm:
        return torch._grouped_mm(x_RD, w_EDF, offs=offs_E)
    out_RF = x_RD.new_empty(x_RD.shape[0], w_EDF.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_RD[start:start + n], w_EDF[e], out=out_RF[start:start + n])
        start += n
    return out_RF


def _weight_grad(x_RD, dy_RF, counts: list[int], offs_E, use_gmm: bool) -> torch.Tensor:
    """dw_EDF[e] = x_e^T @ dy_e."""
    if use_gmm:
        return torch._grouped_mm(x_RD.t(), dy_RF, offs=offs_E)
    dw_EDF = dy_RF.new_zeros(len(counts), x_RD.shape[1], dy_RF.shape[1])
    start = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(x_RD[start:start + n].t(), dy_RF[start:start + n], out=dw_EDF[e])
        start += n
    return dw_EDF


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_EDF, tokens_per_group_E, backend):
        counts = tokens_per_group_E.tolist()
        offs_E = _offsets(tokens_per_group_E)
        use_gmm = x_RD.shape[0] > 0 and (
            backend == "grouped_mm" or (backend == "auto" and grouped_mm_supported(x_RD, w_EDF)))
        ctx.save_for_backward(x_RD, w_EDF, offs_E)
        ctx.counts, ctx.use_gmm = counts, use_gmm
        return _forward(x_RD, w_EDF, counts, offs_E, use_gmm)

    @staticmethod
    def backward(ctx, dy_RF):
        x_RD, w_EDF, offs_E = ctx.saved_tensors
        dy_RF = dy_RF.contiguous()
        dx_RD = dw_EDF = None
        if ctx.needs_input_grad[0]:
            dx_RD = _forward(dy_RF, w_EDF.transpose(-2, -1), ctx.counts, offs_E, ctx.use_gmm)
        if ctx.needs_input_grad[1]:
            dw_EDF = _weight_grad(x_RD, dy_RF, ctx.counts, offs_E, ctx.use_gmm)
        return dx_RD, dw_EDF, None, None


def grouped_mm(x_RD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_group_E: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """y_RF = per-group x @ w (see module docstring). backend: auto | grouped_mm | loop.

    `tokens_per_group_E` must sum to R; a group may be empty (its weight gradient is zero).
    """
    if backend not in ("auto", "grouped_mm", "loop"):
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; use auto, grouped_mm or loop")
    w_EDF = w_EDF.to(x_RD.dtype)
    return _GroupedMM.apply(x_RD, w_EDF, tokens_per_group_E, backend)
