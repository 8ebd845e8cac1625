"""Config composition and validation: structured schema errors and semantic errors are one clear line, exit 2."""

import os
import subprocess
import sys

import pytest

from moetrain.cli import train_main
from moetrain.config.compose import compose_config
from moetrain.config.validate import check


def test_overrides_compose_into_typed_config():
    cfg = compose_config(["model.num_experts=16", "router.top_k=4", "optim.lr=1e-3", "trainer.max_steps=50",
                          "parallel.ep=2", "router.capacity_factor=1.25"])
    assert cfg.model.num_experts == 16 and cfg.router.top_k == 4 and cfg.optim.lr == 1e-3
    assert cfg.trainer.max_steps == 50 and cfg.parallel.ep == 2 and cfg.router.capacity_factor == 1.25
    assert cfg.trainer.run_dir == "runs/tiny"


@pytest.mark.parametrize("args,needle", [
    (["model.num_expert=8"], "unknown config key 'model.num_expert'"),
    (["router.top_k=two"], "router.top_k=two"),
    (["model=gpt5"], "Could not find 'model/gpt5'"),
    (["trainer.max_steps"], "trainer.max_steps"),
    (["router.top_k=9"], "router.top_k=9 must be between 1 and model.num_experts=8"),
    (["parallel.ep=3"], "model.num_experts=8 is not divisible by parallel.ep=3"),
    (["parallel.ep=2"], "world size 1 is not divisible by parallel.ep=2"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len=1024"),
    (["data=shards"], "data.name=shards needs data.path=DIR"),
    (["data=shards", "data.path=/nonexistent/dir"], "data.path=/nonexistent/dir is not a shard directory"),
    (["trainer.run_dir=/proc/moetrain-run"], "trainer.run_dir=/proc/moetrain-run cannot be written"),
    (["data.global_batch_size=10", "data.micro_batch_size=4"], "data.global_batch_size=10 must be a positive multiple"),
    (["model.dim=100", "model.n_heads=3"], "model.dim=100 must be a positive multiple of model.n_heads=3"),
    (["router.score_func=relu"], "router.score_func='relu' is unknown"),
    (["router.capacity_factor=0"], "router.capacity_factor=0.0 must be > 0"),
    (["parallel.mode=tp"], "parallel.mode='tp' is unknown"),
    (["trainer.resume=/nonexistent/ckpt"], "trainer.resume=/nonexistent/ckpt is not a complete checkpoint"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    (["parallel.pipeline_degree=3"], "parallel.pipeline_degree='3' is invalid; use auto, 1, 2, 4 or 8"),
    (["parallel.dp_replicate=2"], "parallel.dp_replicate=2 needs parallel.data_parallel=fsdp"),
    (["parallel.data_parallel=fsdp", "parallel.dp_replicate=2"],
     "parallel.dp_replicate=2 must divide the world size 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetrain-train: error:"), err
    assert needle in err, err
    assert "Traceback" not in err
    lines = err.splitlines()
    if "config problems:" in lines[0]:  # several independent problems: one line each
        assert all(line.startswith("  - ") for line in lines[1:]) and len(lines) == int(lines[0].split()[2]) + 1
    else:
        assert len(lines) == 1, err


def test_several_problems_reported_together():
    cfg = compose_config(["router.top_k=9", "optim.lr=0"])
    errors = check(cfg, world_size=1)
    assert len(errors) == 2


def test_bad_input_from_the_command_line_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "moetrain.train", "router.top_k=0"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("moetrain-train: error: router.top_k=0 must be between 1 and "
                                   "model.num_experts=8; lower router.top_k or raise model.num_experts")
    assert not (tmp_path / "runs").exists()
