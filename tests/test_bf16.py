"""bf16 mixed precision (parallel.mixed_precision=bf16, moetrain/train/precision.py) reaches the experts.

    resolution       auto = bf16 on CUDA, fp32 on CPU; bf16 = autocast on any device
    building blocks  RMSNorm returns the autocast dtype; the grouped GEMM (loop on CPU, Triton in the interpreter)
                     computes in bf16 with fp32 master weights and gradients in the inputs' dtypes; the combine
                     accumulates in fp32 and returns fp32
    2 gloo ranks     (ep=2, a small TransformerLM): the all-to-all payload (forward and backward) and the expert
                     GEMM operands are bf16; router logits/scores/gates, the balancing bias, the router losses, the
                     logits and the loss are fp32; parameters and gradients are fp32; the same batch moves exactly half
                     the all-to-all bytes of fp32
    end to end       a 50-step bf16 run through the CLI ends within 2% of the fp32 loss

bf16 matmuls are ~70x slower than fp32 on the CI CPUs, so every shape here is tiny.
"""

import time

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moetrain.config.schema import ModelConfig, ParallelConfig, RouterConfig
from moetrain.kernels import grouped_gemm as gg
from moetrain.kernels.grouped_gemm import grouped_mm, grouped_swiglu
from moetrain.kernels.permute import combine, permute, triton_available
from moetrain.model.norm import RMSNorm
from moetrain.train.precision import autocast_context, precision_context, resolve_precision
from tests.distributed import run_distributed

BF16 = torch.bfloat16
PERMUTE_BACKENDS = ["torch"] + (["triton"] if triton_available() else [])
GEMM_BACKENDS = ["loop", "grouped_mm"] + (["triton"] if triton_available() else [])


def bf16_autocast():
    return autocast_context(BF16, torch.device("cpu"))


def rounded(t: torch.Tensor) -> torch.Tensor:
    """t rounded to bf16 and back: the fp32 reference of a bf16 computation uses the operands it really sees."""
    return t.detach().to(BF16).float()


# ------------------------------------------------------------------------------------------------ resolution


@pytest.mark.parametrize("setting,device,expected", [
    ("auto", "cpu", None), ("auto", "cuda", BF16), ("fp32", "cpu", None), ("fp32", "cuda", None),
    ("bf16", "cpu", BF16), ("bf16", "cuda", BF16)])
def test_resolve_precision(setting, device, expected):
    assert resolve_precision(ParallelConfig(mixed_precision=setting), torch.device(device)) is expected


def test_precision_context_is_autocast_only_for_bf16():
    cpu = torch.device("cpu")
    with precision_context(ParallelConfig(mixed_precision="fp32"), cpu):
        assert not torch.is_autocast_enabled("cpu")
    ctx = precision_context(ParallelConfig(mixed_precision="bf16"), cpu)
    for _ in range(2):  # the trainer enters the same context for every micro-batch
        with ctx:
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == BF16
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="mixed_precision"):
        resolve_precision(ParallelConfig(mixed_precision="fp16"), cpu)


# ------------------------------------------------------------------------------------------------ building blocks


def test_rmsnorm_computes_in_fp32_and_returns_the_autocast_dtype():
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 8, requires_grad=True)
    y32 = norm(x)
    assert y32.dtype == torch.float32
    with bf16_autocast():
        y = norm(x)
    assert y.dtype == BF16
    torch.testing.assert_close(y, y32.to(BF16), rtol=0, atol=0)  # one rounding of the fp32 result
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and norm.weight.grad.dtype == torch.float32


def _grouped_case(counts, D=16, F=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = sum(counts)
    return (torch.randn(R, D, generator=g), torch.randn(len(counts), D, F, generator=g) * 0.3,
            torch.randn(R, F, generator=g), torch.tensor(counts))


def _per_group(x, w, counts):
    outs, s = [], 0
    for e, n in enumerate(counts.tolist()):
        outs.append(x[s:s + n] @ w[e])
        s += n
    return torch.cat(outs)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_grouped_mm_under_autocast_is_bf16_with_fp32_master_weights(backend):
    """Rows and weights arrive fp32 (master weights); under autocast the GEMM runs on bf16 copies: bf16 output, fp32
    gradients for the fp32 leaves, values equal to an fp32 GEMM of the bf16-rounded operands up to bf16 rounding.
    The Triton case runs the kernels in the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU)."""
    x, w, dy, counts = _grouped_case([3, 0, 7, 2])
    x.requires_grad_(), w.requires_grad_()
    with bf16_autocast():
        y = grouped_mm(x, w, counts, backend)
    assert y.dtype == BF16
    (y.float() * dy).sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    xr, wr = rounded(x).requires_grad_(), rounded(w).requires_grad_()
    yr = _per_group(xr, wr, counts)
    (yr * rounded(dy)).sum().backward()
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), yr, **tol)
    torch.testing.assert_close(x.grad, xr.grad, **tol)
    torch.testing.assert_close(w.grad, wr.grad, **tol)
    assert torch.all(w.grad[1] == 0)  # the empty group


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("counts", [[3, 0, 7, 2], [20, 0, 0, 1]])
def test_triton_grouped_gemm_bf16_matches_torch(counts):
    """The Triton kernels with bf16 inputs (interpreter on CPU; fp32 accumulation) against the torch loop on the same
    bf16 operands, forward and both backward GEMMs (dx through the transposed weights, dw through the wgrad kernel)."""
    x, w, dy, c = _grouped_case(counts, seed=1)
    outs = {}
    for backend in ("loop", "triton"):
        xb, wb = x.to(BF16).requires_grad_(), w.to(BF16).requires_grad_()
        y = grouped_mm(xb, wb, c, backend)
        y.backward(dy.to(BF16))
        assert y.dtype == xb.grad.dtype == wb.grad.dtype == BF16
        outs[backend] = (y, xb.grad, wb.grad)
    for got, want in zip(outs["triton"], outs["loop"]):
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(outs["triton"][0].float(), _per_group(rounded(x), rounded(w), c), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("backend", GEMM_BACKENDS)
def test_grouped_swiglu_under_autocast(backend):
    """The fused expert MLP under autocast: bf16 operands (spied), bf16 output, fp32 gradients for fp32 inputs and
    weights, close to the fp32 computation."""
    g = torch.Generator().manual_seed(2)
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(16, 16, generator=g, requires_grad=True)
    ws = [(torch.randn(4, 16, 32, generator=g) * 0.2).requires_grad_(),
          (torch.randn(4, 16, 32, generator=g) * 0.2).requires_grad_(),
          (torch.randn(4, 32, 16, generator=g) * 0.2).requires_grad_()]
    dy = torch.randn(16, 16, generator=g)
    with bf16_autocast():
        y = grouped_swiglu(x, *ws, counts, backend)
    assert y.dtype == BF16
    (y.float() * dy).sum().backward()
    assert x.grad.dtype == torch.float32 and all(w.grad.dtype == torch.float32 for w in ws)
    xr = x.detach().clone().requires_grad_()
    wr = [w.detach().clone().requires_grad_() for w in ws]
    yr = grouped_swiglu(xr, *wr, counts, "loop")
    (yr * dy).sum().backward()
    tol = dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), yr, **tol)
    for got, want in zip([x.grad] + [w.grad for w in ws], [xr.grad] + [w.grad for w in wr]):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("backend", PERMUTE_BACKENDS)
def test_permute_and_combine_dtypes(backend):
    """bf16 rows: the permutation keeps bf16 and its backward returns bf16; the combine with fp32 gates accumulates
    in fp32 and returns fp32, its gradients are bf16 for the rows and fp32 for the gates."""
    T, K, D = 5, 2, 8
    g = torch.Generator().manual_seed(3)
    token_idx_R = torch.tensor([0, 2, 4, 1, 3, 0, 2, 4, 1, 5])  # copies of 5 tokens, 5 = one padding row
    row_TK = torch.full((T, K), -1, dtype=torch.long)
    for r, t in enumerate(token_idx_R.tolist()):
        if t < T:
            row_TK[t, 0 if row_TK[t, 0] < 0 else 1] = r
    x = torch.randn(T, D, generator=g).to(BF16).requires_grad_()
    x_RD = permute(x, token_idx_R, row_TK, backend)
    assert x_RD.dtype == BF16
    x_RD.float().sum().backward()
    copies_T = torch.bincount(token_idx_R, minlength=T + 1)[:T].float()  # token 3 has one copy, the others two
    assert x.grad.dtype == BF16 and torch.equal(x.grad.float(), copies_T[:, None].expand(T, D))

    y = torch.randn(len(token_idx_R), D, generator=g).to(BF16).requires_grad_()
    gates = torch.rand(len(token_idx_R), generator=g)
    gates[-1] = 0
    gates.requires_grad_()
    out = combine(y, gates, token_idx_R, T, row_TK, backend)
    assert out.dtype == torch.float32
    expected = torch.zeros(T, D).index_add_(0, token_idx_R[:-1], y.detach().float()[:-1] * gates.detach()[:-1, None])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)  # fp32 sums, not bf16
    dout = torch.randn(T, D, generator=g)
    out.backward(dout)
    assert y.grad.dtype == BF16 and gates.grad.dtype == torch.float32
    dg = (dout[token_idx_R[:-1]] * y.detach().float()[:-1]).sum(-1)
    torch.testing.assert_close(gates.grad[:-1], dg, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ 2 ranks, ep=2


class CollectiveSpy(TorchDispatchMode):
    """Every token all-to-all (the functional collective on rows, 2-D; forward and backward) with its dtype and
    payload bytes, and the dtypes of the per-copy ones (1-D: the deduplicated dispatcher's metadata and gates)."""

    def __init__(self):
        super().__init__()
        self.calls, self.per_copy = [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops._c10d_functional.all_to_all_single.default:
            t = args[0]
            backward = torch._C._current_graph_task_id() != -1
            if t.dim() == 2:
                self.calls.append(("backward" if backward else "forward", t.dtype, t.numel() * t.element_size()))
            else:
                self.per_copy.add(t.dtype)
        return func(*args, **(kwargs or {}))


def _tiny_model(ctx, force_balanced: bool):
    from moetrain.model.transformer import TransformerLM
    from moetrain.parallel.moe_layer import moe_layer_factory

    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, ffn_hidden=32,
                      num_experts=4, moe_hidden=16, first_k_dense=0)
    router_cfg = RouterConfig(top_k=2, force_balanced=force_balanced, aux_loss_coeff=0.01, z_loss_coeff=1e-3)
    model = TransformerLM(cfg, router_cfg, moe_layer_factory(router_cfg, ctx.ep_group, ctx.world_group))
    model.init_weights(seed=0)
    return model


def ep2_body(rank, world_size):
    from moetrain.parallel.mesh import ParallelContext, build_groups

    ctx = build_groups(ParallelContext(ep=2))
    gemm_operands = []  # (x dtype, w dtype) of every expert GEMM, forward and backward
    forward, weight_grad = gg._forward, gg._weight_grad

    def spy_forward(x, w, *args, **kwargs):
        gemm_operands.append((x.dtype, w.dtype))
        return forward(x, w, *args, **kwargs)

    def spy_weight_grad(x, dy, *args, **kwargs):
        gemm_operands.append((x.dtype, dy.dtype))
        return weight_grad(x, dy, *args, **kwargs)

    gg._forward, gg._weight_grad = spy_forward, spy_weight_grad  # a spawned process: nothing to restore
    g = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, 64, (2, 8), generator=g)
    targets = torch.randint(0, 64, (2, 8), generator=g)
    out = {}
    for force_balanced in (False, True):
        for setting in ("fp32", "bf16"):
            model = _tiny_model(ctx, force_balanced)
            router_out = []
            for layer in model.moe_layers():
                def spy_router(x_TD, route_ctx=None, _route=layer.router.forward):
                    routed = _route(x_TD, route_ctx)
                    router_out.append({k: getattr(routed, k).dtype for k in ("logits_TE", "scores_TE", "gates_TK")})
                    return routed
                layer.router.forward = spy_router
            gemm_operands.clear()
            spy = CollectiveSpy()
            with spy:
                with precision_context(ParallelConfig(mixed_precision=setting), torch.device("cpu")):
                    logits, records = model(tokens, return_records=True)
                    lm_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
                loss = lm_loss + sum(r.loss for r in records)
                loss.backward()
            out[(setting, force_balanced)] = dict(
                collectives=spy.calls, per_copy=spy.per_copy, gemm=set(gemm_operands), router=router_out,
                bias={str(m.router.expert_bias_E.dtype) for m in model.moe_layers()},
                router_losses={str(t.dtype) for r in records for t in r.losses.values()},
                logits=logits.dtype, loss=loss.dtype,
                params={str(p.dtype) for p in model.parameters()},
                grads={str(p.grad.dtype) for p in model.parameters() if p.grad is not None},
                num_grads=sum(p.grad is not None for p in model.parameters()),
                num_params=sum(1 for _ in model.parameters()), loss_value=float(loss.detach()))
    return out


@pytest.fixture(scope="module")
def ep2_results():
    return run_distributed(ep2_body, 2)


def test_bf16_reaches_the_all_to_all_and_the_experts(ep2_results):
    """parallel.mixed_precision=bf16 on CPU, 2 ranks, ep=2: the dispatch and combine all-to-alls move bf16 (also in
    backward), the expert GEMMs take bf16 operands; router, bias, logits, loss, parameters and gradients stay fp32."""
    for rank, res in enumerate(ep2_results):
        bf16, fp32 = res[("bf16", False)], res[("fp32", False)]
        directions = [d for d, _, _ in bf16["collectives"]]
        assert directions.count("forward") == 4 and directions.count("backward") == 4, (rank, directions)  # 2 layers
        assert {dt for _, dt, _ in bf16["collectives"]} == {BF16}, rank
        assert {dt for _, dt, _ in fp32["collectives"]} == {torch.float32}, rank
        assert bf16["per_copy"] == fp32["per_copy"] == {torch.int32, torch.float32}, rank  # metadata, fp32 gates
        assert bf16["gemm"] == {(BF16, BF16)}, (rank, bf16["gemm"])
        assert fp32["gemm"] == {(torch.float32, torch.float32)}, (rank, fp32["gemm"])
        assert len(bf16["router"]) == 2 and all(set(r.values()) == {torch.float32} for r in bf16["router"]), rank
        assert bf16["bias"] == {"torch.float32"} and bf16["router_losses"] == {"torch.float32"}, rank
        assert bf16["logits"] == torch.float32 and bf16["loss"] == torch.float32, rank
        assert bf16["params"] == {"torch.float32"} and bf16["grads"] == {"torch.float32"}, rank
        assert bf16["num_grads"] == bf16["num_params"], rank
        assert abs(bf16["loss_value"] - fp32["loss_value"]) < 0.02 * fp32["loss_value"], rank


def test_bf16_all_to_all_moves_half_the_bytes(ep2_results):
    """The same batch with forced balanced routing (identical rows in both precisions): every all-to-all, forward and
    backward, moves exactly half the bytes of fp32."""
    for rank, res in enumerate(ep2_results):
        b32 = [b for _, _, b in res[("fp32", True)]["collectives"]]
        b16 = [b for _, _, b in res[("bf16", True)]["collectives"]]
        assert len(b32) == len(b16) == 8 and sum(b32) > 0
        assert [2 * b for b in b16] == b32, (rank, b16, b32)
        print(f"rank {rank}: all-to-all payload of one forward+backward: fp32 {sum(b32)} B, bf16 {sum(b16)} B")


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def test_fifty_bf16_steps_track_fp32(tmp_path, cache_dir):
    """50 steps of the tiny SMALL model through the CLI: the bf16 run's final loss is within 2% of the fp32 run's
    (same data, same initialisation)."""
    from moetrain.cli import train_main
    from tests.train_utils import losses, overrides

    final, seconds = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on the shared 2-core CI machine make these tiny steps 10x slower
    try:
        for setting in ("fp32", "bf16"):
            run = tmp_path / setting
            start = time.perf_counter()
            assert train_main(overrides(run, cache_dir, "trainer.max_steps=50", "optim.lr=1e-2",
                                        f"parallel.mixed_precision={setting}")) == 0
            seconds[setting] = time.perf_counter() - start
            curve = losses(run)
            assert sorted(curve) == list(range(1, 51))
            final[setting] = curve[50]
    finally:
        torch.set_num_threads(threads)
    print(f"step-50 loss fp32 {final['fp32']:.4f} ({seconds['fp32']:.1f} s, with the corpus preparation), "
          f"bf16 {final['bf16']:.4f} ({seconds['bf16']:.1f} s)")
    assert final["bf16"] != final["fp32"]  # bf16 really ran
    assert abs(final["bf16"] - final["fp32"]) <= 0.02 * final["fp32"], final
