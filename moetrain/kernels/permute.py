"""Token permutation for the MoE hot path: rows into expert order, and the gate-weighted combine back.

Legend: T tokens, D model dim, K top-k, R routed rows (in expert / destination order, possibly with padding).

    permute   x_RD[r] = x_TD[token_idx_R[r]]                    (token_idx_R[r] == T: a zero padding row)
    combine   y_TD[t] = sum over the rows r of token t of gates_R[r] * y_RD[r]
Backward:
    d permute   dx_TD[t] = sum over the rows r of token t of dx_RD[r]
    d combine   g_RD = dy_TD[token_idx_R];  dy_RD = gates_R * g_RD;  dgates_R[r] = <g_RD[r], y_RD[r]>

Two backends behind the same two autograd functions, picked by device (`backend="auto"`):
  * torch (CPU, and any device): index_select / chunked index_add. The chunking keeps the weighted temporary small,
    and the large outputs live in kernels/workspace.py buffers: a fresh R x D allocation is mapped and page-faulted
    in again by glibc every step. The combine's backward is one chunked pass (`combine_backward`): gather a chunk of
    g, take its row-wise dot with y for dgates and its gate-weighted copy for dy.
  * triton (CUDA when triton is importable; the interpreter on CPU in tests): the sums over "the rows of token t" are
    gathers through the inverse map row_TK (row of copy (t, k), -1 if dropped), so no kernel needs atomics and the
    result is deterministic (kernels/triton_permute.py).

Dtypes (mixed precision, see moetrain/train/precision.py): rows travel in their own dtype (bf16 under autocast);
the sums accumulate in fp32 (at least). `combine` returns promote(y, gates) - fp32 for bf16 rows and the router's
fp32 gates, the dtype of the residual stream it is added to; the permutation's backward returns the tokens' dtype.
Every backward returns each gradient in its input's dtype; forward and backward run with autocast off (index_add
and mul would otherwise be re-cast).
"""

from __future__ import annotations

import torch

from moetrain.kernels import workspace
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


def gather_rows(x_SD: torch.Tensor, idx_R: torch.Tensor, scale_R: torch.Tensor | None, backend: str,
                name: str = "gather_rows") -> torch.Tensor:
    """out_RD[r] = scale_R[r] * x_SD[idx_R[r]]; rows whose idx is outside [0, S) are zero. The torch backend writes
    into the workspace buffer `name` (kernels/workspace.py)."""
    S, D = x_SD.shape
    if backend == "triton":
        from moetrain.kernels.triton_permute import gather_rows_kernel

        out = x_SD.new_empty(idx_R.shape[0], D)
        if out.numel():
            gather_rows_kernel[(idx_R.shape[0], _cdiv(D, _BLOCK_D))](
                x_SD.contiguous(), idx_R.contiguous(), scale_R.contiguous() if scale_R is not None else idx_R, out,
                S, D, HAS_SCALE=scale_R is not None, BLOCK_D=_block(D))
        return out
    out = workspace.empty(name, (idx_R.shape[0], D), x_SD.dtype, x_SD.device)
    outside_R = (idx_R < 0) | (idx_R >= S)
    if bool(outside_R.any()):  # padding rows: gather row 0, then zero them
        torch.index_select(x_SD, 0, idx_R.masked_fill(outside_R, 0), out=out)
        out.masked_fill_(outside_R[:, None], 0)
    else:
        torch.index_select(x_SD, 0, idx_R, out=out)
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
    out = workspace.empty("sum_rows_per_token", (num_tokens + 1, D), acc_dtype, y_RD.device).zero_()
    # (row T collects the padding rows)
    step = max(1, _CHUNK_BYTES // max(1, D * out.element_size()))
    widen = acc_dtype != y_RD.dtype  # low-precision rows: weight (or copy) each chunk into an fp32 buffer
    buf = workspace.empty("sum_rows_per_token.chunk", (min(step, R), D), acc_dtype, y_RD.device) \
        if gates_R is not None or widen else None
    for s in range(0, R, step):
        n = min(step, R - s)
        rows = y_RD[s:s + n]
        if gates_R is not None:
            rows = torch.mul(rows, gates_R[s:s + n].to(acc_dtype)[:, None], out=buf[:n])
        elif widen:
            rows = buf[:n].copy_(rows)
        out.index_add_(0, token_idx_R[s:s + n], rows)
    return out[:num_tokens].to(out_dtype)


def combine_backward(dy_TD: torch.Tensor, y_RD: torch.Tensor | None, gates_R: torch.Tensor, token_idx_R: torch.Tensor,
                     y_dtype: torch.dtype, need_dy: bool, backend: str):
    """The combine's backward in one pass over the rows, with g_RD = dy_TD[token_idx_R] (zero for a padding row):

        dy_RD[r] = gates_R[r] * g_RD[r]      (in `y_dtype`; None unless need_dy)
        dgates_R[r] = <g_RD[r], y_RD[r]>     (in promote(dy's dtype, fp32); None when y_RD is None)

    g is never materialised at full size: the torch backend gathers it chunk by chunk into a small buffer and takes
    the row-wise dot as mul + sum there (a batched R x 1 x D matmul is several times slower on CPU); the triton
    backend reads each row once in one kernel (kernels/triton_permute.py)."""
    R, D = token_idx_R.shape[0], dy_TD.shape[1]
    T = dy_TD.shape[0]
    dy_RD = workspace.empty("combine.dy", (R, D), y_dtype, dy_TD.device) if need_dy else None
    acc_dtype = torch.promote_types(dy_TD.dtype, torch.float32)  # bf16 dy (a bf16 combine output) is widened
    dgates_R = torch.empty(R, dtype=acc_dtype, device=dy_TD.device) if y_RD is not None else None
    if R == 0 or (dy_RD is None and dgates_R is None):
        return dy_RD, dgates_R
    if backend == "triton":
        from moetrain.kernels.triton_permute import combine_backward_kernel

        combine_backward_kernel[(R,)](
            dy_TD, y_RD.contiguous() if y_RD is not None else dy_TD, token_idx_R.contiguous(), gates_R.contiguous(),
            dy_RD if dy_RD is not None else dy_TD, dgates_R if dgates_R is not None else gates_R, T, D,
            NEED_DY=dy_RD is not None, NEED_DGATE=dgates_R is not None, BLOCK_D=_block(D))
        return dy_RD, dgates_R
    outside_R = token_idx_R >= T
    padded = bool(outside_R.any())
    idx_R = token_idx_R.masked_fill(outside_R, 0) if padded else token_idx_R
    step = max(1, _CHUNK_BYTES // max(1, D * torch.empty((), dtype=acc_dtype).element_size()))
    g = workspace.empty("combine.bwd.g", (min(step, R), D), dy_TD.dtype, dy_TD.device)
    g_wide = workspace.empty("combine.bwd.g_wide", (min(step, R), D), acc_dtype, dy_TD.device) \
        if acc_dtype != dy_TD.dtype else None
    prod = workspace.empty("combine.bwd.gy", (min(step, R), D), acc_dtype, dy_TD.device) \
        if dgates_R is not None else None
    for s in range(0, R, step):
        n = min(step, R - s)
        g_n = torch.index_select(dy_TD, 0, idx_R[s:s + n], out=g[:n])
        if g_wide is not None:
            g_n = g_wide[:n].copy_(g_n)
        if padded:
            g_n.masked_fill_(outside_R[s:s + n, None], 0)
        if dgates_R is not None:
            torch.sum(torch.mul(g_n, y_RD[s:s + n], out=prod[:n]), -1, out=dgates_R[s:s + n])
        if dy_RD is not None:
            torch.mul(g_n, gates_R[s:s + n].to(g_n.dtype)[:, None], out=dy_RD[s:s + n])
    return dy_RD, dgates_R


# ------------------------------------------------------------------------------------------- autograd functions


class _Permute(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x_TD, token_idx_R, row_TK, backend):
        ctx.save_for_backward(token_idx_R, row_TK)
        ctx.backend, ctx.num_tokens, ctx.x_dtype = backend, x_TD.shape[0], x_TD.dtype
        return gather_rows(x_TD, token_idx_R, None, backend, "permute.x")

    @staticmethod
    @without_autocast
    def backward(ctx, dx_RD):
        token_idx_R, row_TK = ctx.saved_tensors
        return sum_rows_per_token(dx_RD.contiguous(), None, token_idx_R, row_TK, ctx.num_tokens, ctx.backend,
                                  ctx.x_dtype), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, y_RD, gates_R, token_idx_R, row_TK, num_tokens, backend, out_dtype):
        ctx.save_for_backward(y_RD if ctx.needs_input_grad[1] else None, gates_R, token_idx_R)
        ctx.backend, ctx.gates_dtype, ctx.y_dtype = backend, gates_R.dtype, y_RD.dtype
        return sum_rows_per_token(y_RD, gates_R, token_idx_R, row_TK, num_tokens, backend,
                                  out_dtype or torch.promote_types(y_RD.dtype, gates_R.dtype))

    @staticmethod
    @without_autocast
    def backward(ctx, dy_TD):
        y_RD, gates_R, token_idx_R = ctx.saved_tensors
        dy, dgates = combine_backward(dy_TD.contiguous(), y_RD, gates_R, token_idx_R, ctx.y_dtype,
                                      ctx.needs_input_grad[0], ctx.backend)
        return dy, dgates.to(ctx.gates_dtype) if dgates is not None else None, None, None, None, None, None


def permute(x_TD: torch.Tensor, token_idx_R: torch.Tensor, row_TK: torch.Tensor | None = None,
            backend: str = "auto") -> torch.Tensor:
    """x_RD = x_TD[token_idx_R] (token_idx_R == T gives a zero row). The triton backend needs row_TK."""
    return _Permute.apply(x_TD, token_idx_R, row_TK, resolve_backend(backend, x_TD.device))


def combine(y_RD: torch.Tensor, gates_R: torch.Tensor, token_idx_R: torch.Tensor, num_tokens: int,
            row_TK: torch.Tensor | None = None, backend: str = "auto",
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y_TD[t] = sum over the rows r of token t of gates_R[r] * y_RD[r]; differentiable in y_RD and gates_R.
    Accumulated in fp32 (at least), returned in `out_dtype` (default promote(y, gates)); with a narrower out_dtype
    (bf16 sums sent back over the wire) the backward still takes the gate gradient in fp32."""
    return _Combine.apply(y_RD, gates_R, token_idx_R, row_TK, num_tokens, resolve_backend(backend, y_RD.device),
                          out_dtype)
