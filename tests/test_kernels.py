"""Permutation kernels: the Triton kernels (interpreter on CPU) and the torch path pass the same test against a plain
python loop, forward and backward, with dropped copies and padding rows; and a whole MoE layer gives the same result
with either backend."""

import pytest
import torch

from moetrain.kernels import permute as kernels
from moetrain.kernels.permute import combine, permute, triton_available

BACKENDS = ["torch"] + (["triton"] if triton_available() else [])


def make_case(T=5, K=2, D=6, drop=((1, 0), (3, 1)), pad=2, seed=0):
    """Rows: kept copies in a shuffled order, then `pad` padding rows; row_TK is the inverse map."""
    g = torch.Generator().manual_seed(seed)
    copies = [(t, k) for t in range(T) for k in range(K) if (t, k) not in drop]
    order = torch.randperm(len(copies), generator=g).tolist()
    rows = [copies[i] for i in order]
    token_idx_R = torch.tensor([t for t, _ in rows] + [T] * pad)
    row_TK = torch.full((T, K), -1, dtype=torch.long)
    for r, (t, k) in enumerate(rows):
        row_TK[t, k] = r
    gates_R = torch.cat([torch.rand(len(rows), generator=g), torch.zeros(pad)])
    return T, K, D, token_idx_R, row_TK, gates_R, rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_permute_forward_backward(backend):
    T, K, D, token_idx_R, row_TK, _, rows = make_case()
    x = torch.randn(T, D, requires_grad=True)
    out = permute(x, token_idx_R, row_TK, backend)
    expected = torch.stack([x[t] for t, _ in rows] + [torch.zeros(D)] * (len(token_idx_R) - len(rows)))
    torch.testing.assert_close(out, expected)
    dout = torch.randn_like(out)
    out.backward(dout)
    dx = torch.zeros(T, D)
    for r, (t, _) in enumerate(rows):
        dx[t] += dout[r]
    torch.testing.assert_close(x.grad, dx)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_forward_backward(backend):
    T, K, D, token_idx_R, row_TK, gates_R, rows = make_case()
    y = torch.randn(len(token_idx_R), D, requires_grad=True)
    gates = gates_R.clone().requires_grad_()
    out = combine(y, gates, token_idx_R, T, row_TK, backend)
    expected = torch.zeros(T, D)
    for r, (t, _) in enumerate(rows):
        expected[t] += gates_R[r] * y[r].detach()
    torch.testing.assert_close(out, expected)
    dout = torch.randn_like(out)
    out.backward(dout)
    dy = torch.zeros_like(y)
    dg = torch.zeros_like(gates_R)
    for r, (t, _) in enumerate(rows):
        dy[r] = gates_R[r] * dout[t]
        dg[r] = (dout[t] * y[r].detach()).sum()
    torch.testing.assert_close(y.grad, dy)
    torch.testing.assert_close(gates.grad, dg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    x = torch.randn(3, 4, requires_grad=True)
    out = permute(x, torch.zeros(0, dtype=torch.long), torch.full((3, 1), -1), backend)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert torch.all(x.grad == 0)


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_matches_torch_on_a_wider_row():
    T, K, D, token_idx_R, row_TK, gates_R, _ = make_case(T=4, K=3, D=300, drop=((0, 2),), pad=1, seed=3)
    x = torch.randn(T, D)
    y = torch.randn(len(token_idx_R), D)
    torch.testing.assert_close(permute(x, token_idx_R, row_TK, "triton"), permute(x, token_idx_R, row_TK, "torch"))
    torch.testing.assert_close(combine(y, gates_R, token_idx_R, T, row_TK, "triton"),
                               combine(y, gates_R, token_idx_R, T, row_TK, "torch"))


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("router_kw", [{}, {"capacity_factor": 0.75, "pad_to_capacity": True}])
def test_moe_layer_with_triton_permutation_matches_torch(monkeypatch, router_kw):
    from moetrain.config.schema import RouterConfig
    from moetrain.moe.layer import MoELayer

    def run(backend):
        monkeypatch.setattr(kernels, "resolve_backend", lambda b, device: backend)
        torch.manual_seed(0)
        layer = MoELayer(16, 16, 4, 0, RouterConfig(top_k=2, **router_kw), layer_id=1)
        layer.reset_parameters(0.2, 0.2, seed=0)
        x = torch.randn(2, 5, 16, requires_grad=True)
        y = layer(x)
        y.pow(2).sum().backward()
        return y.detach(), x.grad, layer.router.gate.weight.grad, layer.experts.w1_EDF.grad

    for got, want in zip(run("triton"), run("torch")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- grouped GEMM backends and workspace
from moetrain.kernels import grouped_gemm as gg  # noqa: E402
from moetrain.kernels import workspace as ws  # noqa: E402
from moetrain.moe.experts import reference_experts  # noqa: E402

GEMM_BACKENDS = ["loop", "grouped_mm"] + (["triton"] if triton_available() else [])


class PoisonedWorkspace(ws.Workspace):
    """Fills every buffer it hands out with NaN: a kernel that reads workspace memory it did not write (an empty
    group's weight gradient left unzeroed), or a buffer handed out while something still uses it, shows as NaN or
    as a wrong value."""

    def empty(self, name, shape, dtype, device, exact=False):
        t = super().empty(name, shape, dtype, device, exact)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture
def poisoned(monkeypatch):
    w = PoisonedWorkspace()
    monkeypatch.setattr(ws, "WORKSPACE", w)
    return w


def _experts_case(counts, D=12, F=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(counts)
    x = torch.randn(int(c.sum()), D, generator=g)
    w1, w3 = torch.randn(len(counts), D, F, generator=g) * 0.3, torch.randn(len(counts), D, F, generator=g) * 0.3
    w2 = torch.randn(len(counts), F, D, generator=g) * 0.3
    dy = torch.randn(int(c.sum()), D, generator=g)
    return x, (w1, w3, w2), dy, c


def _grads(fn, x, ws_, dy):
    xi = x.clone().requires_grad_()
    wi = [w.clone().requires_grad_() for w in ws_]
    y = fn(xi, *wi)
    y.backward(dy)
    return [y.detach(), xi.grad] + [w.grad for w in wi]


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
@pytest.mark.parametrize("counts", [[3, 0, 7, 2], [0, 0, 5, 0], [4, 4, 4, 4]])
def test_grouped_swiglu_matches_the_reference_loop_with_poisoned_workspace(poisoned, backend, counts):
    """Outputs and all gradients equal the per-expert reference; an empty expert's weight gradients are exactly zero
    even though the workspace hands out NaN-filled memory; twice in a row (the second call reuses the buffers)."""
    x, w, dy, c = _experts_case(counts)
    want = _grads(lambda xi, *wi: reference_experts(xi, c, *wi), x, w, dy)
    for _ in range(2):
        got = _grads(lambda xi, *wi: gg.grouped_swiglu(xi, *wi, c, backend), x, w, dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for dw in got[2:]:
            assert torch.all(dw[c == 0] == 0)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_grouped_mm_matches_the_reference_loop_with_poisoned_workspace(poisoned, backend):
    x, (w, _, _), dy, c = _experts_case([2, 0, 6, 3], F=16)
    dy = dy[:, :0].new_ones(x.shape[0], 16)
    ref = lambda xi, wi: torch.cat([xi[s:s + n] @ wi[e] for e, (s, n) in  # noqa: E731
                                    enumerate(zip((torch.cumsum(c, 0) - c).tolist(), c.tolist()))])
    want = _grads(ref, x, [w], dy)
    for _ in range(2):
        got = _grads(lambda xi, wi: gg.grouped_mm(xi, wi, c, backend), x, [w], dy)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert torch.all(got[2][1] == 0)


def test_workspace_never_hands_out_a_buffer_in_use():
    w = ws.Workspace()
    a = w.empty("k", (4, 8), torch.float32, "cpu")
    b = w.empty("k", (4, 8), torch.float32, "cpu")
    assert a.data_ptr() != b.data_ptr()  # a is alive
    view = a[1:]
    pa = a.data_ptr()
    del a
    c = w.empty("k", (4, 8), torch.float32, "cpu")
    assert c.data_ptr() != pa  # a view of a's buffer is still alive
    pc = c.data_ptr()
    del view, c
    d = w.empty("k", (2, 8), torch.float32, "cpu")
    assert d.data_ptr() in (pa, pc)  # a free buffer is reused
    n = w.nbytes()
    del d
    assert w.empty("k", (3, 8), torch.float32, "cpu") is not None and w.nbytes() == n  # no growth when it fits
    big = w.empty("k", (64, 8), torch.float32, "cpu")
    assert big.shape == (64, 8) and not big._is_view()
    assert w.empty("k", (4, 8), torch.bfloat16, "cpu").dtype == torch.bfloat16  # its own key


def test_workspace_exact_buffers_hold_no_more_than_the_tensor():
    """exact=True (weight gradients, which live on as .grad): the storage is exactly the tensor, a free buffer of
    another size is never handed out (it is dropped instead), one of the same size is reused."""
    w = ws.Workspace()
    a = w.empty("dw", (4, 8), torch.float32, "cpu", exact=True)
    assert a.untyped_storage().nbytes() == 4 * 8 * 4
    del a
    b = w.empty("dw", (2, 8), torch.float32, "cpu", exact=True)
    assert b.untyped_storage().nbytes() == 2 * 8 * 4 and w.nbytes() == 2 * 8 * 4  # the larger free one dropped
    pb = b.data_ptr()
    del b
    c = w.empty("dw", (2, 8), torch.float32, "cpu", exact=True)
    assert c.data_ptr() == pb  # reused
    assert w.empty("dw", (2, 8), torch.float32, "cpu", exact=True).data_ptr() not in (pb,)  # c holds it


def test_workspace_is_plain_allocation_off_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: calls.append(k.get("device")) or torch.zeros(1))
    ws.Workspace().empty("k", (2,), torch.float32, "meta")
    assert calls == [torch.device("meta")]


def _moe_rows(T=6, K=2, L=3, seed=0):
    """A local top-k routing of T tokens over L experts (expert L-1 picked by nobody): (token_idx_R, gates_R,
    counts_L, row_TK)."""
    g = torch.Generator().manual_seed(seed)
    expert_TK = torch.stack([torch.randperm(L - 1, generator=g)[:K] for _ in range(T)])
    order = torch.argsort(expert_TK.flatten(), stable=True)  # row r holds copy order[r] = t*K + k
    counts = torch.bincount(expert_TK.flatten(), minlength=L)
    gates_R = torch.rand(T * K, generator=g)[order]
    row_TK = torch.empty(T * K, dtype=torch.long)
    row_TK[order] = torch.arange(T * K)
    return order // K, gates_R, counts, row_TK.view(T, K)


def _moe_chain(x_TD, w, token_idx_R, gates_R, counts, backend="loop"):
    x_RD = permute(x_TD, token_idx_R)
    y_RD = gg.grouped_swiglu(x_RD, *w, counts, backend)
    return combine(y_RD, gates_R, token_idx_R, x_TD.shape[0])


def test_two_micro_batches_before_backward_and_recompute_keep_gradients(poisoned):
    """Gradient accumulation (two forwards, then both backwards) and activation recomputation (checkpoint) through
    permute -> grouped SwiGLU -> combine with the NaN-poisoning workspace equal one-at-a-time fp32 references."""
    from torch.utils.checkpoint import checkpoint

    token_idx_R, gates_R, counts, _ = _moe_rows()
    _, w, _, _ = _experts_case([1, 1, 1])
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(6, 12, generator=g) for _ in range(2)]
    dys = [torch.randn(6, 12, generator=g) for _ in range(2)]

    def run(mode):
        wi = [t.clone().requires_grad_() for t in w]
        gi = gates_R.clone().requires_grad_()
        xi = [x.clone().requires_grad_() for x in xs]
        if mode == "one_at_a_time":
            for x, dy in zip(xi, dys):
                _moe_chain(x, wi, token_idx_R, gi, counts).backward(dy)
        elif mode == "accumulate":
            ys = [_moe_chain(x, wi, token_idx_R, gi, counts) for x in xi]
            for y, dy in zip(ys, dys):
                y.backward(dy)
        else:  # recompute
            ys = [checkpoint(_moe_chain, x, wi, token_idx_R, gi, counts, use_reentrant=False) for x in xi]
            sum((y * dy).sum() for y, dy in zip(ys, dys)).backward()
        return [x.grad for x in xi] + [t.grad for t in wi] + [gi.grad]

    monkey = ws.WORKSPACE
    ws.WORKSPACE = ws.Workspace()  # the reference runs on plain reused buffers
    try:
        want = run("one_at_a_time")
    finally:
        ws.WORKSPACE = monkey
    for mode in ("accumulate", "recompute"):
        for got, ref in zip(run(mode), want):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.all(want[4][2] == 0)  # the empty expert


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need", ["both", "dy_only", "gates_only"])
def test_combine_backward_parts(backend, need):
    """The fused combine backward gives each requested gradient alone or both, padding rows included."""
    T, K, D, token_idx_R, row_TK, gates_R, rows = make_case(D=40, pad=3)
    y = torch.randn(len(token_idx_R), D, requires_grad=need != "gates_only")
    gates = gates_R.clone().requires_grad_(need != "dy_only")
    out = combine(y, gates, token_idx_R, T, row_TK, backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    g = torch.cat([dout, torch.zeros(1, D)])[token_idx_R]
    if need != "gates_only":
        torch.testing.assert_close(y.grad, gates_R[:, None] * g)
    if need != "dy_only":
        torch.testing.assert_close(gates.grad, (g * y.detach()).sum(-1))


@pytest.mark.parametrize("perm_backend", BACKENDS)
@pytest.mark.parametrize("gemm_backend", GEMM_BACKENDS)
def test_moe_chain_under_bf16_autocast_matches_fp32(poisoned, perm_backend, gemm_backend):
    """permute -> grouped SwiGLU -> combine under CPU bf16 autocast: fp32 gradients for fp32 leaves, close to fp32."""
    token_idx_R, gates_R, counts, row_TK = _moe_rows(T=8, L=4, seed=2)
    _, w, _, _ = _experts_case([1, 1, 1, 1], D=16, F=32, seed=3)
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)

    def run(autocast):
        wi = [t.clone().requires_grad_() for t in w]
        xi, gi = x.clone().requires_grad_(), gates_R.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            x_RD = permute(xi.to(torch.bfloat16) if autocast else xi, token_idx_R, row_TK, perm_backend)
            y_RD = gg.grouped_swiglu(x_RD, *wi, counts, gemm_backend)
            out = combine(y_RD, gi, token_idx_R, xi.shape[0], row_TK, perm_backend)
        out.backward(dy)
        return [out.detach(), xi.grad, gi.grad] + [t.grad for t in wi]

    ref, got = run(False), run(True)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        # bf16 rounding (eps 2^-8) per element: a norm-wise bound; elementwise bounds fail on the odd gate gradient,
        # a sum of products that nearly cancels.
        assert (a - b).norm() <= 3e-2 * b.norm(), ((a - b).norm() / b.norm()).item()



@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_to_a_narrower_out_dtype(backend):
    """combine(..., out_dtype=bf16) of bf16 rows with fp32 gates: the fp32 sums rounded to bf16; gradients: dy in
    bf16, dgates in fp32 computed from the widened bf16 incoming gradient."""
    T, K, D, token_idx_R, row_TK, gates_R, rows = make_case(D=24, pad=2)
    y = torch.randn(len(token_idx_R), D).to(torch.bfloat16).requires_grad_()
    gates = gates_R.clone().requires_grad_()
    out = combine(y, gates, token_idx_R, T, row_TK, backend, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref = combine(y.detach().float(), gates_R, token_idx_R, T, row_TK, backend)
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=1.6e-2, atol=1e-2)  # one bf16 rounding
    dout = torch.randn(T, D).to(torch.bfloat16)
    out.backward(dout)
    g = torch.cat([dout.float(), torch.zeros(1, D)])[token_idx_R]
    assert y.grad.dtype == torch.bfloat16 and gates.grad.dtype == torch.float32
    torch.testing.assert_close(y.grad, (gates_R[:, None] * g).to(torch.bfloat16), rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(gates.grad, (g * y.detach().float()).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_the_cpu_reference(dtype):
    """On a GPU: every grouped GEMM backend that applies (loop, compiled Triton, torch._grouped_mm for bf16 on sm90+)
    and both permutation backends, through permute -> grouped SwiGLU -> combine, forward and backward, against the
    fp32 CPU reference chain (bf16: within bf16 tolerances)."""
    token_idx_R, gates_R, counts, row_TK = _moe_rows(T=64, K=2, L=8, seed=4)
    _, w, _, _ = _experts_case([1] * 8, D=64, F=128, seed=5)
    x, dy = torch.randn(64, 64), torch.randn(64, 64)

    def run(device, gemm, perm, dt):
        wi = [t.to(device, dt).clone().requires_grad_() for t in w]
        xi, gi = x.to(device, dt).clone().requires_grad_(), gates_R.to(device).clone().requires_grad_()
        idx, rows = token_idx_R.to(device), row_TK.to(device)
        x_RD = permute(xi, idx, rows, perm)
        y_RD = gg.grouped_swiglu(x_RD, *wi, counts.to(device), gemm)
        out = combine(y_RD, gi, idx, 64, rows, perm)
        out.backward(dy.to(device, out.dtype))
        return [t.float().cpu() for t in [out.detach(), xi.grad, gi.grad] + [t.grad for t in wi]]

    ref = run("cpu", "loop", "torch", torch.float32)
    gemms = ["loop"] + (["triton"] if triton_available() else []) + \
        (["grouped_mm"] if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9 else [])
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # relative error of each result as a whole (bf16: ~8 bits)
    for gemm in gemms:
        for perm in BACKENDS:
            for got, want in zip(run("cuda", gemm, perm, dtype), ref):
                assert float((got - want).norm() / want.norm()) < tol, (gemm, perm, dtype)
