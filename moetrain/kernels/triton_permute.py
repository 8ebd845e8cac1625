"""Triton kernels for token permutation (see kernels/permute.py for the math and the torch reference).

Kernels live in their own file because Triton needs real source to JIT them. On CPU they run under the Triton
interpreter (TRITON_INTERPRET=1, set before this module is imported), which is how the tests exercise them.
Grid: one program per output row and block of BLOCK_D columns; indices are int64, accumulation is fp32.
"""

import triton
import triton.language as tl


@triton.jit
def gather_rows_kernel(x_ptr, idx_ptr, scale_ptr, out_ptr, num_src, D,
                       HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r, :] = scale[r] * x[idx[r], :], or zeros when idx[r] is outside [0, num_src)."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    src = tl.zeros([BLOCK_D], dtype=tl.int64) + tl.load(idx_ptr + r)
    in_row = cols < D
    valid = in_row & (src >= 0) & (src < num_src)
    v = tl.load(x_ptr + src * D + cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + r).to(tl.float32)
    tl.store(out_ptr + r.to(tl.int64) * D + cols, v.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def combine_rows_kernel(y_ptr, row_ptr, gate_ptr, out_ptr, K, D, HAS_GATE: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t, :] = sum_k gate[row] * y[row, :] with row = row[t, k], skipping row < 0 (gates are per row)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_row = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(K):
        row = tl.zeros([BLOCK_D], dtype=tl.int64) + tl.load(row_ptr + t * K + k)
        v = tl.load(y_ptr + row * D + cols, mask=in_row & (row >= 0), other=0.0).to(tl.float32)
        if HAS_GATE:
            v = v * tl.load(gate_ptr + row, mask=row >= 0, other=0.0).to(tl.float32)
        acc += v
    tl.store(out_ptr + t.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def combine_backward_kernel(dy_ptr, y_ptr, token_ptr, gate_ptr, dy_rows_ptr, dgate_ptr, num_tokens, D,
                            NEED_DY: tl.constexpr, NEED_DGATE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r: g = dy[token[r], :] (zeros for a padding row, token outside [0, num_tokens)); dy_rows[r, :] = gate[r] * g;
    dgate[r] = sum_d g * y[r, :]. One program per row, looping over D in blocks of BLOCK_D."""
    r = tl.program_id(0)
    t = tl.zeros([BLOCK_D], dtype=tl.int64) + tl.load(token_ptr + r)
    valid = (t >= 0) & (t < num_tokens)
    gate = tl.load(gate_ptr + r).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_row = cols < D
        g = tl.load(dy_ptr + t * D + cols, mask=in_row & valid, other=0.0).to(tl.float32)
        if NEED_DGATE:
            acc += g * tl.load(y_ptr + r.to(tl.int64) * D + cols, mask=in_row, other=0.0).to(tl.float32)
        if NEED_DY:
            tl.store(dy_rows_ptr + r.to(tl.int64) * D + cols, (g * gate).to(dy_rows_ptr.dtype.element_ty),
                     mask=in_row)
    if NEED_DGATE:
        tl.store(dgate_ptr + r, tl.sum(acc, axis=0).to(dgate_ptr.dtype.element_ty))
