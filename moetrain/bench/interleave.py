"""The interleaved runner: every variant once per iteration, in a rotated order, timed on the slowest rank.

    result = run_interleaved({"dense": step_a, "ours": step_b, ...}, Plan(reps=3, iters=5, warmup=2),
                             barrier=dist.barrier, reduce_max=reduce_max_fn(), sync=device_sync)
    result["times"][name][rep][it]   seconds of that variant in that iteration (max over ranks)

Per iteration: for each variant in that iteration's order, a barrier, the variant's step (one forward + backward),
a device sync, its local seconds; after the iteration one all-reduce(MAX) of every variant's seconds, so each figure
is the slowest rank's. The order is a seeded shuffle per repetition, rotated by one place per iteration, so every
variant runs in every position and after every other variant about equally often; the seed is the same on every
rank (the collectives inside the variants must line up). Warm-up iterations run the same way, untimed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import stats


@dataclass
class Plan:
    reps: int = 3  # repetitions, each a fresh shuffled order
    iters: int = 5  # timed iterations per repetition
    warmup: int = 2  # untimed iterations before the first repetition
    seed: int = 0


def iteration_order(names: list[str], rep: int, it: int, seed: int = 0) -> list[str]:
    """The order of iteration `it` of repetition `rep`: a shuffle seeded by (seed, rep), rotated by `it`."""
    base = list(names)
    random.Random(seed * 1_000_003 + rep).shuffle(base)
    k = it % len(base)
    return base[k:] + base[:k]


def reduce_max_fn(group=None) -> Callable[[list[float]], list[float]]:
    """all-reduce(MAX) of a list of floats over `group` (default: the world) on CPU: the slowest rank's times."""
    import torch
    import torch.distributed as dist

    def reduce_max(xs: list[float]) -> list[float]:
        t = torch.tensor(xs, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t.tolist()

    return reduce_max


def run_interleaved(variants: dict[str, Callable[[], None]], plan: Plan, *, barrier: Callable[[], None],
                    reduce_max: Callable[[list[float]], list[float]], sync: Optional[Callable[[], None]] = None,
                    clock: Callable[[], float] = time.perf_counter) -> dict:
    """Run every variant once per iteration (see the module docstring); returns {"times", "orders"}."""
    names = list(variants)
    sync = sync or (lambda: None)
    for w in range(plan.warmup):
        for name in iteration_order(names, -1 - w, w, plan.seed):
            barrier()
            variants[name]()
            sync()
    times = {n: [[] for _ in range(plan.reps)] for n in names}
    orders = []
    for r in range(plan.reps):
        orders.append([])
        for i in range(plan.iters):
            order = iteration_order(names, r, i, plan.seed)
            orders[-1].append(order)
            local = {}
            for name in order:
                barrier()
                t0 = clock()
                variants[name]()
                sync()
                local[name] = clock() - t0
            for name, t in zip(names, reduce_max([local[n] for n in names])):
                times[name][r].append(t)
    return {"times": times, "orders": orders}


def analyse(times: dict[str, list[list[float]]], speed_pairs: list[tuple[str, str]],
            derived: Optional[dict[str, list[list[float]]]] = None) -> dict:
    """Per-variant summaries and per-iteration speed ratios.

    speed_pairs: (a, b) -> "a / b" = time_b / time_a per iteration (> 1: a is faster; with equal useful work, the
    ratio of a's throughput to b's). `derived`: extra per-iteration series (e.g. max(compute, comm)) that pairs may
    name like variants but that get no busy warning of their own."""
    series = {**times, **(derived or {})}
    variants = {n: stats.variant_summary(t) for n, t in times.items()}
    ratios = {f"{a} / {b}": stats.ratio_summary(series[b], series[a])
              for a, b in speed_pairs if a in series and b in series}
    return {"variants": variants, "ratios": ratios, "warnings": stats.busy_warnings(variants, ratios)}
