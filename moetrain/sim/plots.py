"""`moetrain-sim sweep`: the best layout of each mode at each world size, as JSON and three figures.

    steps.png       step time against devices, one line per mode (its fastest layout that fits in memory)
    breakdown.png   the step's breakdown for each mode's best layout, one panel per mode
    best.png        the fastest layout overall at each size, labelled
"""

from __future__ import annotations

import json
import os

from moetrain.config.schema import TrainConfig
from moetrain.sim.cluster import Cluster
from moetrain.sim.routing import RoutingLoad
from moetrain.sim.step import BREAKDOWN
from moetrain.sim.sweep import best_per_mode, evaluate

MODES = ("EP", "EP pipelined", "FSSDP")
COLORS = {"EP": "tab:blue", "EP pipelined": "tab:green", "FSSDP": "tab:red"}
# what each bar stacks: compute, then the communication the step waits for, then the optimizer
STACK = ("attention", "dense_ffn", "experts", "router_permute", "exposed_comm", "optimizer")


def run_sweep(cfg: TrainConfig, cluster: Cluster, routing: RoutingLoad, sizes: list[int], out_dir: str) -> dict:
    table = {"cluster": cluster.name, "routing": routing.name, "model": cfg.model.name,
             "tokens_per_rank": cfg.data.micro_batch_size * cfg.data.seq_len,
             "global_batch": cfg.data.global_batch_size, "sizes": {}}
    for W in sizes:
        best = best_per_mode(evaluate(cfg, W, cluster, routing))
        row = {}
        for mode, p in best.items():
            row[mode] = {"layout": p.layout, "step_s": p.step, "parts": p.parts,
                         "gib_per_rank": p.memory.total.total / 2**30, "micro_batches": p.micro_batches}
        table["sizes"][W] = row
        if row:
            winner = min(row, key=lambda m: row[m]["step_s"])
            print(f"{W:>5} devices: best {winner} {row[winner]['layout']} {row[winner]['step_s'] * 1e3:.1f} ms; "
                  + ", ".join(f"{m} {r['step_s'] * 1e3:.1f} ms" for m, r in row.items()), flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(table, f, indent=1)
    plot(table, out_dir)
    return table


def plot(table: dict, out_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(w) for w in table["sizes"])
    rows = {int(w): r for w, r in table["sizes"].items()}
    title = (f"{table['model']} on {table['cluster']}, routing {table['routing']}, "
             f"{table['tokens_per_rank']} tokens per micro-batch, global batch {table['global_batch']}")

    fig, ax = plt.subplots(figsize=(8, 5))
    for mode in MODES:
        xs = [w for w in sizes if mode in rows[w]]
        if xs:
            ax.plot(xs, [rows[w][mode]["step_s"] for w in xs], "o-", label=mode, color=COLORS[mode])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "steps.png"), dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(MODES), figsize=(15, 4.5), sharey=True)
    for ax, mode in zip(axes, MODES):
        xs = [w for w in sizes if mode in rows[w]]
        bottom = [0.0] * len(xs)
        for part in STACK:
            vals = [rows[w][mode]["parts"][part] for w in xs]
            ax.bar([str(w) for w in xs], vals, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(mode)
        ax.set_xlabel("devices")
        ax.tick_params(axis="x", rotation=45)
    axes[0].set_ylabel("predicted seconds per step")
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "breakdown.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, w in enumerate(sizes):
        if not rows[w]:
            continue
        mode = min(rows[w], key=lambda m: rows[w][m]["step_s"])
        r = rows[w][mode]
        ax.bar(i, r["step_s"], color=COLORS[mode])
        ax.text(i, r["step_s"], f"{r['layout']}\n{r['gib_per_rank']:.0f} GiB", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(sizes)), [str(w) for w in sizes])
    ax.set_yscale("log")
    ax.set_xlabel("devices")
    ax.set_ylabel("predicted step time of the best layout (s)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[m]) for m in MODES]
    ax.legend(handles, MODES)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "best.png"), dpi=110)
    plt.close(fig)


__all__ = ["run_sweep", "plot", "BREAKDOWN"]
