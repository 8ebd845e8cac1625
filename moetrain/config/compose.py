"""Compose a TrainConfig from the Hydra config tree and command-line overrides.

We use Hydra's compose API rather than `@hydra.main`, so that the run directory is ours (`trainer.run_dir`), the
working directory never changes, and a bad override becomes one clear line instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from moetrain.config.schema import TrainConfig, register_configs
from moetrain.config.validate import ConfigError


def config_dir() -> Path:
    """configs/ of a source checkout or editable install, else the copy installed inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parents[1] / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(f"cannot find the moetrain configs directory (looked beside {here.parents[1]}); reinstall "
                      f"moetrain with `pip install -e .` from a source checkout")


def compose_dictconfig(overrides: Sequence[str] = (), config_name: str = "train"):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise ConfigError(describe_error(e)) from None


def describe_error(e: BaseException) -> str:
    """One line from a Hydra/OmegaConf exception chain: what failed, why, and what is available."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else type(e).__name__
    if msg.startswith("Could not override"):
        msg = msg.replace("Could not override", "unknown config key").rstrip(".")
        msg += " (check the spelling; `moetrain-train --cfg` prints every key)"
    options = [ln for ln in lines[1:] if not ln.startswith(("Config search path", "provider=", "Available options"))]
    if "Available options" in str(e):
        msg += f" (available: {', '.join(options)})"
    cause = e.__cause__ or e.__context__
    while cause is not None and (cause.__cause__ or cause.__context__) is not None:
        cause = cause.__cause__ or cause.__context__
    if cause is not None and str(cause).strip():
        detail = str(cause).strip().splitlines()[0]
        if detail not in msg:
            msg += f": {detail}"
    return f"bad config or override: {msg}"


def compose_config(overrides: Sequence[str] = ()) -> TrainConfig:
    from omegaconf.errors import OmegaConfBaseException

    dcfg = compose_dictconfig(overrides)
    try:
        return OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config value: {str(e).strip().splitlines()[0]}") from None
