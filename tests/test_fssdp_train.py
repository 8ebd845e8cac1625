"""FSSDP end to end through moetrain-train: 20 optimizer steps on 2 and 4 gloo ranks match one process, with
re-sharding and re-materialization, under learned (skewed) and forced-balanced routing; checkpoints cross modes."""

import shutil

import pytest

from moetrain.cli import train_main
from tests.distributed import run_distributed
from tests.train_utils import losses, overrides, read_metrics


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def _train_body(rank, world_size, args):
    return train_main(args)


def _reference(tmp_path, cache_dir, *extra):
    run = tmp_path / "reference"
    assert train_main(overrides(run, cache_dir, "trainer.max_steps=20", *extra)) == 0
    return losses(run)


# The tiny model routes a few hundred rows per step, fewer than one replica's default copy cost (flops_per_byte=80:
# ~107 rows): flops_per_byte=0 (copies free) makes these runs place replicas, which is what they test. The balanced
# run keeps the default cost model and fallback.
FREE = "parallel.fssdp.flops_per_byte=0"


@pytest.mark.parametrize("world,extra", [
    (2, ("parallel.fssdp.budget=1", "parallel.fssdp.reshard_every=5", FREE)),
    (2, ("parallel.fssdp.budget=2", "parallel.fssdp.rematerialize=true", "parallel.fssdp.calibrate=true", FREE)),
    (4, ("parallel.fssdp.budget=1", "parallel.fssdp.reshard_every=7", "parallel.fssdp.rematerialize=true", FREE)),
    (2, ("parallel.fssdp.budget=1", "router.force_balanced=true")),
    (2, ("parallel.fssdp.budget=2", "parallel.fssdp.rematerialize=true", "parallel.pipeline_degree=2", FREE)),
], ids=["2ranks_reshard", "2ranks_remat_calibrated", "4ranks_reshard_remat", "2ranks_balanced", "2ranks_pipelined"])
def test_fssdp_loss_curve_matches_single_process(tmp_path, cache_dir, world, extra):
    router_extra = [e for e in extra if e.startswith("router.")]
    ref = _reference(tmp_path, cache_dir, *router_extra)
    run = tmp_path / "fssdp"
    args = overrides(run, cache_dir, "trainer.max_steps=20", "parallel.mode=fssdp", *extra)
    assert run_distributed(_train_body, world, args) == [0] * world
    got = losses(run)
    assert sorted(got) == list(range(1, 21))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), (step, got[step], ref[step])
    rows = read_metrics(run)
    replicas = [r["moe/layer0/replicas"] for r in rows if "moe/layer0/replicas" in r]
    assert replicas and all(len(rep) == 4 for rep in replicas)
    if "router.force_balanced=true" not in extra:
        assert any(sum(rep) > 4 for rep in replicas), "skewed routing should have produced replicas"
    owners = [r["moe/layer0/owners"] for r in rows if "moe/layer0/owners" in r]
    contiguous = sorted(owners[0])
    if any("reshard_every" in e for e in extra):
        assert any(o != contiguous for o in owners), "re-sharding by load should have moved some expert"


def test_fssdp_checkpoint_resumes_under_ep(tmp_path, cache_dir):
    ref = _reference(tmp_path, cache_dir, "trainer.checkpoint_every=10")
    src = tmp_path / "fssdp"
    args = overrides(src, cache_dir, "trainer.max_steps=20", "trainer.checkpoint_every=10", "parallel.mode=fssdp",
                     "parallel.fssdp.reshard_every=3")  # owners no longer contiguous when the checkpoint is written
    assert run_distributed(_train_body, 2, args) == [0, 0]
    dst = tmp_path / "ep"
    shutil.copytree(src / "checkpoints" / "step_00000010", dst / "checkpoints" / "step_00000010")
    assert run_distributed(_train_body, 2, overrides(dst, cache_dir, "trainer.max_steps=20", "parallel.ep=2")) == [0, 0]
    got = losses(dst)
    assert sorted(got) == list(range(11, 21))
    for step in got:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), (step, got[step], ref[step])
