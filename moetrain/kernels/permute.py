"""Token permutation for the MoE hot path: rows into expert order, and the gate-weighted combine back.

Legend: T tokens, D model dim, K top-k, R routed rows (in expert / destination order, possibly with padding).

    permute   x_RD[r] = x_TD[token_idx_R[r]]                    (token_idx_R[r] == T: a zero padding row)
    combine   y_TD[t] = sum over the rows r of token t of gates_R[r] * y_RD[r]
Backward:
    d permute   dx_TD[t] = sum over the rows r of token t of dx_RD[r]
    d combine   g_RD = dy_TD[token_idx_R];  dy_RD = gates_R * g_RD;  dgates_R[r] = <g_RD[r], y_RD[r]>

Two backends behind the same two autograd functions, picked by device (`backend="auto"`):
  * torch (CPU, and any device): index_select / chunked index_add. The chunking keeps the weighted temporary small: a
    full R x D one is a fresh large allocation that glibc maps and page-faults in again every step.
  * triton (CUDA when triton is importable; the interpreter on CPU in tests): the sums over "the rows of token t" are
    gathers through the inverse map row_TK (row of copy (t, k), -1 if dropped), so no kernel needs atomics and the
    result is deterministic (kernels/triton_permute.py).

Dtypes (mixed precision, see moetrain/train/precision.py): rows travel in their own dtype (bf16 under autocast);
the sums accumulate in fp32 (at least). `combine` returns promote(y, gates) - fp32 for bf16 rows and the router's
fp32 gates, the dtype of the residual stream it is added to; the permutation's backward returns the tokens' dtype.
Every backward returns each gradient in its input's dtype; forward and backward run with autocast off (index_add,
mul and bmm would otherwise be re-cast).
"""

from __future__ import annotations

import torch

from moetrain.kernels.grouped_gemm import without_autocast

_BLOCK_D = 256
_CHUNK_BYTES = 4 << 20


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(D: int) -> int:
    return min(_BLOCK_D, 1 << max(0, (D - 1).bit_length()))


# ------------------------------------------------------------------------------------------------ primitives


def gather_rows(x_SD: torch.Tensor, idx_R: torch.Tensor, scale_R: torch.Tensor | None, backend: str) -> torch.Tensor:
    """out_RD[r] = scale_R[r] * x_SD[idx_R[r]]; rows whose idx is outside [0, S) are zero."""
    S, D = x_SD.shape
    if backend == "triton":
        from moetrain.kernels.triton_permute import gather_rows_kernel

        out = x_SD.new_empty(idx_R.shape[0], D)
        if out.numel():
            gather_rows_kernel[(idx_R.shape[0], _cdiv(D, _BLOCK_D))](
                x_SD.contiguous(), idx_R.contiguous(), scale_R.contiguous() if scale_R is not None else idx_R, out,
                S, D, HAS_SCALE=scale_R is not None, BLOCK_D=_block(D))
        return out
    padded = bool(idx_R.numel()) and int(idx_R.max()) >= S
    src = torch.cat([x_SD, x_SD.new_zeros(1, D)]) if padded else x_SD
    out = src.index_select(0, idx_R)
    return out if scale_R is None else out.mul_(scale_R.to(out.dtype)[:, None])


def sum_rows_per_token(y_RD: torch.Tensor, gates_R: torch.Tensor | None, token_idx_R: torch.Tensor,
                       row_TK: torch.Tensor | None, num_tokens: int, backend: str,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out_TD[t] = sum over the rows r of token t of gates_R[r] * y_RD[r] (unit gates when None), accumulated in fp32
    (or y's dtype when wider) and returned in `out_dtype` (default: y's dtype)."""
    D = y_RD.shape[1]
    out_dtype = out_dtype or y_RD.dtype
    if backend == "triton":
        from moetrain.kernels.triton_permute import combine_rows_kernel

        out = y_RD.new_empty(num_tokens, D, dtype=out_dtype)  # the kernel accumulates in fp32
        if out.numel():
            combine_rows_kernel[(num_tokens, _cdiv(D, _BLOCK_D))](
                y_RD.contiguous(), row_TK.contiguous(), gates_R.contiguous() if gates_R is not None else row_TK,
                out, row_TK.shape[1], D, HAS_GATE=gates_R is not None, BLOCK_D=_block(D))
        return out
    R = y_RD.shape[0]
    acc_dtype = torch.promote_types(torch.promote_types(y_RD.dtype, out_dtype), torch.float32)
    out = y_RD.new_zeros(num_tokens + 1, D, dtype=acc_dtype)  # row T collects the padding rows
    step = max(1, _CHUNK_BYTES // max(1, D * out.element_size()))
    widen = acc_dtype != y_RD.dtype  # low-precision rows: weight (or copy) each chunk into an fp32 buffer
    buf = out.new_empty(min(step, R), D) if gates_R is not None or widen else None
    for s in range(0, R, step):
        n = min(step, R - s)
        rows = y_RD[s:s + n]
        if gates_R is not None:
            rows = torch.mul(rows, gates_R[s:s + n].to(acc_dtype)[:, None], out=buf[:n])
        elif widen:
            rows = buf[:n].copy_(rows)
        out.index_add_(0, token_idx_R[s:s + n], rows)
    return out[:num_tokens].to(out_dtype)


# ------------------------------------------------------------------------------------------- autograd functions


class _Permute(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x_TD, token_idx_R, row_TK, backend):
        ctx.save_for_backward(token_idx_R, row_TK)
        ctx.backend, ctx.num_tokens, ctx.x_dtype = backend, x_TD.shape[0], x_TD.dtype
        return gather_rows(x_TD, token_idx_R, None, backend)

    @staticmethod
    @without_autocast
    def backward(ctx, dx_RD):
        token_idx_R, row_TK = ctx.saved_tensors
        return sum_rows_per_token(dx_RD.contiguous(), None, token_idx_R, row_TK, ctx.num_tokens, ctx.backend,
                                  ctx.x_dtype), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, y_RD, gates_R, token_idx_R, row_TK, num_tokens, backend):
        ctx.save_for_backward(y_RD if ctx.needs_input_grad[1] else None, gates_R, token_idx_R)
        ctx.backend, ctx.gates_dtype, ctx.y_dtype = backend, gates_R.dtype, y_RD.dtype
        return sum_rows_per_token(y_RD, gates_R, token_idx_R, row_TK, num_tokens, backend,
                                  torch.promote_types(y_RD.dtype, gates_R.dtype))

    @staticmethod
    @without_autocast
    def backward(ctx, dy_TD):
        y_RD, gates_R, token_idx_R = ctx.saved_tensors
        g_RD = gather_rows(dy_TD.contiguous(), token_idx_R, None, ctx.backend)  # dy's dtype (fp32 under bf16)
        dgates = None
        if ctx.needs_input_grad[1]:
            R, D = g_RD.shape
            y = y_RD.reshape(R, D, 1).to(g_RD.dtype)  # <g, y> in g's dtype (the combine output's: at least y's)
            dgates = torch.bmm(g_RD.view(R, 1, D), y).view(R).to(ctx.gates_dtype)
            del y
        dy = g_RD.mul_(gates_R.to(g_RD.dtype)[:, None]).to(ctx.y_dtype) if ctx.needs_input_grad[0] else None
        return dy, dgates, None, None, None, None


def permute(x_TD: torch.Tensor, token_idx_R: torch.Tensor, row_TK: torch.Tensor | None = None,
            backend: str = "auto") -> torch.Tensor:
    """x_RD = x_TD[token_idx_R] (token_idx_R == T gives a zero row). The triton backend needs row_TK."""
    return _Permute.apply(x_TD, token_idx_R, row_TK, resolve_backend(backend, x_TD.device))


def combine(y_RD: torch.Tensor, gates_R: torch.Tensor, token_idx_R: torch.Tensor, num_tokens: int,
            row_TK: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """y_TD[t] = sum over the rows r of token t of gates_R[r] * y_RD[r]; differentiable in y_RD and gates_R."""
    return _Combine.apply(y_RD, gates_R, token_idx_R, row_TK, num_tokens, resolve_backend(backend, y_RD.device))
