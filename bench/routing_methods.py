"""Routing methods side by side: the default tiny model on the embedded corpus, one trainer per method in the same
process, stepped in turn (interleaved per step, the order rotated every step), same seed, same batches, same token
budget. Prints per method the final validation loss, the routed experts per token (measured: copies the router
kept / tokens, mean over the MoE layers and the run), the forward FLOPs per token of an MoE layer, and the step time
(median and interquartile range over the steps, and the median of the per-step ratios to top-k routing).

    python bench/routing_methods.py [--steps 300] [--seeds 0 1] [--methods default expert_choice ...]
                                    [--out docs/figures/routing_methods] [--extra KEY=VALUE ...]

The methods are router presets (configs/router/<name>.yaml; `default` is token-choice top-k). Validation runs every
`--eval-every` steps on the same windows for every method; expert choice is evaluated with its default evaluation
routing (token-choice top-k, causal), and also with expert choice itself (not causal: it sees later tokens), shown
as a separate column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moetrain.config.compose import compose_config
from moetrain.parallel.mesh import ParallelContext
from moetrain.train.trainer import Trainer

DEFAULT_METHODS = ["default", "expert_choice", "moepp", "adamoe", "top_p"]
LABELS = {"default": "top-k", "expert_choice": "expert choice", "moepp": "MoE++", "adamoe": "AdaMoE",
          "top_p": "top-p"}


def build(method: str, seed: int, steps: int, eval_every: int, run_dir: Path, extra: list[str]) -> Trainer:
    cfg = compose_config([f"router={method}", f"trainer.seed={seed}", f"trainer.max_steps={steps}",
                          f"trainer.eval_every={eval_every}", f"trainer.run_dir={run_dir / f'{method}_{seed}'}",
                          "trainer.progress=false", "logger.console=false", *extra])
    return Trainer(cfg, ParallelContext())


def experts_per_token(trainer: Trainer) -> float:
    stats = trainer.balance.pop_compute_stats()["experts_per_token"]
    return sum(stats) / len(stats)


def eval_with(trainer: Trainer, routing: str) -> float:
    """Validation loss with the routers' evaluation routing set to `routing` (expert choice only)."""
    routers = [m.router for m in trainer.balance.layers]
    saved = [r.cfg.eval_routing for r in routers]
    for r in routers:
        r.cfg.eval_routing = routing
    try:
        return trainer.evaluate()["val_loss"]
    finally:
        for r, v in zip(routers, saved):
            r.cfg.eval_routing = v


def run_seed(methods: list[str], seed: int, args, run_dir: Path) -> dict:
    torch.manual_seed(seed)
    trainers = {m: build(m, seed, args.steps, args.eval_every, run_dir, args.extra) for m in methods}
    times = {m: [] for m in methods}
    per_token = {m: [] for m in methods}
    curves = {m: [(0, trainers[m].evaluate()["val_loss"])] for m in methods}
    for step in range(args.steps):
        order = methods[step % len(methods):] + methods[:step % len(methods)]  # rotate who goes first
        for m in order:
            t0 = time.perf_counter()
            trainers[m].train_step()
            times[m].append(time.perf_counter() - t0)
            per_token[m].append(experts_per_token(trainers[m]))
        if (step + 1) % args.eval_every == 0:
            for m in methods:
                curves[m].append((step + 1, trainers[m].evaluate()["val_loss"]))
    result = {}
    for m in methods:
        t = trainers[m]
        layer = t.balance.layers[0]
        ept = statistics.fmean(per_token[m])
        result[m] = {"val_loss": curves[m][-1][1], "curve": curves[m], "experts_per_token": ept,
                     "flops_per_token": layer.flops_per_token(ept), "step_times": times[m]}
        if m == "expert_choice":
            result[m]["val_loss_expert_choice_eval"] = eval_with(t, "expert_choice")
    return result


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def summarise(runs: list[dict], methods: list[str], warmup: int) -> dict:
    base = methods[0]
    table = {}
    for m in methods:
        steps = [t for r in runs for t in r[m]["step_times"][warmup:]]
        ratios = [a / b for r in runs for a, b in zip(r[m]["step_times"][warmup:], r[base]["step_times"][warmup:])]
        lo, med, hi = quartiles(steps)
        rlo, rmed, rhi = quartiles(ratios)
        table[m] = {
            "val_loss": [r[m]["val_loss"] for r in runs],
            "experts_per_token": statistics.fmean(r[m]["experts_per_token"] for r in runs),
            "flops_per_token": statistics.fmean(r[m]["flops_per_token"] for r in runs),
            "step_time_ms": [1e3 * lo, 1e3 * med, 1e3 * hi],
            "step_time_ratio": [rlo, rmed, rhi],
        }
        if "val_loss_expert_choice_eval" in runs[0][m]:
            table[m]["val_loss_expert_choice_eval"] = [r[m]["val_loss_expert_choice_eval"] for r in runs]
    return table


def print_table(table: dict, base: str) -> None:
    print(f"| method | final val loss (per seed) | experts / token | MoE-layer fwd MFLOP / token | step time ms "
          f"(median, IQR) | step time / {LABELS.get(base, base)} (median, IQR) |")
    print("|---|---|---|---|---|---|")
    for m, row in table.items():
        vals = ", ".join(f"{v:.4f}" for v in row["val_loss"])
        if "val_loss_expert_choice_eval" in row:
            vals += " (EC in eval, not causal: " + ", ".join(f"{v:.4f}" for v in row["val_loss_expert_choice_eval"]) + ")"
        lo, med, hi = row["step_time_ms"]
        rlo, rmed, rhi = row["step_time_ratio"]
        print(f"| {LABELS.get(m, m)} | {vals} | {row['experts_per_token']:.3f} | {row['flops_per_token'] / 1e6:.3f} | "
              f"{med:.1f} ({lo:.1f}-{hi:.1f}) | {rmed:.3f} ({rlo:.3f}-{rhi:.3f}) |")


def plot(runs: list[dict], table: dict, methods: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        steps = [s for s, _ in runs[0][m]["curve"]]
        mean = [statistics.fmean(r[m]["curve"][i][1] for r in runs) for i in range(len(steps))]
        ax_curve.plot(steps[1:], mean[1:], marker="o", label=LABELS.get(m, m))
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel(f"validation loss (mean of {len(runs)} seeds)")
    ax_curve.legend()
    ax_curve.grid(alpha=0.3)
    xs = range(len(methods))
    ax_bar.bar(xs, [table[m]["experts_per_token"] for m in methods], color="tab:blue", alpha=0.7)
    ax_bar.set_xticks(list(xs), [LABELS.get(m, m) for m in methods])
    ax_bar.set_ylabel("routed experts per token (measured)")
    ax2 = ax_bar.twinx()
    ax2.plot(list(xs), [table[m]["step_time_ratio"][1] for m in methods], "o-", color="tab:red")
    ax2.set_ylabel("step time / top-k (median)", color="tab:red")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the step-time statistics")
    p.add_argument("--out", type=Path, default=Path("docs/figures/routing_methods"))
    p.add_argument("--extra", nargs="*", default=[], help="overrides applied to every method")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run_seed(args.methods, seed, args, Path(tmp)) for seed in args.seeds]
    table = summarise(runs, args.methods, args.warmup)
    print_table(table, args.methods[0])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    slim = [{m: {k: v for k, v in r[m].items() if k != "step_times"} for m in r} for r in runs]
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "table": table, "runs": slim}, indent=1))
    plot(runs, table, args.methods, args.out)


if __name__ == "__main__":
    main()
