"""`moetrain-report RUN_DIR [--out DIR] [--heatmap last|mean]`: plots from a run's `metrics.jsonl`.

Legend: L MoE layers (rows of the heatmap), E experts.

Writes three PNGs (matplotlib, Agg canvas, no pyplot state) and prints their paths:
    loss.png          train `loss` (and `val_loss` when present) vs step
    max_vio.png       per-layer batch `moe/layer{L}/max_vio` (lines) and window `moe/layer{L}/max_vio_global` (markers)
    load_heatmap.png  layer x expert load, shown as load / mean load of the layer (1 = balanced), from the last
                      `moe/layer{L}/tokens_per_expert` of each layer (`--heatmap last`) or their mean over the run
                      (`--heatmap mean`)
`load_heatmap_figure` is shared with the wandb logger. A missing run directory or metrics file prints one line
`moetrain-report: error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["main", "read_metrics", "load_matrix", "load_heatmap_figure"]

PROG = "moetrain-report"
TRAIN_LOSS_KEYS = ("loss", "train/loss")
VAL_LOSS_KEYS = ("val_loss", "val/loss")
_TPE_RE = re.compile(r"^(?P<prefix>.+)/layer(?P<layer>\d+)/tokens_per_expert$")
_VIO_RE = re.compile(r"^(?P<prefix>.+)/layer(?P<layer>\d+)/max_vio(?P<glob>_global)?$")


class ReportError(Exception):
    pass


def read_metrics(path: Path) -> list[dict]:
    """The JSON objects of a metrics.jsonl file; unparsable lines (a run killed mid-write) are skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(rows):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(row.get("step", i))
            ys.append(float(v))
    return xs, ys


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def plot_loss(rows: list[dict], out_path: Path) -> Path:
    fig = _new_figure((7, 4))
    ax = fig.add_subplot()
    plotted = False
    for label, keys in (("train", TRAIN_LOSS_KEYS), ("val", VAL_LOSS_KEYS)):
        for key in keys:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if label == "val" else None, ms=3, label=f"{label} ({key})")
                plotted = True
                break
    if plotted:
        ax.legend()
    else:
        _placeholder(ax, "no loss metric in metrics.jsonl")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    return out_path


def plot_max_vio(rows: list[dict], out_path: Path) -> Path:
    keys = sorted({k for row in rows for k in row if _VIO_RE.match(k)}, key=_layer_sort_key)
    fig = _new_figure((8, 4.5))
    ax = fig.add_subplot()
    colors: dict[str, object] = {}
    for key in keys:
        m = _VIO_RE.match(key)
        xs, ys = _series(rows, key)
        if not xs:
            continue
        layer_id = f"{m['prefix']}/layer{m['layer']}"
        kwargs = {"color": colors[layer_id]} if layer_id in colors else {}
        if m["glob"]:
            (line,) = ax.plot(xs, ys, ls="--", marker="o", ms=3, label=f"layer {m['layer']} (window)", **kwargs)
        else:
            (line,) = ax.plot(xs, ys, lw=1, label=f"layer {m['layer']}", **kwargs)
        colors.setdefault(layer_id, line.get_color())
    if colors:
        ax.legend(fontsize="small", ncol=max(1, len(colors) // 8))
    else:
        _placeholder(ax, "no moe/layer*/max_vio metric in metrics.jsonl")
    ax.set(xlabel="step", ylabel="MaxVio = (max - mean) / mean", title="expert load imbalance")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    return out_path


def _layer_sort_key(key: str):
    m = re.search(r"layer(\d+)", key)
    return (int(m.group(1)) if m else -1, key)


def load_matrix(rows: list[dict], mode: str = "last") -> tuple[list[int], np.ndarray]:
    """(layer ids, loads_LE) from `moe/layer{L}/tokens_per_expert` lists; rows of unequal E are padded with NaN."""
    if mode not in ("last", "mean"):
        raise ValueError(f"heatmap mode must be 'last' or 'mean', got {mode!r}")
    per_layer: dict[int, list[list[float]]] = {}
    for row in rows:
        for key, v in row.items():
            m = _TPE_RE.match(key)
            if m and isinstance(v, list) and v:
                per_layer.setdefault(int(m["layer"]), []).append([float(x) for x in v])
    layers = sorted(per_layer)
    if not layers:
        return [], np.zeros((0, 0))
    E = max(len(v) for lists in per_layer.values() for v in lists)
    loads_LE = np.full((len(layers), E), np.nan)
    for r, layer in enumerate(layers):
        lists = [v for v in per_layer[layer] if len(v) == len(per_layer[layer][-1])]
        vec_E = np.asarray(lists[-1]) if mode == "last" else np.mean(np.asarray(lists), axis=0)
        loads_LE[r, : len(vec_E)] = vec_E
    return layers, loads_LE


def load_heatmap_figure(layers: Sequence[int], loads_LE: np.ndarray, title: str = "expert load / mean load"):
    """A matplotlib Figure: layer x expert heatmap of load / mean load of the layer (1 = balanced)."""
    from matplotlib.colors import TwoSlopeNorm

    loads_LE = np.asarray(loads_LE, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_L1 = np.nanmean(loads_LE, axis=1, keepdims=True)
        rel_LE = np.where(mean_L1 > 0, loads_LE / mean_L1, np.nan)
    L, E = rel_LE.shape
    fig = _new_figure((min(16.0, 3.0 + 0.25 * E), min(12.0, 1.5 + 0.35 * L)))
    ax = fig.add_subplot()
    vmax = float(np.nanmax(rel_LE)) if np.isfinite(rel_LE).any() else 2.0
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, vmax))
    im = ax.imshow(np.ma.masked_invalid(rel_LE), aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set(xlabel="expert", ylabel="MoE layer", title=title)
    ax.set_yticks(range(L), [str(x) for x in layers])
    if E <= 64:
        ax.set_xticks(range(E))
        ax.tick_params(axis="x", labelsize="small")
    fig.colorbar(im, ax=ax, label="load / mean load")
    fig.tight_layout()
    return fig


def plot_load_heatmap(rows: list[dict], out_path: Path, mode: str = "last") -> Path:
    layers, loads_LE = load_matrix(rows, mode)
    if layers:
        fig = load_heatmap_figure(layers, loads_LE, title=f"expert load / mean load ({mode})")
    else:
        fig = _new_figure((7, 4))
        _placeholder(fig.add_subplot(), "no moe/layer*/tokens_per_expert metric in metrics.jsonl")
    fig.savefig(out_path)
    return out_path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Plot loss, MaxVio and the expert load heatmap of a run.")
    p.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    p.add_argument("--out", type=Path, default=None, help="output directory for the PNGs (default: RUN_DIR/plots)")
    p.add_argument("--heatmap", choices=("last", "mean"), default="last", help="which load the heatmap shows")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if not args.run_dir.is_dir():
            raise ReportError(f"run directory not found: {args.run_dir}")
        metrics_path = args.run_dir / "metrics.jsonl"
        if not metrics_path.is_file():
            raise ReportError(f"no metrics.jsonl in {args.run_dir} (was logger.jsonl=false?)")
        rows = read_metrics(metrics_path)
        if not rows:
            raise ReportError(f"{metrics_path} holds no metrics")
        out_dir = args.out if args.out is not None else args.run_dir / "plots"
        out_dir.mkdir(parents=True, exist_ok=True)
    except (ReportError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    paths = [
        plot_loss(rows, out_dir / "loss.png"),
        plot_max_vio(rows, out_dir / "max_vio.png"),
        plot_load_heatmap(rows, out_dir / "load_heatmap.png", args.heatmap),
    ]
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
