"""Compose a TrainConfig from the Hydra config tree and command-line overrides.

A single run composes here, through Hydra's config loader but not `@hydra.main`: the run directory is ours
(`trainer.run_dir`), the working directory never changes, Hydra writes nothing (no `.hydra/`, no `outputs/`), and a
bad override becomes one clear line instead of a traceback. Sweeps (`-m`) go through Hydra's sweepers and launchers
(moetrain/launch/hydra_cli.py), with the same config search path (`create_hydra`).

The primary config is `train` from the package's configs/, or `-cn NAME` found first in `-cd DIR` (Hydra's
`--config-name` and `--config-dir`), e.g. a run directory's `config.yaml`, which `run_config_yaml` writes so that
`moetrain-train -cd RUN_DIR -cn config [OVERRIDE ...]` continues that run's settings.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from omegaconf import OmegaConf

from moetrain.config.schema import TrainConfig, register_configs
from moetrain.config.validate import ConfigError, schema_keys


def config_dir() -> Path:
    """configs/ of a source checkout or editable install, else the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(f"cannot find the moetrain configs directory (looked beside {here.parents[1]}); reinstall "
                      f"moetrain with `pip install -e .` from a source checkout")


@dataclass(frozen=True)
class ConfigSource:
    """Where the primary config comes from: `config_name` (Hydra's -cn), searched in `config_dir` (Hydra's -cd,
    optional) as well as the package's configs/, whose groups (model=, router=, ...) resolve either way."""

    config_name: str = "train"
    config_dir: Optional[str] = None

    def argv(self) -> list[str]:
        """The same choice on another moetrain-train command line."""
        args = [] if self.config_dir is None else ["-cd", os.path.abspath(self.config_dir)]
        return args + ([] if self.config_name == "train" else ["-cn", self.config_name])


def create_hydra(source: ConfigSource = ConfigSource()):
    """A Hydra instance over the config search path: Hydra's own configs, the package's configs/, `-cd DIR` (where
    Hydra's own command line puts it: after the primary config directory, before the structured schemas), and the
    schemas of moetrain/config/schema.py."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.config_search_path import SearchPathQuery

    register_configs()
    GlobalHydra.instance().clear()
    search_path = create_config_search_path(f"file://{config_dir()}")
    if source.config_dir is not None:
        extra = os.path.abspath(source.config_dir)
        if not os.path.isdir(extra):
            raise ConfigError(f"--config-dir {source.config_dir} is not a directory; give the directory holding "
                              f"{source.config_name}.yaml (e.g. a run directory)")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    return Hydra.create_main_hydra2(task_name="moetrain-train", config_search_path=search_path)


def compose_dictconfig(overrides: Sequence[str] = (), config_name: str = "train",
                       source: Optional[ConfigSource] = None):
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    source = source or ConfigSource(config_name=config_name)
    try:
        hydra = create_hydra(source)
        dcfg = hydra.compose_config(source.config_name, list(overrides), run_mode=RunMode.RUN,
                                    with_log_configuration=False)
        with open_dict(dcfg):
            del dcfg["hydra"]
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        if source.config_name != "train" and "ConfigKeyError" in str(e) and any(
                re.match(r"^router(@[^=]*)?=", o) for o in overrides):  # a run's router keys on another method
            raise ConfigError(ROUTER_FIXED) from None
        raise ConfigError(describe_error(e, source.config_name)) from None
    extra = next(unknown_keys(OmegaConf.to_container(dcfg, resolve=False)), None)
    if extra is not None:  # `+key=value` adds a key the schema lacks; it would be dropped without a word
        raise ConfigError(f"bad config or override: {unknown_key(extra)}")
    return dcfg


def unknown_keys(tree: dict, prefix: str = "") -> Iterator[str]:
    """Dotted keys of a composed config (as a plain nested dict) that the schema does not have."""
    known = set(schema_keys())
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted not in known:
            yield dotted
        elif isinstance(value, dict):
            yield from unknown_keys(value, f"{dotted}.")


def did_you_mean(name: str, candidates: Sequence[str]) -> Optional[str]:
    """The candidate closest to a misspelled `name` (difflib), or None when nothing is close."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def nearest_key(key: str) -> Optional[str]:
    """The schema key a misspelled `key` most likely meant: among its siblings when its parent exists
    (`trainer.max_step` -> `trainer.max_steps`), else among the keys of the same depth (`trainr.seed`)."""
    keys = schema_keys()
    parent, _, leaf = key.rpartition(".")
    if parent and parent not in keys:
        return did_you_mean(key, [k for k in keys if k.count(".") == key.count(".")])
    siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent]
    best = did_you_mean(leaf, siblings)
    return None if best is None else f"{parent}.{best}" if parent else best


def method_of_key(key: str) -> list[str]:
    """The routing methods whose own config has `key` (`router.threshold` -> ['top_p'])."""
    from moetrain.config.validate import routers

    leaf = key.removeprefix("router.")
    return sorted(name for name, cls in routers().items() if leaf in {f.name for f in dataclasses.fields(cls.config_cls)})


def unknown_key(key: str) -> str:
    """'unknown config key ...' with the nearest schema key, or a pointer to --cfg when nothing is near; a key of
    another routing method names the preset that has it."""
    owners = method_of_key(key) if key.startswith("router.") else []
    if owners:
        presets = " or ".join(f"router={m}" for m in owners)
        return f"'{key}' is a key of the routing method {presets}, not of the selected one; select {presets} to use it"
    best = nearest_key(key)
    if best is not None:
        return f"unknown config key '{key}'; did you mean {best}?"
    return f"unknown config key '{key}' (check the spelling; `moetrain-train --cfg` prints every key)"


def one_line(text: str) -> str:
    """`text` with control characters escaped, so a message stays one printable line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def describe_error(e: BaseException, config_name: str = "train") -> str:
    """One line from a Hydra/OmegaConf exception chain: what failed, why, and what is available."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    unknown = _UNKNOWN_KEY.match(msg)
    if unknown:
        return one_line(f"bad config or override: {unknown_key(unknown.group(1))}")
    msg = msg.removeprefix(f"In '{config_name}': ")
    options = [ln for ln in lines[1:]  # the routing methods' schema nodes are no presets to choose
               if not ln.startswith(("Config search path", "provider=", "Available options", "schema_"))]
    if "Available options" in str(e):
        missing = _MISSING_OPTION.search(msg)
        best = did_you_mean(missing.group(2), options) if missing else None
        if best is not None:
            msg += f"; did you mean {missing.group(1)}={best}?"
        msg += f" (available: {', '.join(options)})"
        submitit = missing and missing.group(1) == "hydra/launcher" and missing.group(2).startswith("submitit")
        if submitit and best is None:
            msg += "; Hydra's submitit launchers come with `pip install moetrain[slurm]` (hydra-submitit-launcher)"
    cause = e.__cause__ or e.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause).strip():
        detail = str(cause).strip().splitlines()[0]
        if detail not in msg:
            msg += f": {detail}"
    return one_line(f"bad config or override: {msg}")


_UNKNOWN_KEY = re.compile(r"^Could not override '([^']+)'")
_MISSING_OPTION = re.compile(r"Could not find '([^']+)/([^'/]+)'")


def compose_config(overrides: Sequence[str] = (), source: Optional[ConfigSource] = None) -> TrainConfig:
    from omegaconf.errors import OmegaConfBaseException

    dcfg = compose_dictconfig(overrides, source=source)
    try:
        cfg = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as e:
        raise ConfigError(one_line(f"bad config value: {str(e).strip().splitlines()[0]}")) from None
    _check_router_node(cfg)
    return cfg


def _check_router_node(cfg: TrainConfig) -> None:
    """A router preset merged under a config that sets another method (`-cd RUN -cn config router=expert_choice`:
    the run's own router values, `method: topk` among them, land on top of the preset) would train the run's method
    with the preset's keys unused; refuse it. (A method set without its preset is validate.py's to report.)"""
    from moetrain.moe.routers import ROUTERS

    cls = ROUTERS.get(cfg.router.method)
    if cls is not None and type(cfg.router) is not cls.config_cls and isinstance(cfg.router, cls.config_cls):
        raise ConfigError(ROUTER_FIXED)


ROUTER_FIXED = ("router=NAME cannot change the routing method of a run directory's config.yaml (its router keys are "
                "the run's method's); change router.* keys, or choose router=NAME starting from the package config "
                "(without -cd/-cn)")


# The groups a run's config.yaml leaves open (`model: null`): selecting one on the command line (`model=small`) merges
# that preset over the run's values, as it would over train.yaml's.
RUN_CONFIG_GROUPS = ("model", "parallel", "optim", "data", "logger")


def run_config_yaml(cfg: TrainConfig) -> str:
    """RUN_DIR/config.yaml for `cfg`: every key and its value, under a defaults list that makes the file a primary
    config, so `moetrain-train -cd RUN_DIR -cn config [OVERRIDE ...]` composes exactly `cfg` (plus the overrides).

    The defaults list names the structured schema, the routing method's own schema node (`router: schema_<method>`,
    without which the method's keys would be unknown), moetrain's Hydra settings, then the file itself, then the
    groups as open slots. The routing method is the run's: override its keys (router.top_k=...), not `router=`."""
    defaults = ["train_schema", "moetrain_hydra", {"router": f"schema_{cfg.router.method}"}, "_self_",
                *({group: None} for group in RUN_CONFIG_GROUPS)]
    header = ("# moetrain run config: every key and its value. Continue or vary this run with\n"
              "#   moetrain-train -cd THIS_DIRECTORY -cn config [OVERRIDE ...]\n")
    return header + OmegaConf.to_yaml({"defaults": defaults}) + OmegaConf.to_yaml(OmegaConf.structured(cfg))
