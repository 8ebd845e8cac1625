"""The jobs of a sweep (`moetrain-train -m ...`): Hydra's sweeper makes the list, its launcher calls `SweepJob` once
per job (per task, for a multi-task launcher), and the job trains into its own run directory,
`hydra.sweep.dir/hydra.sweep.subdir` (the job's overrides, e.g. `runs/multirun/<time>/optim.lr=0.001,router.top_k=1`).

How a job runs depends on the launcher:
  * Hydra's basic launcher (the default) calls the jobs one after another inside the `moetrain-train -m` process;
    each job then trains in a child process, `python -m moetrain.train <the job's overrides> trainer.run_dir=<dir>`,
    so it starts from a clean state (no process group, RNG, signal handler, logger or cache left by the job
    before) and its exit status is exactly that of a single run;
  * a launcher that starts processes itself (hydra/launcher=submitit_local | submitit_slurm, one process per task)
    trains in that process: the torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) come from submitit's view of the job (SLURM's variables on a cluster), the port derived
    from the job id so that concurrent jobs do not meet.

A job returns the last validation loss of its run (else the last training loss), the objective sweeper plugins such
as hydra-optuna-sweeper minimise. A job that fails raises `JobFailed` with its exit status; Hydra's basic sweeper
runs the rest of the batch (by default every job) and then raises the first failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from moetrain.config.compose import ConfigSource

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class JobFailed(RuntimeError):
    """A sweep job ended with a non-zero exit status (2: bad input, as for a single run)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message, status)

    @property
    def status(self) -> int:
        return self.args[1]

    def __str__(self) -> str:
        return self.args[0]


def hydra_quote(value: str) -> str:
    """`value` as a quoted Hydra override value (a run directory holds '=' and ',', which would parse as a sweep)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def final_loss(run_dir: Path) -> Optional[float]:
    """The last `val_loss` in RUN_DIR/metrics.jsonl, else the last `loss`; None without either."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    val, train = None, None
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            val = row.get("val_loss", val)
            train = row.get("loss", train)
    return val if val is not None else train


def submitit_torch_env() -> dict[str, str]:
    """torch.distributed's variables for this submitit task: one task per rank (one per GPU), ranks in task order,
    rank 0's host as the rendezvous address (loopback for the local executor) and a port in [20000, 60000) derived
    from the job id."""
    import submitit

    job = submitit.JobEnvironment()
    local = job.name() == "local"
    return {
        "RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
        "MASTER_ADDR": "127.0.0.1" if local else job.hostnames[0],
        "MASTER_PORT": str(20000 + zlib.crc32(str(job.job_id).encode()) % 40000),
    }


@dataclass
class SweepJob:
    """Hydra's task function for a sweep (picklable, so submitit can ship it to its processes)."""

    source: ConfigSource

    def __call__(self, dcfg) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        overrides = list(hydra_cfg.overrides.task)
        label = f"#{hydra_cfg.job.num} ({hydra_cfg.job.override_dirname or 'nothing swept'})"
        if hydra_cfg.launcher.get("_target_") == BASIC_LAUNCHER:
            status = self._run_child(overrides, run_dir)
        else:
            status = self._run_here(dcfg, run_dir)
        if status != 0:
            raise JobFailed(f"sweep job {label} failed with exit status {status} (its run directory: {run_dir})",
                            status)
        loss = final_loss(run_dir)
        if os.environ.get("RANK", "0") == "0":
            print(f"[sweep] job {label}: done, final loss {loss} -> {run_dir}", flush=True)
        return loss

    def _run_child(self, overrides: list[str], run_dir: Path) -> int:
        cmd = [sys.executable, "-m", "moetrain.train", *self.source.argv(), *overrides,
               f"trainer.run_dir={hydra_quote(str(run_dir))}"]
        return subprocess.run(cmd).returncode

    def _run_here(self, dcfg, run_dir: Path) -> int:
        from omegaconf import OmegaConf

        from moetrain.cli import _fail, _train, _user_errors
        from moetrain.config.validate import validate
        from moetrain.parallel.mesh import env_world

        if "SUBMITIT_EXECUTOR" in os.environ:
            os.environ.update(submitit_torch_env())
        rank, world_size, _ = env_world()
        try:
            cfg = OmegaConf.to_object(dcfg)
            cfg.trainer.run_dir = str(run_dir)
            validate(cfg, world_size)
            return _train(cfg)
        except _user_errors() as e:
            return _fail("moetrain-train", str(e), rank)
        except Exception:  # noqa: BLE001 - a crash is this job's failure (traceback in its log), not the sweep's
            traceback.print_exc()
            return 1
