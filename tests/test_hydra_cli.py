"""Hydra's command line on moetrain-train: --help, --cfg job|hydra|all, --info, -cd/-cn on a run directory, sweeps
(-m) through the basic launcher and the local submitit launcher (two 2-rank jobs, each matching its torchrun twin),
bad flags as one line and exit 2; launch/slurm.sbatch's derivations and its signal handling, with fake SLURM tools."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moetrain.cli import train_main
from moetrain.config.compose import ConfigSource, compose_config, run_config_yaml
from moetrain.config.validate import ConfigError
from tests.distributed import free_port
from tests.train_utils import SMALL, losses, read_metrics

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm.sbatch"
FAST = [*SMALL, "trainer.max_steps=3", "trainer.eval_batches=0"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def one_thread(monkeypatch):
    """One intra-op thread in every process a sweep starts (the machine has 2 cores; torchrun does the same)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """A working directory that must stay empty (no .hydra/, outputs/ or logs from Hydra)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    assert list(cwd.iterdir()) == []


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("moetrain-train: error:") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------------ printing commands
def test_help_lists_groups_options_and_flags(capsys):
    assert train_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "model    deepseek_v3_like, mixtral_8x7b, olmoe_like, qwen3_moe_like, small, tiny" in out
    assert "expert_choice" in out and "schema_" not in out  # presets, not the routing methods' schema nodes
    for flag in ("--cfg", "--multirun", "--config-dir", "--config-name", "--info", "--hydra-help", "--resolve"):
        assert flag in out


def test_cfg_prints_job_hydra_and_packages(capsys, empty_cwd):
    assert train_main(["--cfg", "model=small"]) == 0  # alone: every key and its value, resolved
    out = capsys.readouterr().out
    assert "name: small" in out and "run_dir: runs/small" in out and "hydra:" not in out
    assert train_main(["--cfg", "job"]) == 0  # Hydra's --cfg job: interpolations as written
    assert "run_dir: runs/${model.name}" in capsys.readouterr().out
    assert train_main(["--cfg", "job", "--resolve", "--package", "router", "router=top_p"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# @package router") and "method: top_p" in out and "model:" not in out
    assert train_main(["--cfg", "hydra"]) == 0
    out = capsys.readouterr().out
    assert "subdir: ${hydra:job.override_dirname}" in out and "output_subdir: null" in out and "\nmodel:" not in out
    assert train_main(["--cfg", "all", "-m", "router.top_k=1,2"]) == 2  # Hydra: one command at a time
    one_error_line(capsys)


def test_hydra_help_and_shell_completion(capsys, empty_cwd):
    assert train_main(["--hydra-help"]) == 0
    assert "hydra/launcher: basic" in capsys.readouterr().out
    assert train_main(["-sc", "install=bash"]) == 0
    assert "complete -o nospace -o default -F hydra_bash_completion" in capsys.readouterr().out  # for sys.argv[0]


def test_info_shows_the_defaults_list(capsys, empty_cwd):
    assert train_main(["--info", "defaults", "model=small"]) == 0
    out = capsys.readouterr().out
    assert "moetrain_hydra" in out and "model/small" in out


@pytest.mark.parametrize("args,needle", [
    (["--cfg", "jobs"], "invalid choice: 'jobs'"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--resolve"], "--resolve only goes with --cfg"),
    (["-cp", "confs"], "use --config-dir confs"),
    (["-cd", "/nonexistent/run", "-cn", "config"], "--config-dir /nonexistent/run is not a directory"),
    (["-cn", "no_such_config"], "Cannot find primary config 'no_such_config'"),
    (["-m", "trainer.run_dir=runs/a,runs/b"], "trainer.run_dir is set per sweep job"),
    (["-m", "router.top_k=2,9"], "sweep job #1 (router.top_k=9): router.top_k=9 must be between 1 and"),
    (["-m", "model=tiny,smal"], "sweep job #1 (model=smal): bad config or override: Could not find 'model/smal'"),
])
def test_bad_flags_and_sweeps_are_one_line_exit_2(args, needle, capsys, empty_cwd):
    assert train_main(args) == 2
    assert needle in one_error_line(capsys)


def test_multirun_under_torchrun_is_refused(capsys, monkeypatch, empty_cwd):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert train_main(["-m", "router.top_k=1,2"]) == 2
    assert "not under torchrun" in one_error_line(capsys)


# ------------------------------------------------------------------------------------ run directories as configs
@pytest.mark.parametrize("router", [[], ["router=expert_choice", "router.bucket_factor=1.5"], ["router=moepp"]])
def test_run_config_composes_back(tmp_path, router):
    """RUN_DIR/config.yaml as a primary config (-cd RUN_DIR -cn config) gives back the run's config, the routing
    method's own keys included; overrides and group presets apply on top."""
    cfg = compose_config(["model.dim=64", "optim.lr=1e-3", f"trainer.run_dir={tmp_path}", *router])
    (tmp_path / "config.yaml").write_text(run_config_yaml(cfg))
    source = ConfigSource(config_name="config", config_dir=str(tmp_path))
    assert compose_config([], source) == cfg
    varied = compose_config(["trainer.max_steps=7", "model=small"], source)
    assert varied.trainer.max_steps == 7 and varied.model.name == "small" and varied.model.dim == 384
    assert varied.optim.lr == 1e-3 and varied.router == cfg.router
    other = "router=top_p" if router else "router=expert_choice"  # the run's method would win over the preset's keys
    with pytest.raises(ConfigError, match="cannot change the routing method"):
        compose_config([other], source)


# -------------------------------------------------------------------------------------------------------- sweeps
def test_basic_sweep_one_run_directory_per_job(tmp_path, cache_dir, capsys, empty_cwd, one_thread):
    """-m with the basic sweeper and launcher: one job per value, each in its own run directory named by what varies,
    each a fresh process; no Hydra folders in the working directory; a job's directory continues with -cd/-cn."""
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", "router.top_k=1,2"]
    assert train_main(args) == 0
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["router.top_k=1", "router.top_k=2"]
    assert not list(sweep.rglob(".hydra"))
    for top_k in (1, 2):
        run = sweep / f"router.top_k={top_k}"
        assert [row["step"] for row in read_metrics(run) if "loss" in row] == [1, 2, 3]
        cfg = compose_config([], ConfigSource(config_name="config", config_dir=str(run)))
        assert cfg.router.top_k == top_k and cfg.trainer.run_dir == str(run)
    out = capsys.readouterr().out
    assert "[sweep] job #1 (router.top_k=2): done, final loss" in out
    # the run's config continues it: 2 more steps from its checkpoint at step 3
    run = sweep / "router.top_k=2"
    assert train_main(["-cd", str(run), "-cn", "config", "trainer.max_steps=5"]) == 0
    assert [row["step"] for row in read_metrics(run) if "loss" in row] == [1, 2, 3, 4, 5]


def test_optuna_sweeper_minimises_the_final_loss(tmp_path, cache_dir, capsys, empty_cwd, one_thread):
    """hydra/sweeper=optuna (where hydra-optuna-sweeper is installed): each trial is a job whose return value, the
    run's final loss, is the objective."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, f"data.cache_dir={cache_dir}", f"hydra.sweep.dir={sweep}", "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "hydra.sweeper.sampler.seed=0",
            "optim.lr=tag(log, interval(1e-4, 1e-2))"]
    assert train_main(args) == 0
    trials = {float(p.name.split("=")[1]): losses(p)[3] for p in sweep.glob("optim.lr=*")}
    assert len(trials) == 2
    results = (sweep / "optimization_results.yaml").read_text()
    assert f"best_value: {min(trials.values())}" in results


def _torchrun(run_dir: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "moetrain.train", *FAST, f"data.cache_dir={cache_dir}", f"trainer.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_submitit_local_sweep_matches_torchrun(tmp_path, cache_dir, empty_cwd, one_thread):
    """Two 2-rank jobs (expert parallel over the 2 ranks) through hydra/launcher=submitit_local: each task gets its
    rank from submitit, and each job's loss curve is that of the same job under torchrun."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    twins = {k: _torchrun(tmp_path / f"twin{k}", cache_dir, "parallel.ep=2", f"router.top_k={k}") for k in (1, 2)}
    sweep = tmp_path / "sweep"
    args = ["-m", *FAST, f"data.cache_dir={cache_dir}", "parallel.ep=2", "router.top_k=1,2",
            f"hydra.sweep.dir={sweep}", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.timeout_min=10"]
    assert train_main(args) == 0
    for k, proc in twins.items():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        job = losses(sweep / f"router.top_k={k}")
        assert sorted(job) == [1, 2, 3]
        assert job == pytest.approx(losses(tmp_path / f"twin{k}"), rel=1e-5)
    assert len(list((sweep / "router.top_k=1" / "checkpoints").glob("step_*/__1_0.distcp"))) == 1  # 2 ranks wrote


# ------------------------------------------------------------------------------------------------ launch/slurm.sbatch
def test_sbatch_syntax():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


def _derive(env: dict, function: str) -> subprocess.CompletedProcess:
    script = f"source {SBATCH} && {function}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", "-c", script], env={**clean, **env}, capture_output=True, text=True)


@pytest.mark.parametrize("env,gpus", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, "4"),
    ({"SLURM_GPUS_PER_NODE": "8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
    ({"SLURM_GPUS_PER_NODE": "gpu:h100:2(IDX:0-1)"}, "2"),
])
def test_sbatch_gpus_per_node_from_slurm(env, gpus):
    result = _derive(env, "moetrain_gpus_per_node")
    assert result.returncode == 0 and result.stdout.strip() == gpus, result.stderr


def test_sbatch_refuses_a_job_without_gpus():
    result = _derive({}, "moetrain_gpus_per_node")
    assert result.returncode == 2 and "--gpus-per-node=N" in result.stderr


def test_sbatch_port_from_job_id():
    assert _derive({"SLURM_JOB_ID": "1234567"}, "moetrain_rdzv_port").stdout.strip() == str(20000 + 1234567 % 40000)
    assert "SLURM_JOB_ID is unset" in _derive({}, "moetrain_rdzv_port").stderr


FAKE_TOOLS = {
    # srun: run the command after srun's own options
    "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == -* ]]; do shift; done\nexec "$@"\n',
    # torchrun: record the arguments, then stand in for the workers: on SIGTERM "checkpoint" and exit 0
    "torchrun": '#!/usr/bin/env bash\ntrap \'echo checkpointed >> "$LOG"; exit 0\' TERM\n'
                'echo "torchrun $*" >> "$LOG"\nwhile :; do sleep 0.1; done\n',
    "scontrol": '#!/usr/bin/env bash\nif [[ "$1" == show ]]; then printf "node7\\nnode8\\n"; '
                'else echo "scontrol $*" >> "$LOG"; fi\n',
}


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_sbatch_forwards_sigterm_and_requeues_at_the_time_limit(tmp_path, sig, requeued):
    """The batch script under fake srun/torchrun/scontrol: torchrun gets the arguments derived from SLURM's variables;
    USR1 (the time-limit warning) reaches torchrun as SIGTERM and requeues the job, SIGTERM is forwarded only."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for name, text in FAKE_TOOLS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", LOG=str(log), SLURM_JOB_ID="4242", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="node[7-8]", SLURM_GPUS_PER_NODE="a100:4")
    proc = subprocess.Popen(["bash", str(SBATCH), "model=small", "trainer.run_dir=runs/x"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (log.exists() and "torchrun" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.wait(timeout=30)
    lines = log.read_text().splitlines()
    assert lines[0] == ("torchrun --nnodes=2 --nproc_per_node=4 --max-restarts=3 --rdzv_backend=c10d "
                        f"--rdzv_endpoint=node7:{20000 + 4242} --rdzv_id=4242 -m moetrain.train model=small "
                        "trainer.run_dir=runs/x")
    assert lines[1] == "checkpointed"
    assert lines[2:] == (["scontrol requeue 4242"] if requeued else [])
    assert proc.returncode == 0, proc.stdout.read()
