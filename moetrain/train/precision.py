"""Mixed precision: which compute dtype a run uses, decided once from `parallel.mixed_precision` and the device.

    fp32   everything in fp32 (no autocast)
    bf16   torch.autocast(device, bfloat16) around the forward and the loss, on CUDA and on CPU alike
    auto   bf16 on CUDA, fp32 elsewhere (CPU: bf16 matmuls are far slower there than fp32 ones)

What bf16 means for each part (autocast covers the dense layers; the MoE path is cast explicitly, see below):
  * master weights, gradients and optimizer state stay fp32 (parameters are never converted: each matmul casts its
    own bf16 copy, as autocast does, and the gradient flows back through the cast into the fp32 parameter);
  * the router runs with autocast off: logits, scores, gates and the balancing bias are fp32, so are the router
    losses; the logits of the LM head are returned in fp32 and the cross-entropy is computed in fp32;
  * RMSNorm computes in fp32 and returns the autocast dtype (moetrain/model/norm.py);
  * the MoE layer casts the tokens to the autocast dtype before dispatch (moetrain/moe/layer.py): the permutation,
    the all-to-all payload (both directions, and its backward) and the grouped GEMM are bf16; the grouped GEMM casts
    the expert weights to bf16 and accumulates in fp32 (torch._grouped_mm on sm90+, Triton elsewhere on CUDA, a loop
    of torch.mm on CPU); the gate-weighted combine accumulates in fp32 and returns fp32, the residual stream's dtype.
With data_parallel=fsdp the same key also sets FSDP2's MixedPrecisionPolicy (bf16 parameter all-gather, fp32
gradient reduction: moetrain/parallel/fsdp.py); its `auto` follows the same rule as here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Optional

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(cfg, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of this run (torch.bfloat16), or None for plain fp32. `cfg` is the TrainConfig (or its
    ParallelConfig)."""
    parallel = getattr(cfg, "parallel", cfg)
    choice = parallel.mixed_precision
    if choice not in PRECISIONS:
        raise ValueError(f"parallel.mixed_precision={choice!r}: use one of {', '.join(PRECISIONS)}")
    if choice == "auto":  # the same rule as FSDP2's policy (moetrain/parallel/fsdp.py)
        choice = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return torch.bfloat16 if choice == "bf16" else None


def autocast_context(dtype: Optional[torch.dtype], device: torch.device) -> AbstractContextManager:
    """The context the forward and the loss run in: torch.autocast(device.type, dtype) or a no-op for fp32.
    Re-entrant one use at a time (the trainer keeps one and enters it for every micro-batch)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def precision_context(cfg, device: torch.device) -> AbstractContextManager:
    """autocast_context(resolve_precision(cfg, device), device)."""
    return autocast_context(resolve_precision(cfg, device), device)
