"""Memory planning (moetrain/train/memory_plan.py): the estimate against what real runs hold, and the dry run.

Measured (moetrain.parallel.memory.measured_state_bytes, or the same count here where that module is absent): the
local tensor storage of the parameters, of the gradients as the optimizer steps (after backward and gradient sync)
and of the optimizer state after one step, of a Trainer run for one step in one process and on 2 gloo ranks (ep=2,
fssdp, fsdp); the activations as the tensors autograd saves during one forward (hooks) plus the logits, in fp32 and
bf16 (CPU autocast). Each within 10% of the plan, dense and expert separately.
"""

import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.config.validate import ConfigError
from moetrain.train import memory_plan
from moetrain.train.memory_plan import plan_memory
from tests.distributed import run_distributed
from tests.train_utils import SavedTensorBytes, overrides

TOLERANCE = 0.10


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


# ------------------------------------------------------------------------------------------------- measuring
def _local_measured_state_bytes(model, optimizer) -> dict:
    """The figures of moetrain.parallel.memory.measured_state_bytes, for a checkout without it: each distinct storage
    once (a DTensor counts its local shard), attributed to the parameter it belongs to."""
    out, seen = {}, set()

    def add(key, t):
        if isinstance(t, torch.Tensor):
            storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                out[key] = out.get(key, 0) + storage.nbytes()

    for p in dict.fromkeys(model.parameters()):
        kind = "expert" if getattr(p, "expert_ids", None) is not None else "dense"
        add(f"{kind}_params", p)
        add(f"{kind}_grads", p.grad)
        for value in optimizer.state.get(p, {}).values():
            add(f"{kind}_optim", value)
    return out


def _measured_state_bytes(model, optimizer) -> dict:
    try:
        from moetrain.parallel.memory import measured_state_bytes
    except ImportError:
        measured_state_bytes = _local_measured_state_bytes
    return measured_state_bytes(model, optimizer)


ROWS = {"parameters": "params", "gradients": "grads", "optimizer": "optim"}


def _measure_one_step(cfg, ctx) -> dict:
    """Build the Trainer and run one step; parameters and gradients as the optimizer steps (after backward and
    gradient sync), its state after the step."""
    from moetrain.train.trainer import Trainer

    trainer = Trainer(cfg, ctx)
    seen = {}

    def before_step(optimizer, args, kwargs):
        seen.update(_measured_state_bytes(trainer.model, optimizer))

    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.train_step()
    after = _measured_state_bytes(trainer.model, trainer.optimizer)
    return {row: {part: (after if row == "optimizer" else seen).get(f"{part}_{key}", 0)
                  for part in ("dense", "expert")} for row, key in ROWS.items()}


def _planned(cfg, world_size: int) -> dict:
    plan = plan_memory(cfg, world_size)
    return {row: {"dense": getattr(plan, row).dense, "expert": getattr(plan, row).expert}
            for row in ("parameters", "gradients", "optimizer")}


def _distributed_body(rank, world_size, layouts):
    from moetrain.parallel.mesh import ParallelContext, build_groups

    out = {}
    for name, args in layouts.items():
        cfg = compose_config(args)
        ep = world_size if cfg.parallel.mode == "fssdp" else cfg.parallel.ep
        out[name] = _measure_one_step(cfg, build_groups(ParallelContext(ep=ep)))
    return out


def _compare(label: str, planned: dict, measured: dict, shared_grads: bool = False) -> list[str]:
    """Rows of the estimate-vs-measured table; assert each figure within TOLERANCE. `shared_grads`: FSDP reduces a
    block's gradients, dense and expert alike, into one buffer, which the measurement counts once (as dense): the
    gradients are compared in total."""
    lines = []
    for row in ROWS:
        parts = ("dense", "expert")
        if shared_grads and row == "gradients":
            planned = {**planned, row: {"total": sum(planned[row].values())}}
            measured = {**measured, row: {"total": sum(measured[row].values())}}
            parts = ("total",)
        for part in parts:
            est, got = planned[row][part], measured[row][part]
            lines.append(f"{label:<14}{row:<12}{part:<8}{est:>10,d}{got:>10,d}{(est - got) / max(got, 1):>+8.1%}")
            assert abs(est - got) <= TOLERANCE * got, lines[-1]
    return lines


def test_state_estimate_matches_one_process_and_two_ranks(tmp_path, cache_dir, capsys):
    from moetrain.parallel.mesh import ParallelContext

    def args(name, *extra):
        return overrides(tmp_path / name, cache_dir, "trainer.max_steps=1", "logger.jsonl=false", *extra)

    lines = [f"{'layout':<14}{'state':<12}{'part':<8}{'planned':>10}{'measured':>10}{'error':>8}"]
    one = args("one")
    lines += _compare("1 process", _planned(compose_config(one), 1), _measure_one_step(compose_config(one),
                                                                                        ParallelContext()))
    layouts = {"ep=2": args("ep2", "parallel.ep=2"),
               "fssdp": args("fssdp", "parallel.mode=fssdp", "parallel.fssdp.budget=1"),
               "fsdp": args("fsdp", "parallel.data_parallel=fsdp")}
    results = run_distributed(_distributed_body, 2, layouts)
    for name, a in layouts.items():
        planned = _planned(compose_config(a), 2)
        for rank, measured in enumerate(results):
            lines += _compare(f"{name} rank {rank}", planned, measured[name], shared_grads=name == "fsdp")
    with capsys.disabled():
        print("\n" + "\n".join(lines))


def _saved_activation_bytes(cfg, bf16: bool = False) -> int:
    """Bytes autograd saves for backward during one forward of a micro-batch and its loss (the parameters
    themselves excluded, their bf16 casts included), plus the logits the training step holds."""
    from moetrain.kernels import workspace
    from moetrain.model.transformer import TransformerLM

    model = TransformerLM(cfg.model, cfg.router, activation_checkpointing=cfg.trainer.activation_checkpointing)
    model.init_weights(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch_size, cfg.data.seq_len))
    # A fresh kernel workspace, as in a training process: buffers cached by earlier tests (other shapes) would be
    # handed out oversized and counted here.
    cached, workspace.WORKSPACE = workspace.WORKSPACE, workspace.Workspace()
    try:
        with SavedTensorBytes(model.parameters()) as saved, \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens)
            F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    finally:
        workspace.WORKSPACE = cached
    saved.add(logits)
    return saved.total


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("extra", [(), ("model.first_k_dense=1", "model.num_shared_experts=1", "data.seq_len=64")],
                         ids=["moe", "dense_and_shared"])
def test_activation_estimate_matches_saved_tensors(tmp_path, extra, precision):
    cfg = compose_config(overrides(tmp_path, tmp_path, *extra, f"parallel.mixed_precision={precision}"))
    plan = plan_memory(cfg, 1)
    # Under bf16 the saved tensors include the weights' bf16 casts: the plan's weight copies.
    planned = plan.activations.total + plan.weight_copies.total
    measured = _saved_activation_bytes(cfg, bf16=precision == "bf16")
    assert abs(planned - measured) <= TOLERANCE * measured, (planned, measured)
    if precision == "fp32":
        # Checkpointing: full keeps each block's input plus the head, selective also the MoE FFN's router, received
        # and returned rows (and each dense block's FFN input); the plan adds the largest block (full) or piece
        # (selective) recomputed in backward, which the forward does not save.
        saved = {}
        for mode in ("full", "selective"):
            cfg_mode = compose_config(overrides(tmp_path, tmp_path, *extra, f"trainer.activation_checkpointing={mode}"))
            plan_mode, saved[mode] = plan_memory(cfg_mode, 1), _saved_activation_bytes(cfg_mode)
            kept = plan_mode.activations.total - plan_mode.recomputed.total
            assert abs(kept - saved[mode]) <= TOLERANCE * saved[mode], (mode, kept, saved[mode])
            assert saved[mode] < plan_mode.activations.total < planned
        assert saved["full"] < saved["selective"] < measured


# ------------------------------------------------------------------------------------------------ the dry run
DEEPSEEK = ["model=deepseek_v3_like", "router=deepseek_v3", "trainer.dry_run=true", "trainer.dry_run_world_size=256",
            "parallel.ep=64"]


def _total_gib(out: str) -> float:
    return float(next(ln for ln in out.splitlines() if "total per rank" in ln).split()[-1])


def test_dry_run_plans_deepseek_v3_on_256_ranks_in_one_process(capsys):
    start = time.perf_counter()
    assert train_main(DEEPSEEK) == 0
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert not dist.is_initialized()
    assert elapsed < 60, elapsed
    assert "world size 256: mode=ep ep=64 (expert-data-parallel 4)" in out
    assert " total:" in out and "activations" in out and "all-to-all" in out
    # 256/64 = 4 experts of 3*7168*2048 per MoE layer (58 of them), fp32: 4 B each for parameters, gradients,
    # 8 B optimizer state.
    expert_params = 58 * 4 * 3 * 7168 * 2048
    plan = plan_memory(compose_config(DEEPSEEK + ["data.global_batch_size=2048"]), 256)
    assert plan.param_elements.expert == expert_params
    assert plan.optimizer.expert == 8 * expert_params
    assert plan.notes == []
    assert _total_gib(out) == pytest.approx(plan.total.total / 2**30, abs=1e-3)


def test_dry_run_layout_errors_are_one_line(capsys):
    assert train_main(DEEPSEEK + ["trainer.dry_run_world_size=96"]) == 2  # 96 ranks do not divide into ep=64
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetrain-train: error: world size 96") and "\n" not in err and "parallel.ep=64" in err
    with pytest.raises(ConfigError, match="parallel.mode=fssdp"):
        plan_memory(compose_config(["parallel.mode=fssdp"]), 3)  # 8 experts over 3 ranks


# ------------------------------------------------------------------------------------------------ the formulas
def _plan(*args, world=8):
    return plan_memory(compose_config(["model=small", "data.global_batch_size=64", *args]), world)


def test_layouts_divide_what_they_shard(monkeypatch):
    ddp = _plan()
    ep = _plan("parallel.ep=4")
    assert ep.parameters.dense == ddp.parameters.dense
    assert ep.parameters.expert == ddp.parameters.expert // 4
    assert ep.all_to_all.expert > 0 == ddp.all_to_all.expert
    fssdp = _plan("parallel.mode=fssdp")
    assert fssdp.parameters.expert == ddp.parameters.expert // 8 and fssdp.weight_copies.expert > 0
    fsdp = _plan("parallel.data_parallel=fsdp")
    assert fsdp.parameters.total == pytest.approx(ddp.parameters.total / 8, rel=0.02)  # dim-0 padding only
    assert fsdp.weight_copies.total > 0  # root and one block unsharded
    # FSDP x EP (dense over the world, experts over their W/ep expert-data-parallel ranks) and HSDP, planned
    # whatever this checkout's validator accepts of them.
    monkeypatch.setattr(sys.modules["moetrain.config.validate"], "validate", lambda cfg, world_size: None)
    both = _plan("parallel.data_parallel=fsdp", "parallel.ep=4")
    assert both.parameters.expert == ddp.parameters.expert // 4 // 2
    assert both.parameters.dense == fsdp.parameters.dense
    fsdp_fssdp = _plan("parallel.data_parallel=fsdp", "parallel.mode=fssdp")  # FSDP leaves FSSDP's owners alone
    assert (fsdp_fssdp.parameters.dense, fsdp_fssdp.parameters.expert) == (fsdp.parameters.dense,
                                                                           fssdp.parameters.expert)
    fsdp_ep_w = _plan("parallel.data_parallel=fsdp", "parallel.ep=8")  # one rank per expert shard: left alone
    assert fsdp_ep_w.parameters.expert == ddp.parameters.expert // 8
    hsdp = _plan("parallel.data_parallel=fsdp", "parallel.dp_replicate=2")
    assert hsdp.parameters.dense == pytest.approx(2 * fsdp.parameters.dense, rel=0.02)


def test_precision_and_checkpointing():
    fp32, bf16 = _plan("parallel.ep=4", "parallel.mixed_precision=fp32"), _plan("parallel.ep=4",
                                                                                "parallel.mixed_precision=bf16")
    assert memory_plan.planned_precision(compose_config([])) == ("bf16" if torch.cuda.is_available() else "fp32")
    assert bf16.all_to_all.expert * 2 == fp32.all_to_all.expert
    assert bf16.activations.expert * 2 == fp32.activations.expert
    assert fp32.activations.dense / 2 < bf16.activations.dense < fp32.activations.dense  # fp32 residual, logits
    assert (bf16.parameters, bf16.optimizer) == (fp32.parameters, fp32.optimizer)
    assert fp32.weight_copies.total == 0 < bf16.weight_copies.total
    full = _plan("parallel.ep=4", "parallel.mixed_precision=fp32", "trainer.activation_checkpointing=full")
    selective = _plan("parallel.ep=4", "parallel.mixed_precision=fp32", "trainer.activation_checkpointing=selective")
    assert full.activations.total < selective.activations.total < fp32.activations.total
    assert selective.activations.expert < fp32.activations.expert  # the experts' R x F activations are recomputed
    assert fp32.recomputed.total == 0 < selective.recomputed.total < full.recomputed.total
