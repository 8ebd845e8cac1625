"""Token permutation for the MoE hot path: rows into expert order, and the gate-weighted combine back.

Legend: T tokens, D model dim, K top-k, R routed rows (in expert / destination order, possibly with padding).

    permute   x_RD[r]  = x_TD[token_idx_R[r]]                        (token_idx_R[r] == T: a zero padding row)
    combine   y_TD[t]  = sum_k gates_TK[t, k] * y_RD[row_TK[t, k]]     (row_TK[t, k] == -1: the copy was dropped)
Backward, both again gathers (no atomics, so results are deterministic on every device):
    d permute:   dx_TD[t]  = sum_k dx_RD[row_TK[t, k]]                = combine with unit gates
    d combine:   dy_RD[r]  = gates_R[r] * dy_TD[token_idx_R[r]]         = permute scaled by the row's gate
                 dgates_TK[t, k] = <dy_TD[t], y_RD[row_TK[t, k]]>

Two backends with one autograd function each: `torch` (index_select / gather + sum; any device, and the reference)
and `triton` (kernels/triton_permute.py). `backend="auto"` picks Triton on CUDA when it is importable, torch otherwise.
"""

from __future__ import annotations

import torch

_BLOCK_D = 256


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - triton is optional
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown permutation backend {backend!r}; use auto, torch or triton")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


# ------------------------------------------------------------------------------------------------ primitives


def gather_rows(x_SD: torch.Tensor, idx_R: torch.Tensor, scale_R: torch.Tensor | None, backend: str) -> torch.Tensor:
    """out_RD[r] = scale_R[r] * x_SD[idx_R[r]]; rows with idx outside [0, S) are zero."""
    S, D = x_SD.shape
    if backend == "triton":
        from moetrain.kernels.triton_permute import gather_rows_kernel

        out = x_SD.new_empty(idx_R.shape[0], D)
        if out.numel():
            grid = (idx_R.shape[0], triton_cdiv(D, _BLOCK_D))
            gather_rows_kernel[grid](x_SD.contiguous(), idx_R.contiguous(),
                                     scale_R.contiguous() if scale_R is not None else idx_R, out, S, D,
                                     HAS_SCALE=scale_R is not None, BLOCK_D=min(_BLOCK_D, _pow2(D)))
        return out
    valid_R = (idx_R >= 0) & (idx_R < S)
    out = x_SD.index_select(0, idx_R.clamp(0, max(S - 1, 0))) if S else x_SD.new_zeros(idx_R.shape[0], D)
    weight = valid_R.to(x_SD.dtype) if scale_R is None else scale_R.to(x_SD.dtype) * valid_R
    return out * weight[:, None]


def combine_rows(y_RD: torch.Tensor, row_TK: torch.Tensor, gates_TK: torch.Tensor | None, backend: str) -> torch.Tensor:
    """out_TD[t] = sum_k gates_TK[t, k] * y_RD[row_TK[t, k]] (row -1 skipped; unit gates when None)."""
    T, K = row_TK.shape
    D = y_RD.shape[1]
    if backend == "triton":
        from moetrain.kernels.triton_permute import combine_rows_kernel

        out = y_RD.new_empty(T, D)
        if out.numel():
            grid = (T, triton_cdiv(D, _BLOCK_D))
            combine_rows_kernel[grid](y_RD.contiguous(), row_TK.contiguous(),
                                      gates_TK.contiguous() if gates_TK is not None else row_TK, out, K, D,
                                      HAS_GATE=gates_TK is not None, BLOCK_D=min(_BLOCK_D, _pow2(D)))
        return out
    valid_TK = row_TK >= 0
    picked_TKD = y_RD.index_select(0, row_TK.clamp(min=0).flatten()).view(T, K, D) if y_RD.shape[0] \
        else y_RD.new_zeros(T, K, D)
    weight_TK = valid_TK.to(y_RD.dtype) if gates_TK is None else gates_TK.to(y_RD.dtype) * valid_TK
    return (picked_TKD * weight_TK[..., None]).sum(1)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------------- autograd functions


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_idx_R, row_TK, backend):
        ctx.save_for_backward(row_TK)
        ctx.backend = backend
        return gather_rows(x_TD, token_idx_R, None, backend)

    @staticmethod
    def backward(ctx, dx_RD):
        (row_TK,) = ctx.saved_tensors
        return combine_rows(dx_RD.contiguous(), row_TK, None, ctx.backend), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD, gates_TK, row_TK, token_idx_R, gates_R, backend):
        ctx.save_for_backward(y_RD, row_TK, token_idx_R, gates_R)
        ctx.backend = backend
        return combine_rows(y_RD, row_TK, gates_TK, backend)

    @staticmethod
    def backward(ctx, dy_TD):
        y_RD, row_TK, token_idx_R, gates_R = ctx.saved_tensors
        dy_TD = dy_TD.contiguous()
        dy_RD = dgates_TK = None
        if ctx.needs_input_grad[0]:
            dy_RD = gather_rows(dy_TD, token_idx_R, gates_R, ctx.backend)
        if ctx.needs_input_grad[1]:
            T, K = row_TK.shape
            picked_TKD = gather_rows(y_RD, row_TK.flatten(), None, ctx.backend).view(T, K, -1)
            dgates_TK = (picked_TKD.float() * dy_TD.float()[:, None, :]).sum(-1)
        return dy_RD, dgates_TK, None, None, None, None


def permute(x_TD: torch.Tensor, token_idx_R: torch.Tensor, row_TK: torch.Tensor, backend: str = "auto"):
    """x_RD = x_TD[token_idx_R] (token_idx_R == T gives a zero row); see the module docstring."""
    return _Permute.apply(x_TD, token_idx_R, row_TK, resolve_backend(backend, x_TD.device))


def combine(y_RD: torch.Tensor, gates_TK: torch.Tensor, gates_R: torch.Tensor, row_TK: torch.Tensor,
            token_idx_R: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """y_TD[t] = sum_k gates_TK[t, k] * y_RD[row_TK[t, k]]; differentiable in y_RD and gates_TK.

    `gates_R` (the gate of each row, 0 for padding) and `token_idx_R` describe the same rows from the other side and
    serve the backward pass.
    """
    return _Combine.apply(y_RD, gates_TK, row_TK, token_idx_R, gates_R.detach(),
                          resolve_backend(backend, y_RD.device))
