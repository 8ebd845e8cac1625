"""Fault injection in the training loop: non-finite steps, preemption by SIGTERM, resuming with changed settings,
metrics after a crash, run-time state across a resume, and a validation loss that does not depend on the layout.

Checkpoint damage lives in test_checkpoint_faults.py, dead and frozen ranks in test_faults_ranks.py, bad config
values in test_validate_props.py.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.config.validate import validate
from moetrain.parallel.mesh import init_parallel
from moetrain.train import checkpoint as ckpt
from moetrain.train.trainer import Trainer, TrainingDiverged
from tests.distributed import run_distributed
from tests.train_utils import losses, overrides, read_metrics


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def _trainer(args, world_size=1) -> Trainer:
    cfg = compose_config(args)
    validate(cfg, world_size)
    ep = world_size if cfg.parallel.mode == "fssdp" else cfg.parallel.ep
    return Trainer(cfg, init_parallel(ep, "cpu", "gloo"))


def _train_body(rank, world_size, args):
    return train_main(args)


# ------------------------------------------------------------------------------------------------- non-finite steps


def test_learning_rate_blowup_stops_without_losing_the_healthy_checkpoint(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    args = overrides(run, cache_dir, "trainer.max_steps=30", "optim.lr=1e6", "optim.warmup_steps=0",
                     "trainer.checkpoint_every=1", "trainer.keep_checkpoints=1", "trainer.max_bad_steps=3")
    assert train_main(args) != 0
    err = capsys.readouterr().err
    last_line = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last_line.startswith("moetrain-train: error: training diverged") and "3 steps in a row" in last_line
    rows = [r for r in read_metrics(run) if "loss" in r]
    bad = [r["step"] for r in rows if not (math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]))]
    assert len(bad) == 3 and bad == list(range(bad[0], bad[0] + 3)) and rows[-1]["step"] == bad[-1]
    assert rows[-1]["skipped_steps"] == 3
    # Every checkpoint on disk came from a healthy step, and keep_checkpoints=1 did not rotate it away.
    latest = ckpt.find_latest(run / "checkpoints")
    assert latest is not None and int(latest.name.split("_")[1]) == bad[0] - 1
    assert str(latest) in last_line
    model = _trainer(overrides(tmp_path / "probe", cache_dir, "trainer.max_steps=1")).model
    ckpt.load_checkpoint(latest, model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_healthy_step_that_overflowed_the_weights_is_not_checkpointed(tmp_path, cache_dir, capsys):
    trainer = _trainer(overrides(tmp_path / "run", cache_dir, "trainer.max_steps=2"))
    assert trainer.save() is not None  # step 0, finite
    with torch.no_grad():
        next(trainer.model.parameters())[0].fill_(float("inf"))
    trainer.step = 1
    assert trainer.save() is None
    assert "not writing a checkpoint" in capsys.readouterr().err
    assert [p.name for p in ckpt.find_latest(tmp_path / "run" / "checkpoints").parent.glob("step_*")] == ["step_00000000"]


class _PoisonOnce:
    """A forward hook that turns the logits into NaN for one training step on one rank."""

    def __init__(self, trainer: Trainer, step: int, rank: int):
        self.trainer, self.step, self.rank = trainer, step, rank

    def __call__(self, module, inputs, output):
        if self.trainer.step == self.step and self.trainer.ctx.rank == self.rank and module.training:
            return output * float("nan")
        return output


def _one_bad_step_body(rank, world_size, args, bad_step, bad_rank):
    trainer = _trainer(args, world_size)
    trainer.model.output.register_forward_hook(_PoisonOnce(trainer, bad_step, bad_rank))
    snapshots = {}
    original = trainer.train_step

    def train_step():
        before = [p.detach().clone() for p in trainer.model.parameters()]
        bias = [m.router.expert_bias_E.clone() for m in trainer.balance.layers]
        metrics = original()
        snapshots[trainer.step] = (
            all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters())),
            all(torch.equal(a, m.router.expert_bias_E) for a, m in zip(bias, trainer.balance.layers)))
        return metrics

    trainer.train_step = train_step
    trainer.run()
    return snapshots


@pytest.mark.parametrize("world_size", [1, 2])
def test_one_non_finite_step_is_skipped_on_every_rank(tmp_path, cache_dir, world_size):
    run = tmp_path / "run"
    args = overrides(run, cache_dir, "trainer.max_steps=6", "trainer.checkpoint_every=3")
    if world_size == 1:
        results = [_one_bad_step_body(0, 1, args, 3, 0)]
    else:  # only rank 1 sees the NaN: both ranks must skip the same step
        results = run_distributed(_one_bad_step_body, 2, args, 3, 1)
    for snapshots in results:
        # the step counted as 4 (0-based step 3) left weights and router biases untouched; the others moved them
        assert snapshots[4] == (True, True)
        assert all(not unchanged for step, (unchanged, _) in snapshots.items() if step != 4)
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert not math.isfinite(rows[4]["loss"]) and rows[3]["skipped_steps"] == 0 and rows[6]["skipped_steps"] == 1
    assert all(math.isfinite(rows[s]["loss"]) for s in (1, 2, 3, 5, 6))
    assert (run / "checkpoints" / "step_00000006" / "COMPLETE").is_file()


# ---------------------------------------------------------------------------------------------------- preemption


def _wait_for_rows(run: Path, count: int, proc: subprocess.Popen, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        path = run / "metrics.jsonl"
        if path.exists() and sum(1 for ln in path.read_text().splitlines() if '"loss"' in ln) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run} did not log {count} steps in {limit_s} s")


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the torchrun workers under `launcher_pid`."""
    out = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ranks:
            out[int(ranks[0])] = pid
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_sigterm_saves_and_resumes_on_the_uninterrupted_curve(tmp_path, cache_dir, world_size):
    common = ("trainer.max_steps=40", "trainer.checkpoint_every=0")
    ref_run, run = tmp_path / "reference", tmp_path / "preempted"
    assert train_main(overrides(ref_run, cache_dir, *common)) == 0
    args = overrides(run, cache_dir, *common)
    if world_size == 1:
        cmd = [sys.executable, "-m", "moetrain.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "moetrain.train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(run, 3, proc)
        if world_size == 1:
            target = proc.pid
        else:  # as when one node of a job is preempted: only rank 1 gets the signal, and every rank must stop
            target = _worker_pids(proc.pid)[1]
        sent = time.monotonic()
        os.kill(target, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert elapsed < 30
    saved = ckpt.find_latest(run / "checkpoints")
    stopped_at = int(saved.name.split("_")[1])
    assert 3 <= stopped_at < 40 and f"SIGTERM: stopped after step {stopped_at}" in err
    assert max(r["step"] for r in read_metrics(run)) == stopped_at
    if world_size == 1:
        assert train_main(args) == 0
    else:
        assert run_distributed(_train_body, world_size, args) == [0] * world_size
    ref, got = losses(ref_run), losses(run)
    assert sorted(got) == list(range(1, 41))
    for step in range(stopped_at + 1, 41):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step


# ------------------------------------------------------------------------------------------------------- resuming


def test_resume_with_new_optimizer_settings_uses_them(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    assert train_main(overrides(run, cache_dir, "trainer.max_steps=5", "optim.schedule=constant",
                                "optim.warmup_steps=0")) == 0
    capsys.readouterr()
    new = ("trainer.max_steps=8", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=1e-3",
           "optim.weight_decay=0.0", "optim.beta2=0.99")
    trainer = _trainer(overrides(run, cache_dir, *new))
    trainer.maybe_resume()
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "overrides the checkpoint" in ln)
    for change in ("optim.lr 0.003 -> 0.001", "optim.beta1/beta2 (0.9, 0.95) -> (0.9, 0.99)",
                   "optim.weight_decay 0.1 -> 0", "trainer.max_steps 5 -> 8"):
        assert change in line, (change, line)
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3) and group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.0
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    assert trainer.optimizer.state  # the moments came from the checkpoint
    trainer.loggers = None
    # Through the command line: the logged lr is the new one and config.yaml says so.
    assert train_main(overrides(run, cache_dir, *new)) == 0
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert rows[5]["lr"] == pytest.approx(3e-3) and rows[6]["lr"] == pytest.approx(1e-3)
    assert "lr: 0.001" in (run / "config.yaml").read_text()


def test_resume_after_a_crash_never_logs_a_step_twice(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = overrides(run, cache_dir, "trainer.max_steps=10", "trainer.checkpoint_every=4", "trainer.keep_checkpoints=5")
    assert train_main(args) == 0
    full = losses(run)
    # A crash after step 10 was logged but before its checkpoint was written:
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 1.0')  # and a row cut in the middle
    assert train_main(args) == 0
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, 11))
    assert losses(run) == full


def test_resume_auto_falls_back_past_a_damaged_checkpoint(tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    args = overrides(run, cache_dir, "trainer.max_steps=8", "trainer.checkpoint_every=4", "trainer.keep_checkpoints=3")
    assert train_main(args) == 0
    full = losses(run)
    shard = next((run / "checkpoints" / "step_00000008").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the newest checkpoint
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert train_main(args) == 0
    out, err = capsys.readouterr()
    assert "skipping checkpoint" in err and "step_00000008" in err
    assert "step_00000004 at step 4" in out
    got = losses(run)
    assert sorted(got) == list(range(1, 9))
    assert got == full  # steps 5-8 replayed exactly from the intact step-4 checkpoint


def _owners_and_degrees(run):
    rows = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    return {s: (r["moe/layer0/owners"], r["moe/layer0/pipeline_degree"]) for s, r in rows.items()}


def test_resume_restores_fssdp_owners_and_pipeline_choice(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = overrides(run, cache_dir, "trainer.max_steps=9", "trainer.checkpoint_every=6", "parallel.mode=fssdp",
                     "parallel.fssdp.reshard_every=2", "parallel.fssdp.window=4", "parallel.pipeline_degree=auto")
    assert run_distributed(_train_body, 2, args) == [0, 0]
    full, full_losses = _owners_and_degrees(run), losses(run)
    assert full[6][0] != sorted(full[6][0])  # owners moved away from the contiguous start before the checkpoint
    shutil.rmtree(run / "checkpoints" / "step_00000009")
    (run / "checkpoints" / "latest").unlink()
    assert run_distributed(_train_body, 2, args) == [0, 0]
    resumed = _owners_and_degrees(run)
    for step in (7, 8, 9):
        assert resumed[step] == full[step], step
    for step in (7, 8, 9):
        assert losses(run)[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-5)


def test_degree_tuner_state_round_trip():
    from moetrain.parallel.pipeline import DegreeTuner

    a = DegreeTuner(4, None, trial_steps=1)
    for seconds in (3.0, 1.0, 2.0):  # degrees 1, 2, 4
        a.record(seconds, 64)
        a.end_step(torch.tensor([1.0, 2.0, 3.0]))
    b = DegreeTuner(4, None, trial_steps=1)
    assert b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.degree == a.degree == 2 and b.chosen == 2
    b.end_step(torch.tensor([3.0, 2.0, 1.0]))  # the load drifted from the one at decision time: trials restart
    assert b.chosen is None
    assert not DegreeTuner(2, None).load_state_dict(a.state_dict())  # other candidates: measured again


# --------------------------------------------------------------------------------------------------- evaluation


def _val_loss_body(rank, world_size, args):
    return _trainer(args, world_size).evaluate()["val_loss"]


def test_val_loss_does_not_depend_on_the_layout(tmp_path, cache_dir):
    args = overrides(tmp_path / "run", cache_dir, "trainer.max_steps=1", "trainer.eval_batches=2")
    single = _val_loss_body(0, 1, args)
    other_micro = _val_loss_body(0, 1, [*args, "data.micro_batch_size=4"])
    two_ranks = run_distributed(_val_loss_body, 2, args)
    assert other_micro == pytest.approx(single, rel=1e-6)
    assert two_ranks == pytest.approx([single, single], rel=1e-6)


def test_eval_batches_zero_means_no_evaluation(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert train_main(overrides(run, cache_dir, "trainer.max_steps=3", "trainer.eval_every=1",
                                "trainer.eval_batches=0")) == 0
    assert not any("val_loss" in r for r in read_metrics(run))
    assert "val_loss" not in json.loads((run / "summary.json").read_text())
