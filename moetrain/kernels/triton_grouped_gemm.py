"""Triton grouped GEMM: rows grouped by expert times that expert's weight, and the per-expert weight gradient.

Legend: R rows (grouped by expert, contiguous), E experts, Kd reduction dim, N output dim.

    y_RN[rows of e]  = x_RKd[rows of e] @ w_EKdN[e]                    grouped_mm_kernel
    dw_EKdN[e]       = x_RKd[rows of e]^T @ dy_RN[rows of e]          grouped_wgrad_kernel (zeros for an empty e)

grouped_mm_kernel runs one program per (row tile, N block); the host builds the tile table (expert of each tile and
its first row), so an expert with few rows costs one partial tile and an empty expert costs nothing. The weight
gradient runs one program per (expert, Kd block, N block) and loops over that expert's rows. fp32 accumulation.
Used on GPUs where torch._grouped_mm does not apply (fp32, or before sm90); on CPU the tests run these kernels in the
Triton interpreter against the torch loop.

Operand precision (DOT_FP32, chosen by the host, kernels/grouped_gemm.py): bf16/fp16 operands go to tl.dot as they
are (tensor cores, fp32 accumulator); fp32 operands are multiplied in exact fp32 (`input_precision="ieee"`, no TF32).
The interpreter also takes the fp32 branch for bf16 operands, because its tl.dot does not convert bf16: upcasting
bf16 to fp32 is exact, so the result is the same sum of products.
"""

import triton
import triton.language as tl


@triton.jit
def grouped_mm_kernel(x_ptr, w_ptr, y_ptr, tile_expert_ptr, tile_row_ptr, offs_ptr, Kd, N,
                      stride_xr, stride_we, stride_wk, stride_wn, stride_yr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    row_end = tl.load(offs_ptr + e)  # end of expert e's rows (inclusive cumsum)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < row_end
    col_ok = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, Kd, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < Kd
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xr + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)  # bf16/fp16 operands, fp32 accumulator
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def grouped_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, offs_ptr, Kd, N, stride_xr, stride_dyr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    e = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = ks < Kd
    col_ok = cols < N
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        xt = tl.load(x_ptr + rows[None, :].to(tl.int64) * stride_xr + ks[:, None],
                     mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        g = tl.load(dy_ptr + rows[:, None].to(tl.int64) * stride_dyr + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(xt.to(tl.float32), g.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, g)  # bf16/fp16 operands, fp32 accumulator
    tl.store(dw_ptr + e.to(tl.int64) * Kd * N + ks[:, None] * N + cols[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=k_ok[:, None] & col_ok[None, :])
