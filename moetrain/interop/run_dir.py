"""Run directories as the unit converters write and tools read.

A run directory is what `moetrain-train` writes: `config.yaml` (the whole composed config) and `checkpoints/step_N/`.
A converter (Hugging Face import, DeepSpeed import, upcycling) writes the same thing with a weights-only checkpoint
at step 0, so every tool that reads runs reads converted models too:

    moetrain-train -cd OUT -cn config [OVERRIDE ...]     continue training (weights + a fresh optimizer)
    moetrain-generate OUT --prompt "..."                  sample from it
    moetrain-convert OUT --to hf --out HF_DIR             export it

The checkpoint goes through `moetrain.train.checkpoint.save_checkpoint`, so experts are keyed by global id and any
parallel layout loads it. A weights-only checkpoint carries `trainer_state = {"weights_only": true}`; the trainer
resumes it as weights only, at its step, with a fresh optimizer and schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from moetrain.config.schema import TrainConfig
from moetrain.interop import ConvertError
from moetrain.train import checkpoint as ckpt

CONFIG_FILE = "config.yaml"
WEIGHTS_ONLY = "weights_only"  # trainer_state key of a checkpoint written without optimizer state


def write_run_config(run_dir: Path, cfg: TrainConfig) -> Path:
    """Write `run_dir/config.yaml` for `cfg` (the caller decides which rank writes)."""
    from moetrain.config.compose import run_config_yaml  # what `moetrain-train -cd RUN -cn config` composes

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILE
    path.write_text(run_config_yaml(cfg))
    return path


def write_run_dir(out: Path, cfg: TrainConfig, model: torch.nn.Module, step: int = 0) -> Path:
    """Write `out/config.yaml` and the weights-only checkpoint `out/checkpoints/step_<step>`; return the checkpoint.

    Collective when a process group is initialised: every rank passes its part of the model (under expert
    parallelism only the experts it holds); rank 0 writes the config. `cfg.trainer.run_dir` is set to `out`.
    An `out` that already holds a checkpoint is refused, so nothing saved is ever overwritten.
    """
    out = Path(out)
    if ckpt.find_latest(out / "checkpoints") is not None:
        raise ConvertError(f"{out} already holds a checkpoint ({ckpt.find_latest(out / 'checkpoints')}); "
                           f"choose a new --out directory or remove the old run")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file; give a directory path")
    cfg.trainer.run_dir = str(out)
    if _rank() == 0:
        write_run_config(out, cfg)
    return ckpt.save_checkpoint(out / "checkpoints", step, model, None,
                                extra={"step": torch.tensor([step], dtype=torch.int64)}, keep=1,
                                trainer_state={WEIGHTS_ONLY: True})


def read_run_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig stored in `run_dir/config.yaml` (with its routing method's own config class)."""
    from moetrain.moe.routers import ROUTERS

    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConvertError(f"{run_dir} is not a moetrain run directory (no {CONFIG_FILE}); give the directory "
                           f"that moetrain-train or moetrain-convert wrote")
    loaded = OmegaConf.load(path)
    if "defaults" in loaded:
        loaded.pop("defaults")
    method = OmegaConf.select(loaded, "router.method", default="topk")
    if method not in ROUTERS:
        raise ConvertError(f"{path}: router.method={method!r} is not a routing method of this moetrain "
                           f"(known: {', '.join(sorted(ROUTERS))})")
    base = OmegaConf.structured(TrainConfig(router=ROUTERS[method].config_cls()))
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, loaded))
    except Exception as e:  # an OmegaConf validation error: wrong key or type
        raise ConvertError(f"{path} does not match this moetrain's config schema: "
                           f"{str(e).strip().splitlines()[0]}") from None


def find_run_checkpoint(path: Path, step: Optional[int] = None) -> tuple[Path, Path]:
    """(run directory, checkpoint directory) for `path` = a run directory (newest valid checkpoint, or `step`) or a
    checkpoint directory inside one."""
    path = Path(path)
    if (path / ckpt.COMPLETE_FILE).is_file() and not (path / CONFIG_FILE).is_file():
        return path.parent.parent, path
    if step is not None:
        found = path / "checkpoints" / ckpt.checkpoint_dir_name(step)
        if not found.is_dir():
            raise ConvertError(f"{path} has no checkpoint of step {step} ({found} is missing)")
        return path, found
    found = ckpt.find_latest_valid(path / "checkpoints")
    if found is None:
        raise ConvertError(f"{path} holds no valid checkpoint (nothing under {path / 'checkpoints'}); train or "
                           f"convert into it first")
    return path, found


def load_run_model(path: Path, step: Optional[int] = None, device: str | torch.device = "cpu"):
    """(TrainConfig, TransformerLM in eval mode with every expert on this process) from a run or checkpoint
    directory. Single process: for export, generation and compression, not for training."""
    from moetrain.model.transformer import TransformerLM

    run_dir, checkpoint = find_run_checkpoint(Path(path), step)
    cfg = read_run_config(run_dir)
    model = TransformerLM(cfg.model, cfg.router)
    ckpt.load_checkpoint(checkpoint, model, verify=True)
    return cfg, model.to(device).eval()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
