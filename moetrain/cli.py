"""Console entry points: moetrain-train (= python -m moetrain.train), moetrain-prepare, moetrain-report.

    moetrain-train [-m] [--cfg [job|hydra|all]] [-cd DIR -cn NAME] [KEY=VALUE | GROUP=OPTION ...]

moetrain-train speaks Hydra's command line (moetrain/launch/hydra_cli.py: sweeps, --cfg, --info, --help, -cd/-cn);
a single run, also one rank under torchrun, composes its config and trains here.
Errors the user can fix (bad flags or overrides, inconsistent settings, bad data or checkpoint paths) print one line,
`moetrain-train: error: ...`, and exit with status 2 before any process group starts.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def _user_errors() -> tuple[type[BaseException], ...]:
    from moetrain.config.validate import ConfigError
    from moetrain.data import DataError
    from moetrain.train.checkpoint import CheckpointError
    from moetrain.train.trainer import TrainingDiverged

    return ConfigError, DataError, CheckpointError, TrainingDiverged


def _fail(prog: str, msg: str, rank: int) -> int:
    if rank == 0:
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return 2


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    from moetrain.config.compose import compose_config
    from moetrain.config.validate import validate
    from moetrain.launch.hydra_cli import parse_command_line, run_command, version_text
    from moetrain.parallel.mesh import env_world

    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(version_text())
        return 0
    rank, world_size, _ = env_world()
    errors = _user_errors()
    try:
        command = parse_command_line(args)
        if command.action != "run":  # help, --cfg, --info, a sweep (-m)
            return run_command(command)
        cfg = compose_config(command.overrides, source=command.source)
        if cfg.trainer.dry_run:  # validated for the world size it plans for
            return _dry_run(cfg, world_size)
        validate(cfg, world_size)
        return _train(cfg)
    except errors as e:
        return _fail("moetrain-train", str(e), rank)


def _dry_run(cfg, launched_world_size: int) -> int:
    """Parameter counts and the per-rank memory plan for trainer.dry_run_world_size ranks (0: the launched ones),
    from a meta-device model in this one process (no process group)."""
    from moetrain.model.transformer import count_parameters
    from moetrain.train.memory_plan import format_plan, plan_memory

    world_size = cfg.trainer.dry_run_world_size or launched_world_size
    plan = plan_memory(cfg, world_size)  # validates the layout for world_size first
    counts = count_parameters(cfg.model, cfg.router)
    m = cfg.model
    experts = m.num_experts if m.experts_per_layer is None else f"{m.experts_per_layer} (per MoE layer)"
    print(f"model {m.name}: {m.n_layers} layers, dim {m.dim}, {experts} experts (top-{cfg.router.top_k}, "
          f"hidden {m.moe_hidden}, {m.num_shared_experts} shared)")
    for key, value in counts.items():
        print(f"  {key:>22}: {value:>17,d}  ({value / 1e9:.2f}B)")
    print(format_plan(plan))
    return 0


def _train(cfg) -> int:
    """Train on this rank. On several ranks a heartbeat thread runs alongside; a collective that fails or times out
    (a peer died or froze) prints one line naming the rank that stopped answering and exits with status 1 at once,
    without waiting in process-group teardown, so that torchrun can restart the workers."""
    import os
    import signal
    import threading

    import torch.distributed as dist

    from moetrain.parallel.mesh import env_world, init_parallel
    from moetrain.parallel.watchdog import Heartbeat, is_collective_failure
    from moetrain.train.trainer import Trainer

    # FSSDP shards experts over every rank: its expert group is the whole world.
    ep = env_world()[1] if cfg.parallel.mode == "fssdp" else cfg.parallel.ep
    timeout_s = cfg.parallel.timeout_s
    ctx = init_parallel(ep, cfg.trainer.device, cfg.parallel.backend, timeout_s)
    heartbeat = Heartbeat(ctx.store, ctx.rank, ctx.world_size, timeout_s).start() if ctx.is_distributed else None
    try:
        Trainer(cfg, ctx).run()
    except Exception as e:
        # Errors that already are one line (e.g. a checkpoint error caused inside torch.distributed.checkpoint)
        # go to train_main as they are; only a failed collective is the watchdog's to report.
        if heartbeat is None or isinstance(e, _user_errors()) or not is_collective_failure(e):
            raise
        if threading.current_thread() is threading.main_thread():  # no graceful stop is possible now:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a launcher's SIGTERM ends us at once
        print(f"moetrain-train: error: {heartbeat.diagnose(e)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # destroy_process_group could wait on the peer that stopped answering
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def prepare_main(argv: Optional[Sequence[str]] = None) -> int:
    from moetrain.data.prepare import main

    return main(argv)


def report_main(argv: Optional[Sequence[str]] = None) -> int:
    from moetrain.telemetry.report import main

    return main(argv)

