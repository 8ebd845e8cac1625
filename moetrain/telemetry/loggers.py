"""Metric loggers: console, JSON lines, TensorBoard, Weights & Biases; `build_loggers` picks them from the config.

Legend: L MoE layers, E experts.

A metric dict is flat, `{name: float | int | list[float]}`, one per logged step; the step is passed separately.
Statistics are reduced over ranks by the caller, so only rank 0 logs (other ranks get a no-op `MultiLogger([])`).
Names are slash-separated (`loss`, `lr`, `tokens_per_s`, `time/forward_s`, `moe/layer3/max_vio`, ...); every logger
passes unknown keys through, so step-time breakdowns and new statistics need no logger change.

Weights & Biases (`WandbLogger`):
- `wandb.init(project, dir=run_dir, mode=mode, name, config)`: offline by default, files under `run_dir/wandb/`.
  The API key is never passed or logged; online mode uses wandb's own login.
- `step` is logged as a metric and declared the x axis of every other metric (`define_metric("*", step_metric="step")`);
  wandb's internal `_step` is just the row counter. Scalars keep their names, so `read_offline_history` reads them back.
- The dashboard groups panels by the first path segment: `moe/layer{L}/max_vio`, `.../max_vio_global`, `.../entropy`,
  `.../bias_min|max|std` each get a line panel per layer in the "moe" section; `time/...` keys in "time".
- Per-expert load lists (`moe/layer{L}/tokens_per_expert`, `..._window`) are logged as `wandb.Histogram` whose bins
  are the expert ids and whose heights are the loads, so the histogram panel shows load per expert over steps.
  Other numeric lists are logged as the histogram of their values.
- The layer x expert load heatmap is a `wandb.Image` of a matplotlib heatmap (`moe/load_heatmap`), titled with its
  step: one per `heatmap_every` steps (`logger.heatmap_every`), at the first logged step with per-layer loads in each
  window `[k * heatmap_every, (k + 1) * heatmap_every)`, so log_every need not divide it. An image renders in the
  default media panel with no custom chart setup, unlike a `wandb.Table`, which needs a custom Vega heatmap panel.
  `moetrain-dashboard` (moetrain/telemetry/dashboard.py) lays these keys out as a workspace.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Protocol, TextIO, Union

import torch

__all__ = [
    "Logger",
    "ConsoleLogger",
    "JsonlLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "MultiLogger",
    "build_loggers",
]

Metrics = dict[str, Union[float, int, list]]

WANDB_MISSING = "logger.wandb=true needs the wandb package: pip install 'moetrain[wandb]'"
TENSORBOARD_MISSING = "logger.tensorboard=true needs the tensorboard package: pip install tensorboard"
WANDB_MODES = ("offline", "online", "disabled")
_TPE_RE = re.compile(r"^(?P<prefix>.+)/layer(?P<layer>\d+)/tokens_per_expert$")
_LOAD_RE = re.compile(r"/layer\d+/tokens_per_expert(_window)?$")  # lists indexed by expert id


class Logger(Protocol):
    def log(self, step: int, metrics: Metrics) -> None: ...

    def close(self) -> None: ...


def to_python(value: Any) -> Union[float, int, list, str, None]:
    """Plain Python value of a metric: 0-d tensors and numpy scalars to numbers, arrays and tensors to lists."""
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # torch.Tensor, numpy array or scalar
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, list):
        return [to_python(v) for v in value]
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ConsoleLogger:
    """One compact line per call: step, loss, lr, tokens/s and a few scalars; lists are skipped.

    The "maxvio" field is the largest batch MaxVio over the MoE layers (`moe/layer*/max_vio`). Lines go through
    `tqdm.write`, which prints them above a progress bar drawn on the same terminal (moetrain/telemetry/progress.py)
    and is a plain write otherwise; each line is flushed, so log files see it at once.
    """

    FIELDS = (
        ("loss", "loss", "{:.4f}"),
        ("val_loss", "val", "{:.4f}"),
        ("lr", "lr", "{:.2e}"),
        ("tokens_per_s", "tok/s", "{:,.0f}"),
        ("grad_norm", "gnorm", "{:.3f}"),
        ("aux_loss", "aux", "{:.4f}"),
        ("step_time_s", "dt", "{:.3f}s"),
        ("eta_s", "eta", None),
    )
    _MAX_VIO_RE = re.compile(r"/layer\d+/max_vio$")

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream

    def format(self, step: int, metrics: Metrics) -> str:
        parts = [f"step {step:>6d}"]
        for key, label, fmt in self.FIELDS:
            v = to_python(metrics.get(key))
            if _is_scalar(v):
                parts.append(f"{label} {fmt.format(v) if fmt else _duration(v)}")
        vios = [to_python(v) for k, v in metrics.items() if self._MAX_VIO_RE.search(k)]
        vios = [v for v in vios if _is_scalar(v)]
        if vios:
            parts.append(f"maxvio {max(vios):.3f}")
        return " | ".join(parts)

    def log(self, step: int, metrics: Metrics) -> None:
        from tqdm import tqdm

        stream = self.stream or sys.stdout
        tqdm.write(self.format(step, metrics), file=stream)
        stream.flush()

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends `{"step": step, **metrics}` as one JSON line per call (lists stay lists), flushed every line.

    `start_step` is the step training (re)starts from: rows of an earlier attempt with a later step are dropped
    first (atomically), so a resumed run never logs a step twice and readers never see the curve back-track.
    `start_step=0` starts the file afresh; None appends to whatever is there.
    """

    def __init__(self, path: Union[str, Path], start_step: Optional[int] = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step is not None:
            _truncate_jsonl(self.path, start_step)
        self._f: Optional[TextIO] = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: Metrics) -> None:
        if self._f is None:
            raise RuntimeError(f"JsonlLogger({self.path}) is closed")
        row = {"step": int(step)}
        row.update({k: to_python(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _truncate_jsonl(path: Path, start_step: int) -> None:
    """Keep the rows of `path` logged at steps <= start_step (none when start_step is 0); unreadable lines (a
    row cut by a crash) are dropped too."""
    if not path.exists():
        return
    kept = []
    if start_step > 0:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start_step:
                kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class TensorBoardLogger:
    """Scalars via `add_scalar`; per-expert load lists via `add_histogram_raw` with one bucket per expert id; other
    numeric lists via `add_histogram` of their values."""

    def __init__(self, log_dir: Union[str, Path], start_step: Optional[int] = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(TENSORBOARD_MISSING) from e
        # purge_step hides events of an earlier attempt logged after the step we resume from
        purge = start_step + 1 if start_step else None
        self._writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge)

    def log(self, step: int, metrics: Metrics) -> None:
        for key, value in metrics.items():
            value = to_python(value)
            if _is_scalar(value):
                self._writer.add_scalar(key, value, global_step=step)
            elif isinstance(value, list) and value and all(_is_scalar(v) for v in value):
                if _LOAD_RE.search(key):
                    self._add_load_histogram(key, value, step)
                else:
                    self._writer.add_histogram(key, torch.tensor(value, dtype=torch.float64), global_step=step)
        self._writer.flush()

    def _add_load_histogram(self, key: str, counts_E: list, step: int) -> None:
        counts_E = [max(0.0, float(c)) for c in counts_E]
        num = sum(counts_E)
        if num <= 0:
            return
        self._writer.add_histogram_raw(
            key,
            min=0,
            max=len(counts_E) - 1,
            num=num,
            sum=sum(i * c for i, c in enumerate(counts_E)),
            sum_squares=sum(i * i * c for i, c in enumerate(counts_E)),
            bucket_limits=[i + 0.5 for i in range(len(counts_E))],  # bucket i holds expert i: (i - 0.5, i + 0.5]
            bucket_counts=counts_E,
            global_step=step,
        )

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """Weights & Biases run (see the module docstring for the dashboard layout and the heatmap choice)."""

    HEATMAP_KEY = "moe/load_heatmap"
    MAX_HISTOGRAM_BINS = 512  # wandb.Histogram's limit; longer lists are logged as plain lists

    def __init__(
        self,
        project: str,
        run_dir: Union[str, Path],
        mode: str = "offline",
        run_name: Optional[str] = None,
        config: Optional[dict] = None,
        heatmap_every: int = 100,
    ):
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb_mode must be one of {WANDB_MODES}, got {mode!r}")
        if heatmap_every < 0:
            raise ValueError(f"heatmap_every must be >= 0 (0 disables the heatmap), got {heatmap_every}")
        try:
            import wandb
        except ImportError as e:
            raise ImportError(WANDB_MISSING) from e
        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.heatmap_every, self.mode = heatmap_every, mode
        self._heatmap_window: Optional[int] = None  # step // heatmap_every of the last heatmap
        self._run = wandb.init(
            project=project, dir=str(self.run_dir), mode=mode, name=run_name, config=dict(config or {})
        )
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: Metrics) -> None:
        if self._run is None:
            raise RuntimeError("WandbLogger is closed")
        wandb = self._wandb
        payload: dict[str, Any] = {}
        loads: dict[int, list] = {}
        for key, value in metrics.items():
            value = to_python(value)
            if isinstance(value, list):
                numeric = bool(value) and all(_is_scalar(v) for v in value)
                m = _TPE_RE.match(key)
                if m and numeric:
                    loads[int(m["layer"])] = value
                if not numeric:
                    payload[key] = value
                elif not _LOAD_RE.search(key):
                    payload[key] = wandb.Histogram(value)
                elif len(value) <= self.MAX_HISTOGRAM_BINS:
                    bins = [float(i) - 0.5 for i in range(len(value) + 1)]  # bin i is expert i
                    payload[key] = wandb.Histogram(np_histogram=(value, bins))
                else:
                    payload[key] = value
            elif value is not None:
                payload[key] = value
        if loads and self.heatmap_every:
            window = int(step) // self.heatmap_every
            if self._heatmap_window is None or window > self._heatmap_window:
                payload[self.HEATMAP_KEY] = self._heatmap_image(loads, int(step))
                self._heatmap_window = window
        payload["step"] = int(step)
        self._run.log(payload)

    def _heatmap_image(self, loads: dict[int, list], step: int):
        import numpy as np

        from moetrain.telemetry.report import load_heatmap_figure

        layers = sorted(loads)
        E = max(len(loads[layer]) for layer in layers)
        loads_LE = np.full((len(layers), E), np.nan)
        for r, layer in enumerate(layers):
            loads_LE[r, : len(loads[layer])] = loads[layer]
        title = f"expert load / mean load, step {step}"
        fig = load_heatmap_figure(layers, loads_LE, title=title)
        fig.canvas.draw()
        rgb_HW3 = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        return self._wandb.Image(rgb_HW3, caption=title)

    def close(self) -> None:
        if self._run is not None:
            sync_file = getattr(self._run.settings, "sync_file", None)
            self._run.finish()
            self._run = None
            if sync_file and self.mode == "offline":
                from moetrain.telemetry.wandb_reader import wait_until_finished

                wait_until_finished(sync_file)  # so that "closed" means the history is on disk


class MultiLogger:
    """Fans out to several loggers; `MultiLogger([])` is the no-op logger of non-zero ranks."""

    def __init__(self, loggers: list):
        self.loggers = list(loggers)

    def log(self, step: int, metrics: Metrics) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def __enter__(self) -> "MultiLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_loggers(logger_cfg: Any, run_dir: Path, rank: int, config_dict: Optional[dict] = None,
                  start_step: Optional[int] = None) -> MultiLogger:
    """The loggers enabled in `logger_cfg` (a `LoggerConfig`) on rank 0; a no-op `MultiLogger([])` elsewhere.

    `start_step`: the step training starts from (the resumed step, or 0); file loggers drop what an earlier
    attempt logged after it (see `JsonlLogger`).

    Files: `run_dir/metrics.jsonl`, `run_dir/tensorboard/`, `run_dir/wandb/`. Missing optional packages fail on every
    rank, before any logger is created, with the pip command that installs them. wandb_mode=disabled skips wandb.
    """
    use_wandb = bool(logger_cfg.wandb) and logger_cfg.wandb_mode != "disabled"
    if use_wandb:
        if logger_cfg.wandb_mode not in WANDB_MODES:
            raise ValueError(f"logger.wandb_mode must be one of {WANDB_MODES}, got {logger_cfg.wandb_mode!r}")
        if importlib.util.find_spec("wandb") is None:
            raise ImportError(WANDB_MISSING)
    if logger_cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(TENSORBOARD_MISSING)
    if rank != 0:
        return MultiLogger([])
    run_dir = Path(run_dir)
    loggers: list = []
    try:
        if logger_cfg.console:
            loggers.append(ConsoleLogger())
        if logger_cfg.jsonl:
            loggers.append(JsonlLogger(run_dir / "metrics.jsonl", start_step))
        if logger_cfg.tensorboard:
            loggers.append(TensorBoardLogger(run_dir / "tensorboard", start_step))
        if use_wandb:
            loggers.append(
                WandbLogger(
                    project=logger_cfg.wandb_project,
                    run_dir=run_dir,
                    mode=logger_cfg.wandb_mode,
                    run_name=logger_cfg.wandb_run_name,
                    config=config_dict,
                    heatmap_every=logger_cfg.heatmap_every,
                )
            )
    except BaseException:
        for logger in loggers:
            logger.close()
        raise
    return MultiLogger(loggers)
