"""End-to-end training: the loss falls, resume is exact, data parallel matches one process, dry runs count."""

import shutil
import subprocess
import sys

import pytest

from moetrain.cli import train_main
from tests.distributed import run_distributed
from tests.train_utils import losses, overrides, read_metrics


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def test_training_reduces_loss_and_writes_metrics(tmp_path, cache_dir):
    run = tmp_path / "run"
    assert train_main(overrides(run, cache_dir, "trainer.max_steps=30", "optim.lr=1e-2")) == 0
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    for key in ("loss", "lr", "tokens_per_s", "moe/layer0/max_vio", "moe/layer0/tokens_per_expert"):
        assert key in rows[0], key
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert "val_loss" in rows[-1]
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").is_file()


def test_resume_is_exact(tmp_path, cache_dir):
    run = tmp_path / "run"
    args = overrides(run, cache_dir, "trainer.max_steps=10", "trainer.checkpoint_every=5", "trainer.keep_checkpoints=3")
    assert train_main(args) == 0
    full = losses(run)
    # Simulate a crash right after the step-5 checkpoint: drop the later checkpoint and the later metrics.
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    (run / "checkpoints" / "latest").unlink()
    (run / "metrics.jsonl").unlink()
    assert train_main(args) == 0
    resumed = losses(run)
    assert sorted(resumed) == list(range(6, 11))
    for step in range(6, 11):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


def _train_body(rank, world_size, args):
    return train_main(args)


def test_ddp_two_ranks_matches_one_process_and_resumes(tmp_path, cache_dir):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ("trainer.max_steps=8", "trainer.checkpoint_every=4")
    assert train_main(overrides(single, cache_dir, *common)) == 0
    assert run_distributed(_train_body, 2, overrides(multi, cache_dir, *common)) == [0, 0]
    ref, got = losses(single), losses(multi)
    assert sorted(got) == list(range(1, 9))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step
    shutil.rmtree(multi / "checkpoints" / "step_00000008")
    (multi / "checkpoints" / "latest").unlink()
    (multi / "metrics.jsonl").unlink()
    assert run_distributed(_train_body, 2, overrides(multi, cache_dir, *common)) == [0, 0]
    resumed = losses(multi)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step


def test_fsdp_two_ranks_matches_one_process(tmp_path, cache_dir):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ("trainer.max_steps=5",)
    assert train_main(overrides(single, cache_dir, *common)) == 0
    assert run_distributed(_train_body, 2, overrides(multi, cache_dir, *common, "parallel.data_parallel=fsdp")) == [0, 0]
    ref, got = losses(single), losses(multi)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step


def test_torchrun_two_ranks_matches_one_process(tmp_path, cache_dir):
    single, multi = tmp_path / "single", tmp_path / "multi"
    common = ("trainer.max_steps=6",)
    assert train_main(overrides(single, cache_dir, *common)) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "moetrain.train", *overrides(multi, cache_dir, *common)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = losses(single), losses(multi)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-5), step


def test_dry_run_counts_mixtral(capsys):
    assert train_main(["model=mixtral_8x7b", "router=mixtral", "trainer.dry_run=true"]) == 0
    out = capsys.readouterr().out
    total = int(next(ln for ln in out.splitlines() if " total:" in ln).split(":")[1].split("(")[0].replace(",", ""))
    active = int(next(ln for ln in out.splitlines() if " active:" in ln).split(":")[1].split("(")[0].replace(",", ""))
    assert 46.0e9 < total < 47.5e9  # Mixtral-8x7B: 46.7B total
    assert 12.5e9 < active < 13.2e9  # 12.9B active


def test_activation_checkpointing_counts_tokens_once_and_matches(tmp_path, cache_dir):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    common = ("trainer.max_steps=4", "router.aux_loss_coeff=0.01", "router.z_loss_coeff=0.001",
              "router.seq_aux_loss_coeff=0.001")
    assert train_main(overrides(plain, cache_dir, *common)) == 0
    assert train_main(overrides(ckpt, cache_dir, *common, "trainer.activation_checkpointing=full")) == 0
    a, b = read_metrics(plain), read_metrics(ckpt)
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-6)
        # Recomputation in backward must not count the micro-batch a second time.
        assert rb["moe/layer0/tokens_per_expert"] == ra["moe/layer0/tokens_per_expert"]
        assert sum(ra["moe/layer0/tokens_per_expert"]) == 8 * 32 * 2  # global batch * seq_len * top_k
        assert rb["moe/layer0/bias_max"] == ra["moe/layer0/bias_max"]
    for key in ("aux/aux", "aux/seq_aux", "aux/z", "moe/layer0/entropy", "time/forward_s", "time/backward_s"):
        assert key in a[0], key
    assert a[0]["aux_loss"] == pytest.approx(a[0]["aux/aux"] + a[0]["aux/seq_aux"] + a[0]["aux/z"])
    assert 0 < a[0]["moe/layer0/entropy"] <= 1.3863 + 1e-6  # ln(4 experts)
