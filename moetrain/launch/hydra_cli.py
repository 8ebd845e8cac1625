"""Hydra's own command line for moetrain-train (= python -m moetrain.train, torchrun-compatible).

    moetrain-train [OVERRIDE ...]                              one run (also one rank under torchrun)
    moetrain-train -m [OVERRIDE ...]                           a sweep: one job per combination, one run directory each
    moetrain-train --cfg [job|hydra|all] [--resolve] [-p PKG]  print the composed config
    moetrain-train --info [all|config|defaults|defaults-tree|plugins|searchpath]
    moetrain-train -cd DIR -cn NAME [OVERRIDE ...]             primary config NAME.yaml from DIR (e.g. a run directory)
    moetrain-train --help | --hydra-help | --version | -sc install=bash

The flags are Hydra's (its argument parser); what they do is Hydra's too, with these differences: a single run goes
through moetrain.config.compose (no Hydra output folders, the working directory never changes; the run directory is
trainer.run_dir); `--cfg` without a type prints the job config with interpolations resolved (every key and its
value); `--config-path` is refused (it would replace the package's config tree; `-cd` adds a directory to it).
Every problem the user can fix is a ConfigError here, which moetrain-train prints as one line and exits 2 on.
"""

from __future__ import annotations

import argparse
import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence

from moetrain.config.compose import ConfigSource, create_hydra, describe_error
from moetrain.config.validate import ConfigError

CFG_TYPES = ("job", "hydra", "all")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
GROUPS = ("model", "router", "parallel", "optim", "data", "logger")


@dataclass
class Command:
    action: str  # run | multirun | cfg | info | help | hydra_help | shell_completion | version
    overrides: list[str] = field(default_factory=list)
    source: ConfigSource = ConfigSource()
    cfg_type: str = "job"
    resolve: bool = False
    package: Optional[str] = None
    info: str = "all"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its usage and exit; we want one line
        raise ConfigError(f"{message} (moetrain-train --help lists the options)")


def _parser() -> argparse.ArgumentParser:
    from hydra._internal.utils import get_args_parser

    hydra_parser = get_args_parser()
    parser = _Parser(prog="moetrain-train", add_help=False, parents=[hydra_parser], conflict_handler="resolve")
    parser.description = hydra_parser.description
    return parser


def _bare_cfg(argv: Sequence[str]) -> list[str]:
    """`--cfg` / `-c` without a type -> `--cfg job --resolve` (moetrain's `--cfg`: every key and its value)."""
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg in ("--cfg", "-c") and (following is None or following.startswith(("-", "~", "+")) or "=" in following):
            out += ["job", "--resolve"]
    return out


def parse_command_line(argv: Sequence[str]) -> Command:
    args = _parser().parse_intermixed_args(_bare_cfg(argv))
    if args.config_path is not None:
        raise ConfigError(f"--config-path {args.config_path} would replace moetrain's config tree; use --config-dir "
                          f"{args.config_path} (-cd), which adds the directory to it, with --config-name (-cn)")
    if args.experimental_rerun is not None:
        raise ConfigError("--experimental-rerun needs Hydra's pickled job config, which moetrain does not write; "
                          "rerun a run with -cd RUN_DIR -cn config")
    source = ConfigSource(config_name=args.config_name or "train", config_dir=args.config_dir)
    command = Command(action="run", overrides=list(args.overrides), source=source, resolve=args.resolve,
                      package=args.package)
    chosen = [name for name, on in (("run", args.run), ("multirun", args.multirun), ("cfg", args.cfg is not None),
                                    ("info", args.info is not None),
                                    ("shell_completion", args.shell_completion)) if on]
    if args.help or args.hydra_help:
        command.action = "help" if args.help else "hydra_help"
        return command
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join('--' + c.replace('_', '-') for c in chosen)} cannot be combined; choose one")
    if args.resolve and args.cfg is None:
        raise ConfigError("--resolve only goes with --cfg")
    command.action = chosen[0] if chosen else "run"
    command.cfg_type = args.cfg or "job"
    command.info = args.info or "all"
    return command


@contextmanager
def _own_logging():
    """Give the root logger back as it was: --info and sweeps configure Python logging for Hydra's messages, which
    must not outlive the command when moetrain-train is called in-process (tests, notebooks)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def run_command(command: Command) -> int:
    """Everything but a single run: help, --cfg, --info, a sweep."""
    with _own_logging():
        return _run_command(command)


def _run_command(command: Command) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if command.action == "multirun":
            return multirun(command)
        hydra = create_hydra(command.source)
        name, overrides = command.source.config_name, command.overrides
        if command.action == "help":
            print(help_text(hydra, name))
        elif command.action == "hydra_help":
            hydra.hydra_help(config_name=name, args_parser=_parser(), args=argparse.Namespace(overrides=overrides))
        elif command.action == "cfg":
            if command.cfg_type in ("job", "all"):  # unknown `+keys` and type errors as one line first
                from moetrain.config.compose import compose_dictconfig

                compose_dictconfig(overrides, source=command.source)
            hydra.show_cfg(config_name=name, overrides=overrides, cfg_type=command.cfg_type,
                           package=command.package, resolve=command.resolve)
        elif command.action == "info":
            hydra.show_info(command.info, config_name=name, overrides=overrides)
        elif command.action == "shell_completion":
            hydra.shell_completion(config_name=name, overrides=overrides)
        return 0
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(describe_error(e, command.source.config_name)) from None


def group_options(hydra, group: str) -> list[str]:
    """The presets of a config group (the routing methods' schema nodes left out)."""
    return [o for o in hydra.config_loader.get_group_options(group) if not o.startswith("schema_")]


def help_text(hydra, config_name: str) -> str:
    groups = "\n".join(f"  {g:<9}{', '.join(group_options(hydra, g))}" for g in GROUPS)
    return f"""usage: moetrain-train [OVERRIDE ...]      (= python -m moetrain.train; torchrun -m moetrain.train ...)
       moetrain-train -m [OVERRIDE ...]   a sweep (comma lists, range(), choice(), glob())
       moetrain-train --cfg [job|hydra|all] | --info [TOPIC] | -cd DIR -cn NAME [OVERRIDE ...]

Train a Mixture-of-Experts LM. Overrides are Hydra syntax (GROUP=OPTION, KEY=VALUE, +KEY=VALUE, ~KEY), e.g.
  moetrain-train model=tiny model.num_experts=16 router.top_k=4 optim.lr=1e-3 trainer.max_steps=50
  torchrun --nproc_per_node=2 -m moetrain.train parallel.ep=2
  moetrain-train -m router.top_k=1,2 optim.lr=1e-3,3e-3       # 4 jobs under runs/multirun/<time>/<overrides>
  moetrain-train -m hydra/launcher=submitit_slurm hydra.launcher.nodes=2 hydra.launcher.tasks_per_node=8 ...
  moetrain-train -cd runs/tiny -cn config trainer.max_steps=600  # continue a run's settings

Config groups (GROUP=OPTION; primary config: {config_name}):
{groups}

Options:
  --cfg, -c [job|hydra|all]  print the composed config and exit; alone: the job config with every value resolved
    --resolve, --package/-p PACKAGE   with --cfg: resolve interpolations, print one package (e.g. -p router)
  --multirun, -m             run a sweep with hydra.sweeper (basic, or a plugin) and hydra.launcher (basic: jobs
                             one after another, each in a fresh process; submitit_local | submitit_slurm)
  --config-dir, -cd DIR      search DIR for the primary config too (a run directory holds config.yaml)
  --config-name, -cn NAME    the primary config (default: train)
  --info, -i [all|config|defaults|defaults-tree|plugins|searchpath]   Hydra's information about the composition
  --hydra-help               Hydra's help: its own groups (hydra/launcher, hydra/sweeper, ...)
  --shell-completion, -sc    install=bash | zsh | fish: print a shell completion script
  --version                  moetrain's and Hydra's versions
trainer.dry_run=true prints parameter counts and the per-rank memory plan (trainer.dry_run_world_size=N) and exits.
Bad input prints one line, `moetrain-train: error: ...`, and exits 2. docs/configuration.md lists every key."""


def version_text() -> str:
    import hydra

    import moetrain

    return f"moetrain {getattr(moetrain, '__version__', '0.1.0')} (Hydra {hydra.__version__})"


# ------------------------------------------------------------------------------------------------------------ sweeps
def job_world_size(launcher) -> Optional[int]:
    """Ranks of one sweep job: 1 under the basic launcher, nodes x tasks_per_node under submitit, None if unknown."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("BasicLauncher"):
        return 1
    if "submitit" in target:
        return int(launcher.get("nodes", 1)) * int(launcher.get("tasks_per_node", 1))
    return None


def sweep_plan(hydra, command: Command):
    """(the composed multirun config, the command line's overrides parsed, the sweeper's own `params`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    cfg = hydra.compose_config(command.source.config_name, command.overrides, run_mode=RunMode.MULTIRUN,
                               with_log_configuration=False)
    params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=hydra.config_loader)
    return cfg, parser.parse_overrides(command.overrides), parser.parse_overrides(params)


def swept_keys(overrides, params) -> set[str]:
    """The keys whose value varies from job to job (the sweeper's params and the command line's sweeps)."""
    return {o.get_key_element() for o in params} | {o.get_key_element() for o in overrides if o.is_sweep_override()}


def fixed_keys(overrides, params) -> list[str]:
    """The keys the command line sets to one value for every job: left out of the job directory names, so that a
    job's directory is named by what varies (`optim.lr=0.001,router.top_k=1`), as Hydra's override_dirname would
    otherwise list every override."""
    return sorted({o.get_key_element() for o in overrides if not o.is_hydra_override()} - swept_keys(overrides, params))


def check_sweep(hydra, command: Command, cfg, overrides, params) -> int:
    """Compose and validate every job of a basic-sweeper sweep before the first starts (a bad value in one
    combination is one line and exit 2, with nothing run or written); return the number of jobs (0: not counted,
    a sweeper plugin chooses its jobs as it goes, and each job checks its own config)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from moetrain.config.compose import compose_config
    from moetrain.config.validate import validate

    if cfg.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return 0
    world_size = job_world_size(cfg.hydra.launcher)
    jobs = [job for batch in BasicSweeper.split_arguments(params + overrides, None) for job in batch]
    for num, job in enumerate(jobs):
        try:
            job_cfg = compose_config(job, source=command.source)
            if world_size is not None:
                validate(job_cfg, world_size)
        except ConfigError as e:
            swept = swept_keys(overrides, params)
            label = " ".join(o for o in job if o.lstrip("+~").split("=", 1)[0] in swept) or "nothing swept"
            raise ConfigError(f"sweep job #{num} ({label}): {e}") from None
    return len(jobs)


def multirun(command: Command) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from moetrain.launch.sweep import JobFailed, SweepJob
    from moetrain.parallel.mesh import env_world

    if env_world()[1] > 1:
        raise ConfigError("-m/--multirun launches its jobs itself: run it once, not under torchrun (multi-rank jobs: "
                          "hydra/launcher=submitit_local or submitit_slurm with hydra.launcher.tasks_per_node=N)")
    for override in command.overrides:
        if override.lstrip("+~").split("=", 1)[0] == "trainer.run_dir":
            raise ConfigError("trainer.run_dir is set per sweep job (hydra.sweep.dir/hydra.sweep.subdir); choose "
                              "where the sweep goes with hydra.sweep.dir=DIR instead")
    try:
        hydra = create_hydra(command.source)
        cfg, overrides, params = sweep_plan(hydra, command)
        check_sweep(hydra, command, cfg, overrides, params)
        exclude = ",".join(["trainer.run_dir", *fixed_keys(overrides, params)])
        hydra.multirun(config_name=command.source.config_name, task_function=SweepJob(command.source),
                       overrides=[*command.overrides, "hydra.mode=MULTIRUN",
                                  f"hydra.job.config.override_dirname.exclude_keys=[{exclude}]"])
    except JobFailed as e:
        print(f"moetrain-train: error: {e}", file=sys.stderr, flush=True)
        return e.status
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException, ValueError, OSError) as e:
        raise ConfigError(describe_error(e, command.source.config_name)) from None
    except Exception as e:  # a launcher's own failure, e.g. submitit's FailedJobError for a task that died
        if not type(e).__module__.startswith("submitit"):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"moetrain-train: error: sweep stopped, a submitit job died: {first} (its log: the sweep directory's "
              f".submitit/)", file=sys.stderr, flush=True)
        return 1
    return 0
