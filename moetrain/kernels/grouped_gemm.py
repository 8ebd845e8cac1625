"""Grouped GEMM for dropless experts: rows of x are grouped by expert, each group times its own weight.

Legend: R routed rows (grouped by expert, contiguous), E groups (experts), D in features, F out features.

    y_RF[offs[e-1]:offs[e]] = x_RD[offs[e-1]:offs[e]] @ w_EDF[e]          (offs = cumsum(tokens_per_expert_E))

Backward:  dx_RD = grouped(dy_RF, w_EDF^T),   dw_EDF[e] = x_e^T @ dy_e   (zeros for an empty group).

Memory: the loop backend writes its outputs and temporaries into kernels/workspace.py buffers (kept across steps on
CPU, the caching allocator on CUDA), and zero-fills only an empty group's weight gradient: every other group's is
written once by its GEMM.

Three backends share one autograd function: `torch._grouped_mm` (CPU fp32/bf16 in torch >= 2.8, and CUDA bf16 on
sm90+), the Triton kernels of triton_grouped_gemm.py (CUDA where _grouped_mm does not apply: fp32, older GPUs), and a
loop of `torch.mm` per group writing into slices of one output (any device/dtype, and the reference the tests
compare against). `auto` takes `torch._grouped_mm` on CUDA and the loop on CPU: on CPU (torch 2.13, fp32, one
thread) both run every GEMM of the expert forward and backward at the same rate, within 1-2%, from 8 to 2048 rows per
group (bench/README.md), and the loop also takes strided operands and outputs without copies. `torch._grouped_mm`
needs 16-byte aligned strides; shapes that are not fall back to the loop. The explicit backward also sidesteps a
torch 2.13 CPU bug where `_grouped_mm`'s own backward fails on a stride-0 incoming gradient.

`grouped_swiglu` is the whole expert MLP, y = grouped(silu(grouped(x, w1)) * grouped(x, w3), w2), as ONE autograd
function: it saves x, h1, h3 (and the weights) instead of the five activations autograd keeps, recomputes
silu(h1) in backward, writes dh3 in place of dh, and accumulates dx = dh1 @ w1^T + dh3 @ w3^T with one addmm per
group instead of a separate add over all rows; the pipeline chunks of one layer write their weight gradients into
one buffer per weight (ChunkWeightGrads) instead of autograd adding up one full-size gradient per chunk.

Mixed precision. Both entry points behave like an autocast matmul: under torch.autocast (any device) the rows and
the weights are cast to the autocast dtype (bf16), otherwise the weights to the rows' dtype. `grouped_mm` casts the
weights before its autograd function (the fp32 master weights receive fp32 gradients through the cast's backward);
`grouped_swiglu` casts them inside, once for all the pipeline chunks of a layer, and builds their gradient in the
master weights' dtype (ChunkWeightGrads). Every gradient returned has its input's dtype. Forward and backward run
with autocast off (torch.amp.custom_fwd/custom_bwd would do the same, but they bind one device type at definition
time and these functions serve CPU and CUDA), so nothing inside is re-cast behind their back. Every backend
accumulates in fp32: torch._grouped_mm and torch.mm do for bf16 operands, and the Triton kernels feed bf16 operands
to tl.dot (tensor cores, fp32 accumulator) and use exact fp32 (`input_precision="ieee"`) only for fp32 operands.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from moetrain.kernels import workspace


def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is enabled for x's device type and x is floating point, else None."""
    device_type = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(device_type) \
            and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def without_autocast(fn):
    """Run an autograd Function's forward/backward with autocast off on the device of its first tensor argument."""
    @functools.wraps(fn)
    def run(ctx, *args):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
            return fn(ctx, *args)
        with torch.autocast(device_type, enabled=False):
            return fn(ctx, *args)

    return run


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


BACKENDS = ("auto", "grouped_mm", "triton", "loop")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - triton is optional
        return False
    return True


def _choose_impl(backend: str, x: torch.Tensor, w: torch.Tensor) -> str:
    """grouped_mm | triton | loop. auto: torch._grouped_mm where CUDA supports it, else the Triton kernels on CUDA,
    else the loop (CPU: same speed as _grouped_mm, see above)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if x.shape[0] == 0:
        return "loop"
    if backend != "auto":
        return backend
    if x.device.type == "cuda":
        if grouped_mm_supported(x, w):
            return "grouped_mm"
        if _triton_available():
            return "triton"
    return "loop"


def _pow2_block(n: int, cap: int = 64) -> int:
    return max(16, min(cap, 1 << max(0, (n - 1).bit_length())))


def _dot_fp32(kernel, dtype: torch.dtype) -> bool:
    """Whether the Triton kernel multiplies in exact fp32: for fp32 operands, and under the Triton interpreter, whose
    tl.dot does not convert bf16 operands (it multiplies their bit patterns; the tests run there). fp32 products of
    bf16 values are exact, so both ways compute the same sum of products as the tensor cores (bf16 in, fp32 acc)."""
    if dtype == torch.float32:
        return True
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # noqa: BLE001 - older triton: no interpreter class to test for
        return False
    return isinstance(kernel, InterpretedFunction)


def _triton_forward(x_RD: torch.Tensor, w_EDF: torch.Tensor, counts: list[int], offs_E: torch.Tensor) -> torch.Tensor:
    from moetrain.kernels.triton_grouped_gemm import grouped_mm_kernel

    x_RD = x_RD.contiguous()
    R, Kd = x_RD.shape
    N = w_EDF.shape[-1]
    BM, BN, BK = _pow2_block(max(counts)), _pow2_block(N), _pow2_block(Kd)
    tile_expert, tile_row, start = [], [], 0
    for e, n in enumerate(counts):  # one tile per BM rows of each expert: empty experts get none
        tile_expert += [e] * -(-n // BM)
        tile_row += list(range(start, start + n, BM))
        start += n
    y_RN = x_RD.new_empty(R, N)
    device = x_RD.device
    grouped_mm_kernel[(len(tile_expert), -(-N // BN))](
        x_RD, w_EDF, y_RN, torch.tensor(tile_expert, device=device), torch.tensor(tile_row, device=device),
        offs_E.to(device=device, dtype=torch.int64), Kd, N, x_RD.stride(0), w_EDF.stride(0), w_EDF.stride(1),
        w_EDF.stride(2), y_RN.stride(0), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
        DOT_FP32=_dot_fp32(grouped_mm_kernel, x_RD.dtype))
    return y_RN


def _triton_weight_grad(x_RD: torch.Tensor, dy_RN: torch.Tensor, counts: list[int], offs_E) -> torch.Tensor:
    from moetrain.kernels.triton_grouped_gemm import grouped_wgrad_kernel

    x_RD, dy_RN = x_RD.contiguous(), dy_RN.contiguous()
    Kd, N = x_RD.shape[1], dy_RN.shape[1]
    BM, BN, BK = _pow2_block(max(counts)), _pow2_block(N), _pow2_block(Kd)
    dw = dy_RN.new_empty(len(counts), Kd, N)
    grouped_wgrad_kernel[(len(counts), -(-Kd // BK), -(-N // BN))](
        x_RD, dy_RN, dw, offs_E.to(device=x_RD.device, dtype=torch.int64), Kd, N, x_RD.stride(0), dy_RN.stride(0),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, DOT_FP32=_dot_fp32(grouped_wgrad_kernel, x_RD.dtype))
    return dw


def _scratch(name: str, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like `like` from the workspace buffer `name` (kernels/workspace.py)."""
    return workspace.empty(name, like.shape, like.dtype, like.device)


def _offsets(tokens_per_group_E: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(tokens_per_group_E, 0).to(torch.int32)


def _forward(x_RD, w_EDF, counts: list[int], offs_E, impl: str, name: str = "grouped_mm.y", accumulate_into=None,
             out=None) -> torch.Tensor:
    """out_RF = grouped(x_RD, w_EDF), into `out` if given (loop), else into the workspace buffer `name` (loop) or a
    fresh tensor (the other backends allocate their own); with accumulate_into, += in place (and returned)."""
    if impl in ("grouped_mm", "triton"):
        y_RF = torch._grouped_mm(x_RD, w_EDF, offs=offs_E) if impl == "grouped_mm" \
            else _triton_forward(x_RD, w_EDF, counts, offs_E)
        return y_RF if accumulate_into is None else accumulate_into.add_(y_RF)
    if accumulate_into is not None:
        out_RF = accumulate_into
    else:
        out_RF = out if out is not None else \
            workspace.empty(name, (x_RD.shape[0], w_EDF.shape[-1]), x_RD.dtype, x_RD.device)
    start = 0
    for e, n in enumerate(counts):
        if n:
            if accumulate_into is None:
                torch.mm(x_RD[start:start + n], w_EDF[e], out=out_RF[start:start + n])
            else:
                out_RF[start:start + n].addmm_(x_RD[start:start + n], w_EDF[e])
        start += n
    return out_RF


def _weight_grad(x_RD, dy_RF, counts: list[int], offs_E, impl: str, name: str = "grouped_mm.dw",
                 exact: bool = True) -> torch.Tensor:
    """dw_EDF[e] = x_e^T @ dy_e; zeros for an empty group (the loop writes every other group once, so only the
    empty groups are zero-filled)."""
    if impl == "grouped_mm":
        return torch._grouped_mm(x_RD.t(), dy_RF, offs=offs_E)
    if impl == "triton":
        return _triton_weight_grad(x_RD, dy_RF, counts, offs_E)
    # exact (unless a scratch result): the gradient becomes the parameter's .grad and lives until the optimizer has
    # stepped.
    dw_EDF = workspace.empty(name, (len(counts), x_RD.shape[1], dy_RF.shape[1]), dy_RF.dtype, dy_RF.device,
                             exact=exact)
    return _loop_weight_grad_into(dw_EDF, x_RD, dy_RF, counts)


def _loop_weight_grad_into(dw_EDF, x_RD, dy_RF, counts: list[int], accumulate: Optional[list[bool]] = None):
    """The loop backend's weight gradient, in place: dw_EDF[e] = x_e^T @ dy_e (zeros for an empty group), or
    dw_EDF[e] += x_e^T @ dy_e (one addmm) where accumulate[e] says the group already holds a gradient."""
    start = 0
    for e, n in enumerate(counts):
        if accumulate is not None and accumulate[e]:
            if n:
                dw_EDF[e].addmm_(x_RD[start:start + n].t(), dy_RF[start:start + n])
        elif n:
            torch.mm(x_RD[start:start + n].t(), dy_RF[start:start + n], out=dw_EDF[e])
        else:
            dw_EDF[e].zero_()
        start += n
    return dw_EDF


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x_RD, w_EDF, tokens_per_group_E, backend):
        counts = tokens_per_group_E.tolist()
        offs_E = _offsets(tokens_per_group_E)
        impl = _choose_impl(backend, x_RD, w_EDF)
        ctx.save_for_backward(x_RD, w_EDF, offs_E)
        ctx.counts, ctx.impl = counts, impl
        return _forward(x_RD, w_EDF, counts, offs_E, impl)

    @staticmethod
    @without_autocast
    def backward(ctx, dy_RF):
        x_RD, w_EDF, offs_E = ctx.saved_tensors
        dy_RF = dy_RF.contiguous()
        dx_RD = dw_EDF = None
        if ctx.needs_input_grad[0]:
            dx_RD = _forward(dy_RF, w_EDF.transpose(-2, -1), ctx.counts, offs_E, ctx.impl, "grouped_mm.dx")
        if ctx.needs_input_grad[1]:
            dw_EDF = _weight_grad(x_RD, dy_RF, ctx.counts, offs_E, ctx.impl)
        return dx_RD, dw_EDF, None, None


def grouped_mm(x_RD: torch.Tensor, w_EDF: torch.Tensor, tokens_per_group_E: torch.Tensor,
               backend: str = "auto") -> torch.Tensor:
    """y_RF = per-group x @ w (see module docstring). backend: auto | grouped_mm | triton | loop.

    `tokens_per_group_E` must sum to R; a group may be empty (its weight gradient is zero). Under autocast the
    operands are cast to the autocast dtype (see module docstring), else w to x's dtype.
    """
    dt = autocast_dtype(x_RD) or x_RD.dtype
    return _GroupedMM.apply(x_RD.to(dt), w_EDF.to(dt), tokens_per_group_E, backend)


class ChunkWeightGrads:
    """The weight gradients of the grouped_swiglu calls of one layer's pipeline chunks, built in place.

    Legend: L stacked experts of the weights (all the chunks' experts), s_c the experts of chunk c (a slice of L).

    The chunks of a layer compute on the same stacked weights w_L: a slice each when chunks split the experts, all of
    them when chunks split the tokens. Autograd would give every chunk its own weight gradient and add them up: per
    weight and chunk one full-size allocation plus one full-size addition (split by tokens), or one concatenation of
    the slices (split by experts). Instead every chunk writes into ONE full-size gradient per weight:

        dw_L[e]  = x_e^T @ dy_e        the first chunk to reach expert e in backward (zeros if it has no rows)
        dw_L[e] += x_e^T @ dy_e        every later one (one addmm per expert on CPU: no separate addition pass)

    and the call whose backward runs last returns dw_L (the others return None: no gradient), whatever order autograd
    runs the chunks in. An expert no chunk covered is zero-filled then. Under autocast the weights are cast once for
    all chunks (`cast`), and the gradient is built in the weights' own dtype (fp32 master weights: each chunk's bf16
    product is added in fp32, as autograd's sum through the casts did). One call alone (`grouped_swiglu` without
    `chunks`) is the degenerate case: it writes its experts, zero-fills the rest.
    """

    def __init__(self, num_calls: int):
        if num_calls < 1:
            raise ValueError(f"num_calls={num_calls}: expected at least 1")
        self.num_calls = num_calls
        self._cast: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._reset()

    def _reset(self) -> None:
        self.pending = self.num_calls
        self.grads: list[Optional[torch.Tensor]] = [None, None, None]
        self.written: list[Optional[list[bool]]] = [None, None, None]
        self._cast.clear()

    def cast(self, i: int, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """w (weight i) in the computation dtype, cast once for every chunk."""
        if w.dtype == dtype:
            return w
        cached = self._cast.get(i)
        if cached is None or cached[0] is not w or cached[1].dtype != dtype:
            cached = self._cast[i] = (w, w.detach().to(dtype))
        return cached[1]

    def add(self, i: int, like: tuple, experts: slice, x_RD, dy_RF, counts: list[int], offs_E, impl: str):
        """dw_L[experts] (+)= the grouped x^T @ dy of one call, for weight i; like: its (shape, dtype, device)."""
        shape, dtype, device = like
        L = shape[0]
        r = range(L)[experts]
        buf = self.grads[i]
        if buf is None:
            if impl != "loop" and len(r) == L and x_RD.dtype == dtype:
                self.grads[i] = _weight_grad(x_RD, dy_RF, counts, offs_E, impl)  # nothing to add to: keep it
                self.written[i] = [True] * L
                return
            buf = self.grads[i] = workspace.empty(f"swiglu.dw{i}", shape, dtype, device, exact=True)
            self.written[i] = [False] * L
        written = self.written[i]
        done = [written[e] for e in r]
        for e in r:
            written[e] = True
        if impl == "loop" and x_RD.dtype == buf.dtype:
            _loop_weight_grad_into(buf[experts], x_RD, dy_RF, counts, accumulate=done)
            return
        dw_SDF = _weight_grad(x_RD, dy_RF, counts, offs_E, impl, "swiglu.dw.scratch", exact=False)
        if not any(done):
            buf[experts].copy_(dw_SDF)
        elif all(done):
            buf[experts].add_(dw_SDF)
        else:
            for j, e in enumerate(r):
                buf[e].add_(dw_SDF[j]) if done[j] else buf[e].copy_(dw_SDF[j])

    def finish(self) -> list[Optional[torch.Tensor]]:
        """Called once by every call's backward: the full gradients for the last one (unwritten experts zeroed),
        None for the others."""
        self.pending -= 1
        if self.pending > 0:
            return [None, None, None]
        grads, written = self.grads, self.written
        for buf, done in zip(grads, written):
            if buf is not None:
                for e in (e for e, d in enumerate(done) if not d):
                    buf[e].zero_()
        self._reset()
        return grads


class _GroupedSwiGLU(torch.autograd.Function):
    """y_RD = grouped(silu(grouped(x_RD, w1)) * grouped(x_RD, w3), w2) with a hand-written backward, on the experts
    `experts` of the stacked weights; their gradients go through `chunks` (ChunkWeightGrads)."""

    @staticmethod
    @without_autocast
    def forward(ctx, x_RD, w1_LDF, w3_LDF, w2_LFD, tokens_per_group_E, backend, experts, chunks, dtype):
        counts = tokens_per_group_E.tolist()
        offs_E = _offsets(tokens_per_group_E)
        w1_EDF, w3_EDF, w2_EFD = (chunks.cast(i, w, dtype)[experts] for i, w in enumerate((w1_LDF, w3_LDF, w2_LFD)))
        impl = _choose_impl(backend, x_RD, w1_EDF)
        h1_RF = _forward(x_RD, w1_EDF, counts, offs_E, impl, "swiglu.h1")
        h3_RF = _forward(x_RD, w3_EDF, counts, offs_E, impl, "swiglu.h3")
        h_RF = torch.ops.aten.silu.out(h1_RF, out=_scratch("swiglu.h", h1_RF)).mul_(h3_RF)
        y_RD = _forward(h_RF, w2_EFD, counts, offs_E, impl, "swiglu.y")
        del h_RF  # forward scratch: its buffer is free again before backward
        ctx.save_for_backward(x_RD, w1_EDF, w3_EDF, w2_EFD, h1_RF, h3_RF, offs_E)
        ctx.counts, ctx.impl, ctx.experts, ctx.chunks = counts, impl, experts, chunks
        ctx.like = [(w.shape, w.dtype, w.device) for w in (w1_LDF, w3_LDF, w2_LFD)]
        return y_RD

    @staticmethod
    @without_autocast
    def backward(ctx, dy_RD):
        x_RD, w1_EDF, w3_EDF, w2_EFD, h1_RF, h3_RF, offs_E = ctx.saved_tensors
        counts, impl, chunks = ctx.counts, ctx.impl, ctx.chunks
        need_x, need_w1, need_w3, need_w2 = ctx.needs_input_grad[:4]

        def weight_grad(i, a, b):
            chunks.add(i, ctx.like[i], ctx.experts, a, b, counts, offs_E, impl)

        dy_RD = dy_RD.contiguous()
        # Backward temporaries are reused in place: 3 R x F workspace buffers (s, h -> dh, dh*h3 -> dh1) besides dx.
        s_RF = torch.ops.aten.silu.out(h1_RF, out=_scratch("swiglu.bwd.s", h1_RF))
        buf_RF = None
        if need_w2:
            buf_RF = torch.mul(s_RF, h3_RF, out=_scratch("swiglu.bwd.h", h1_RF))  # h = silu(h1) * h3, recomputed
            weight_grad(2, buf_RF, dy_RD)
        dx = None
        if need_x or need_w1 or need_w3:
            dh_RF = _forward(dy_RD, w2_EFD.transpose(-2, -1), counts, offs_E, impl, "swiglu.bwd.h", out=buf_RF)
            dh1_RF = torch.mul(dh_RF, h3_RF, out=_scratch("swiglu.bwd.dh1", h1_RF))
            torch.ops.aten.silu_backward.grad_input(dh1_RF, h1_RF, grad_input=dh1_RF)  # d/dh1 of silu(h1) * h3
            dh3_RF = dh_RF.mul_(s_RF)  # d/dh3 = dh * silu(h1), in place of dh
            del s_RF
            if need_w1:
                weight_grad(0, x_RD, dh1_RF)
            if need_w3:
                weight_grad(1, x_RD, dh3_RF)
            if need_x:
                dx = _forward(dh1_RF, w1_EDF.transpose(-2, -1), counts, offs_E, impl, "swiglu.dx")
                dx = _forward(dh3_RF, w3_EDF.transpose(-2, -1), counts, offs_E, impl, accumulate_into=dx)
        dw1, dw3, dw2 = chunks.finish()
        return dx, dw1, dw3, dw2, None, None, None, None, None


def grouped_swiglu(x_RD: torch.Tensor, w1_LDF: torch.Tensor, w3_LDF: torch.Tensor, w2_LFD: torch.Tensor,
                   tokens_per_group_E: torch.Tensor, backend: str = "auto", experts: slice = slice(None),
                   chunks: Optional[ChunkWeightGrads] = None) -> torch.Tensor:
    """y_RD = per-group silu(x @ w1) * (x @ w3) @ w2 on the experts `experts` of the stacked weights (rows grouped by
    expert, tokens_per_group_E rows each; see module docstring). Computed in the autocast dtype under autocast (x
    and the weights cast to it, y in it), else in x's dtype. The pipeline chunks of one layer pass one shared
    `chunks` (ChunkWeightGrads(num_chunks)): their weight gradients are then built in place in one buffer per
    weight; without it the call is a chunk of its own."""
    dt = autocast_dtype(x_RD) or x_RD.dtype
    return _GroupedSwiGLU.apply(x_RD.to(dt), w1_LDF, w3_LDF, w2_LFD, tokens_per_group_E, backend, experts,
                                chunks if chunks is not None else ChunkWeightGrads(1), dt)
