"""FSDP2 for the dense parameters composed with expert parallelism, FSSDP and HSDP, end to end through moetrain-train.

* 20 optimizer steps on gloo ranks follow the single-process fp32 loss curve (rel 1e-4): dense FSDP2 over 4 ranks with
  ep=2 (experts FSDP2-sharded over their expert-data-parallel pair), FSSDP with FSDP2 dense on 2 ranks, HSDP
  (dp_replicate=2) on 4 ranks with ep=2 and with ep=1;
* the measured per-rank bytes of dense parameters + gradients + optimizer state fall about 1/W (1, 2, 4 ranks);
* checkpoints reshard: every layout of {1 process, ep=2 on 2 ranks (DDP), FSDP2 x ep=2 on 4 ranks, FSSDP with FSDP2
  dense on 2 ranks} saves at step 10, and another resumes from it and follows the reference to step 20. By default
  each source resumes once, into the next layout of a cycle (every layout saved once and resumed once, about a
  minute); `pytest --run-slow` runs the whole 4 x 3 matrix (about three minutes more) and two more layouts (FSDP2
  with ep=4, whose experts FSDP ignores; HSDP on 8 ranks, whose experts are HSDP-sharded on a 2-D mesh of their own).

The single-process reference run (with its step-10 checkpoint) is shared by all tests through a module fixture, and so
are the three distributed source runs of the resharding matrix (which double as loss-curve tests).
"""

import shutil
import time

import pytest
import torch
import torch.nn.functional as F

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.config.validate import check, validate
from moetrain.parallel.fsdp import mixed_precision_policy
from moetrain.parallel.grad_sync import sync_gradients
from moetrain.parallel.memory import measured_state_bytes
from moetrain.parallel.mesh import init_parallel
from moetrain.train.trainer import Trainer
from tests.distributed import run_distributed
from tests.train_utils import losses, overrides

STEPS = ("trainer.max_steps=20", "trainer.checkpoint_every=10", "trainer.keep_checkpoints=3")
slow = pytest.mark.slow  # run with `pytest --run-slow` (tests/conftest.py)

# name -> (world size, overrides): the layouts of the resharding matrix
LAYOUTS = {
    "one_process": (1, ()),
    "ep2": (2, ("parallel.ep=2",)),
    "fsdp_ep2": (4, ("parallel.data_parallel=fsdp", "parallel.ep=2")),
    "fssdp_fsdp": (2, ("parallel.data_parallel=fsdp", "parallel.mode=fssdp", "parallel.fssdp.reshard_every=3")),
}


def _train_body(rank, world_size, args):
    return train_main(args)


def _train(world, args) -> float:
    """Run moetrain-train on `world` ranks (in this process for one); return the wall time."""
    start = time.perf_counter()
    if world == 1:
        assert train_main(args) == 0
    else:
        assert run_distributed(_train_body, world, args) == [0] * world
    return time.perf_counter() - start


def _assert_follows(got: dict, ref: dict, steps) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), (step, got[step], ref[step])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """One process, fp32, 20 steps, checkpoints at steps 10 and 20: the curve every layout follows."""
    run = tmp_path_factory.mktemp("reference")
    _train(1, overrides(run, cache_dir, *STEPS))
    return run


@pytest.fixture(scope="module")
def sources(tmp_path_factory, cache_dir, reference):
    """name -> run directory of every layout of LAYOUTS, trained to step 20 with a checkpoint at step 10."""
    runs = {"one_process": reference}
    for name, (world, extra) in LAYOUTS.items():
        if name not in runs:
            run = tmp_path_factory.mktemp(f"src-{name}")
            _train(world, overrides(run, cache_dir, *STEPS, *extra))
            runs[name] = run
    return runs


# ------------------------------------------------------------------------------------------------------ loss curves


@pytest.mark.parametrize("name", ["fsdp_ep2", "fssdp_fsdp", "ep2"])
def test_source_layouts_follow_the_single_process_curve(sources, reference, name):
    _assert_follows(losses(sources[name]), losses(reference), range(1, 21))


@pytest.mark.parametrize("world,extra", [
    (4, ("parallel.ep=2", "parallel.dp_replicate=2")),  # experts: ep=2 x replicated on 2 (FSDP ignores them)
    (4, ("parallel.ep=1", "parallel.dp_replicate=2")),  # experts: HSDP-sharded with the dense parameters
    pytest.param(4, ("parallel.ep=4",), marks=slow),  # experts: ep=4, FSDP ignores them
    pytest.param(8, ("parallel.ep=2", "parallel.dp_replicate=2", "data.micro_batch_size=1"), marks=slow),
], ids=["hsdp_ep2", "hsdp_ep1", "fsdp_ep4", "hsdp8_ep2_experts_hsdp"])
def test_hsdp_and_fsdp_follow_the_single_process_curve(tmp_path, cache_dir, reference, world, extra):
    run = tmp_path / "run"
    _train(world, overrides(run, cache_dir, "trainer.max_steps=20", "parallel.data_parallel=fsdp", *extra))
    _assert_follows(losses(run), losses(reference), range(1, 21))


# ------------------------------------------------------------------------------------------------ resharding matrix


CYCLE = ["one_process", "fsdp_ep2", "fssdp_fsdp", "ep2"]  # each saves once and resumes the previous one's
ROTATION = [(src, CYCLE[(i + 1) % len(CYCLE)]) for i, src in enumerate(CYCLE)]
MATRIX = [pytest.param(src, dst, id=f"{src}-to-{dst}", marks=() if (src, dst) in ROTATION else slow)
          for src in LAYOUTS for dst in LAYOUTS if src != dst]


@pytest.mark.parametrize("src,dst", MATRIX)
def test_checkpoint_resumes_under_another_layout(tmp_path, cache_dir, reference, sources, src, dst):
    run = tmp_path / "dst"
    shutil.copytree(sources[src] / "checkpoints" / "step_00000010", run / "checkpoints" / "step_00000010")
    world, extra = LAYOUTS[dst]
    _train(world, overrides(run, cache_dir, "trainer.max_steps=20", *extra))
    _assert_follows(losses(run), losses(reference), range(11, 21))


# ------------------------------------------------------------------------------------------------ measured memory


def _measure_body(rank, world_size, args):
    cfg = compose_config(args)
    validate(cfg, world_size)
    ep = world_size if cfg.parallel.mode == "fssdp" else cfg.parallel.ep
    ctx = init_parallel(ep, "cpu", "gloo")
    trainer = Trainer(cfg, ctx)
    trainer.train_step()  # creates the optimizer state
    inputs_BS, targets_BS = trainer.loader.train_batch(trainer.step, 0)
    logits_BSV = trainer.model(inputs_BS)
    F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten()).backward()
    sync_gradients(trainer.model, ctx)
    return measured_state_bytes(trainer.model, trainer.optimizer)


def measure(tmp_path, cache_dir, world, *extra):
    args = overrides(tmp_path / f"mem{world}", cache_dir, "trainer.max_steps=5", "trainer.resume=none", *extra)
    if world == 1:
        return [_measure_body(0, 1, args)]
    return run_distributed(_measure_body, world, args)


def test_measured_state_bytes_fall_as_one_over_world_size(tmp_path, cache_dir):
    fsdp = ("parallel.data_parallel=fsdp",)
    per_world = {1: measure(tmp_path, cache_dir, 1),
                 2: measure(tmp_path, cache_dir, 2, *fsdp, "parallel.ep=2"),
                 4: measure(tmp_path, cache_dir, 4, *fsdp, "parallel.ep=2")}
    one = per_world[1][0]
    assert all(one[k] > 0 for k in one), one
    assert one["dense_grads"] == one["dense_params"] and one["expert_grads"] == one["expert_params"]
    # AdamW: two fp32 moments per element, plus one 4-byte step per parameter tensor
    assert 2 * one["dense_params"] <= one["dense_optim"] <= 2 * one["dense_params"] + 4 * 64
    for world, ranks in per_world.items():
        for rank, got in enumerate(ranks):
            for kind in ("dense", "expert"):
                total = sum(got[f"{kind}_{part}"] for part in ("params", "grads", "optim"))
                reference = sum(one[f"{kind}_{part}"] for part in ("params", "grads", "optim"))
                # 1/W up to FSDP's dim-0 padding and the unsharded 4-byte AdamW steps
                assert total == pytest.approx(reference / world, rel=0.05), (world, rank, kind, total, reference)
    print("\nmeasured bytes per rank (rank 0):")
    for world, ranks in per_world.items():
        print(f"  W={world}: " + ", ".join(f"{k}={v}" for k, v in ranks[0].items()))


def test_measured_state_bytes_counts_shared_storage_once():
    dense, expert = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 2, bias=False)
    expert.weight.expert_ids = [0, 1]
    buffer = torch.zeros(24)  # one gradient buffer viewed by both (as FSDP2's reduce-scatter output is)
    dense.weight.grad, expert.weight.grad = buffer[:16].view(4, 4), buffer[16:].view(2, 4)
    model = torch.nn.Module()
    model.a, model.b, model.tied = dense, expert, dense  # `tied`: the same parameter twice
    got = measured_state_bytes(model)
    assert got["dense_params"] == 64 and got["expert_params"] == 32
    assert got["dense_grads"] == 64 and got["expert_grads"] == 32  # the 96-byte buffer split by the views' bytes


# --------------------------------------------------------------------------------------------- config and precision


def test_layout_checks():
    def problems(*args, world=4):
        return check(compose_config(["data.micro_batch_size=1", *args]), world)

    assert problems("parallel.data_parallel=fsdp", "parallel.ep=2") == []
    assert problems("parallel.data_parallel=fsdp", "parallel.mode=fssdp") == []
    assert problems("parallel.data_parallel=fsdp", "parallel.ep=2", "parallel.dp_replicate=2") == []
    assert problems("parallel.data_parallel=fsdp", "parallel.ep=4", "parallel.dp_replicate=2") == []
    (msg,) = problems("parallel.dp_replicate=2")
    assert msg.startswith("parallel.dp_replicate=2 needs parallel.data_parallel=fsdp")
    (msg,) = problems("parallel.data_parallel=fsdp", "parallel.dp_replicate=3")
    assert msg.startswith("parallel.dp_replicate=3 must divide the world size 4")
    assert problems("parallel.data_parallel=fsdp", "parallel.ep=2", "parallel.dp_replicate=4", world=8) == []
    (msg,) = problems("parallel.data_parallel=fsdp", "parallel.ep=4", "parallel.dp_replicate=4", world=8)
    assert msg.startswith("parallel.dp_replicate=4 must divide the 2 ranks holding the same experts"), msg


def _bf16_body(rank, world_size, args):
    cfg = compose_config(args)
    validate(cfg, world_size)
    trainer = Trainer(cfg, init_parallel(cfg.parallel.ep, "cpu", "gloo"))
    block = trainer.model.layers[0]
    seen = {}

    def record(module, inputs):  # runs inside the block's FSDP unit: the parameters are gathered
        seen["attn"] = next(block.attn.parameters()).dtype
        seen["experts"] = block.ffn.experts.w1_EDF.dtype

    block.ffn.register_forward_pre_hook(record)
    metrics = trainer.train_step()
    sharded = {str(p.dtype) for p in trainer.model.parameters()}
    moments = {str(t.dtype) for state in trainer.optimizer.state.values() for t in state.values() if t.dim()}
    return seen, sharded, moments, metrics["loss"]


def test_bf16_policy_gathers_bf16_parameters_and_keeps_fp32_state(tmp_path, cache_dir):
    args = overrides(tmp_path / "run", cache_dir, "trainer.max_steps=2", "parallel.data_parallel=fsdp",
                     "parallel.ep=2", "parallel.mixed_precision=bf16")
    for seen, sharded, moments, loss in run_distributed(_bf16_body, 4, args):
        assert seen == {"attn": torch.bfloat16, "experts": torch.bfloat16}
        assert sharded == moments == {"torch.float32"}
        assert 5.0 < loss < 6.0


def test_mixed_precision_policy():
    assert mixed_precision_policy(None).param_dtype is None
    assert mixed_precision_policy(torch.float32).param_dtype is None
    policy = mixed_precision_policy(torch.bfloat16)
    assert policy.param_dtype == torch.bfloat16 and policy.reduce_dtype == torch.float32
