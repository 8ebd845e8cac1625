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
