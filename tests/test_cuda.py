"""GPU paths, on a CUDA machine only (skipped elsewhere; CI has no GPU).

The CPU suite runs the Triton kernels in the interpreter and every collective on gloo; this file runs what only a GPU
can: the compiled Triton grouped GEMM and permutation kernels and torch._grouped_mm (bf16, sm90+) against the loop /
torch references on the same device, in fp32 and bf16, forward and backward, with empty groups; an MoE layer on CUDA
under bf16 autocast against the same layer in fp32 on CPU; the all-to-all dispatcher on a one-rank NCCL group (real
NCCL all-to-alls, the pipeline chunks, CUDA-event timing of the degree tuner) against the local layer; and a few bf16
training steps of the small test model on CUDA.

    python -m pytest -q tests/test_cuda.py        # on a machine with a GPU

Two ranks cannot share one GPU under NCCL, so the multi-rank NCCL paths stay untested on a one-GPU machine.
"""

import socket

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from moetrain.config.schema import RouterConfig  # noqa: E402
from moetrain.kernels.grouped_gemm import grouped_mm, grouped_mm_supported, grouped_swiglu  # noqa: E402
from moetrain.kernels.permute import combine, permute, triton_available  # noqa: E402
from moetrain.moe.experts import GroupedExperts  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402

CUDA = torch.device("cuda")
COUNTS = [0, 37, 128, 5, 0, 64, 1]  # empty groups, a group of one, uneven sizes


def assert_close(got, want, dtype, msg):
    """fp32: elementwise against the fp32 loop (rtol = atol = 1e-4). bf16: against the fp32 loop on the same
    bf16-rounded inputs, relative error of the whole tensor below 2e-2 (bf16 intermediates round differently per
    backend; elementwise bounds would fail on values near zero)."""
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=msg)
    else:
        assert _rel_err(got, want) < 2e-2, f"{msg}: relative error {_rel_err(got, want):.2e}"


def _backends(dtype):
    out = ["triton"] if triton_available() else []
    x = torch.empty(1, 128, dtype=dtype, device=CUDA)
    if grouped_mm_supported(x, torch.empty(1, 128, 96, dtype=dtype, device=CUDA)):
        out.append("grouped_mm")
    return out


def _grouped_case(dtype, D=128, F=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(COUNTS)
    x = torch.randn(R, D, generator=g).to(CUDA, dtype).requires_grad_()
    w = (torch.randn(len(COUNTS), D, F, generator=g) * D ** -0.5).to(CUDA, dtype).requires_grad_()
    dy = torch.randn(R, F, generator=g).to(CUDA, dtype)
    return x, w, torch.tensor(COUNTS, device=CUDA), dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_backends_match_the_loop(dtype):
    backends = _backends(dtype)
    if not backends:
        pytest.skip("no GPU grouped GEMM backend for this dtype")
    results = {}
    for backend in ["ref", "loop", *backends]:
        x, w, counts, dy = _grouped_case(dtype)
        if backend == "ref":  # the fp32 loop on the same (bf16-rounded) values
            x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
        y = grouped_mm(x, w, counts, "loop" if backend == "ref" else backend)
        y.backward(dy.to(y.dtype))
        results[backend] = (y.detach().float(), x.grad.float(), w.grad.float())
    results["loop"], results["ref"] = results["ref"], results["loop"]  # compare every backend to the fp32 loop
    for backend in ["ref", *backends]:
        for got, want, name in zip(results[backend], results["loop"], ("y", "dx", "dw")):
            assert_close(got, want, dtype, f"{backend} {name} {dtype}")
    assert torch.all(results[backends[0]][2][0] == 0) and torch.all(results[backends[0]][2][4] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_swiglu_backends_match_the_loop(dtype):
    backends = _backends(dtype)
    if not backends:
        pytest.skip("no GPU grouped GEMM backend for this dtype")
    g = torch.Generator().manual_seed(1)
    D, F, E, R = 128, 96, len(COUNTS), sum(COUNTS)
    base = [torch.randn(R, D, generator=g), torch.randn(E, D, F, generator=g) * D ** -0.5,
            torch.randn(E, D, F, generator=g) * D ** -0.5, torch.randn(E, F, D, generator=g) * F ** -0.5]
    dy = torch.randn(R, D, generator=g).to(CUDA, dtype)
    results = {}
    for backend in ["ref", "loop", *backends]:
        ts = [t.to(CUDA, dtype) for t in base]
        ts = [(t.float() if backend == "ref" else t).requires_grad_() for t in ts]  # ref: fp32 on bf16 values
        y = grouped_swiglu(*ts, torch.tensor(COUNTS, device=CUDA), "loop" if backend == "ref" else backend)
        y.backward(dy.to(y.dtype))
        results[backend] = [y.detach().float()] + [t.grad.float() for t in ts]
    results["loop"], results["ref"] = results["ref"], results["loop"]  # compare every backend to the fp32 loop
    for backend in ["ref", *backends]:
        for i, (got, want) in enumerate(zip(results[backend], results["loop"])):
            assert_close(got, want, dtype, f"{backend} output/grad {i} {dtype}")


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_permutation_matches_torch(dtype):
    from tests.test_kernels import make_case

    T, K, D, token_idx_R, row_TK, gates_R, _ = make_case(T=64, K=4, D=300, drop=((0, 2), (5, 1)), pad=3, seed=2)
    token_idx_R, row_TK, gates_R = token_idx_R.to(CUDA), row_TK.to(CUDA), gates_R.to(CUDA)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(T, D, generator=g).to(CUDA, dtype)
    y0 = torch.randn(len(token_idx_R), D, generator=g).to(CUDA, dtype)
    out = {}
    for backend in ("torch", "triton"):
        x, y, gates = x0.clone().requires_grad_(), y0.clone().requires_grad_(), gates_R.clone().requires_grad_()
        p = permute(x, token_idx_R, row_TK, backend)
        c = combine(y, gates, token_idx_R, T, row_TK, backend)
        (p.float().square().sum() + c.float().square().sum()).backward()
        out[backend] = [p.float(), c.float(), x.grad.float(), y.grad.float(), gates.grad.float()]
    for i, (got, want) in enumerate(zip(out["triton"], out["torch"])):
        assert_close(got, want, dtype, f"permutation output/grad {i} {dtype}")


def _layer(dispatcher=None, experts=None, E=8, K=2, D=64, F=128):
    torch.manual_seed(0)
    layer = MoELayer(D, F, E, 1, RouterConfig(top_k=K), layer_id=1, dispatcher=dispatcher, experts=experts)
    torch.manual_seed(1)
    layer.reset_parameters(0.05, 0.05, seed=0)
    return layer


def _run(layer, x, dy, autocast: bool):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().backward(dy)
    grads = {n: p.grad.float().cpu() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach().float().cpu(), x.grad.float().cpu(), grads


def _rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_moe_layer_bf16_on_cuda_tracks_fp32_on_cpu():
    g = torch.Generator().manual_seed(4)
    x, dy = torch.randn(2, 96, 64, generator=g), torch.randn(2, 96, 64, generator=g)
    ref = _run(_layer(), x, dy, autocast=False)
    got = _run(_layer().to(CUDA), x.to(CUDA), dy.to(CUDA), autocast=True)
    assert _rel_err(got[0], ref[0]) < 2e-2 and _rel_err(got[1], ref[1]) < 3e-2
    for name, grad in ref[2].items():
        assert _rel_err(got[2][name], grad) < 5e-2, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def nccl_group():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("degree", ["1", "4", "auto"])
def test_all_to_all_dispatcher_on_one_nccl_rank_matches_the_local_layer(nccl_group, degree):
    from moetrain.parallel.dispatch.alltoall import AllToAllDispatcher

    E = 8
    local = _layer(E=E).to(CUDA)
    dispatcher = AllToAllDispatcher(E, nccl_group, pipeline_degree=degree)
    a2a = _layer(dispatcher, GroupedExperts(64, 128, list(range(E))), E=E).to(CUDA)
    a2a.load_state_dict(local.state_dict())
    g = torch.Generator().manual_seed(5)
    x, dy = torch.randn(2, 80, 64, generator=g).to(CUDA), torch.randn(2, 80, 64, generator=g).to(CUDA)
    steps = 12 if degree == "auto" else 1  # auto: through the trial phase (CUDA-event timing) to a decision
    for step in range(steps):
        want, got = _run(local, x, dy, autocast=False), _run(a2a, x, dy, autocast=False)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        for name, grad in want[2].items():
            torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)
        local.zero_grad(set_to_none=True)
        a2a.zero_grad(set_to_none=True)
        a2a.after_step(step, torch.ones(E, device=CUDA), None)
    if degree == "auto":
        assert dispatcher.tuner.chosen in dispatcher.tuner.candidates


def test_bf16_training_steps_on_cuda(tmp_path):
    from moetrain.cli import train_main
    from tests.train_utils import losses, overrides

    args = overrides(tmp_path / "run", tmp_path / "cache", "trainer.device=cuda", "trainer.max_steps=12",
                     "parallel.mixed_precision=bf16", "parallel.pipeline_degree=auto")
    assert train_main(args) == 0
    curve = losses(tmp_path / "run")
    assert len(curve) == 12 and all(torch.isfinite(torch.tensor(v)) for v in curve.values())
    assert curve[12] < curve[1]
