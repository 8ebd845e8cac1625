"""Layouts to compare at a world size, the best one, and sweeps over world sizes (the data behind the figures).

A candidate layout is a list of config overrides; it is kept only when the config validator accepts it for the world
size (the same check `moetrain-train` and the dry run make) and its memory plan fits the device.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

from moetrain.config.schema import TrainConfig
from moetrain.config.validate import ConfigError
from moetrain.sim.cluster import Cluster
from moetrain.sim.routing import RoutingLoad
from moetrain.sim.step import StepPrediction, simulate

DEGREES = (1, 2, 4, 8)


def with_layout(cfg: TrainConfig, world: int, mode: str, ep: int = 1, degree: int = 1, budget: int = 1,
                data_parallel: Optional[str] = None) -> TrainConfig:
    """cfg with one layout; the global batch rounded to a multiple of micro-batch x world (at least one
    micro-batch per rank)."""
    par = cfg.parallel
    par = dataclasses.replace(par, mode=mode, ep=ep if mode == "ep" else 1, pipeline_degree=str(degree),
                              data_parallel=data_parallel or par.data_parallel,
                              fssdp=dataclasses.replace(par.fssdp, budget=budget))
    per_step = cfg.data.micro_batch_size * world
    data = dataclasses.replace(cfg.data, global_batch_size=per_step * max(1, cfg.data.global_batch_size // per_step))
    return dataclasses.replace(cfg, parallel=par, data=data)


def candidates(cfg: TrainConfig, world: int) -> Iterator[tuple[str, TrainConfig]]:
    """(mode label, config): expert parallelism at every ep dividing E and W with each pipeline degree the local
    experts allow, and FSSDP (budgets 1, 2, 4) when E is a multiple of W; each with ddp and fsdp."""
    E = cfg.model.num_experts
    for dp in ("ddp", "fsdp"):
        for ep in [e for e in range(1, E + 1) if E % e == 0 and world % e == 0]:
            for n in (d for d in DEGREES if d <= E // ep and (ep > 1 or d == 1)):
                yield "EP" if n == 1 else "EP pipelined", with_layout(cfg, world, "ep", ep, n, data_parallel=dp)
        if world > 1 and E % world == 0:
            for budget in (1, 2, 4):
                yield "FSSDP", with_layout(cfg, world, "fssdp", budget=budget, data_parallel=dp)


def evaluate(cfg: TrainConfig, world: int, cluster: Cluster, routing: RoutingLoad, hierarchical: bool = False
             ) -> list[tuple[str, StepPrediction]]:
    out = []
    for label, c in candidates(cfg, world):
        try:
            out.append((label, simulate(c, world, cluster, routing, hierarchical=hierarchical)))
        except ConfigError:
            continue
    return out


def best_per_mode(results: list[tuple[str, StepPrediction]]) -> dict[str, StepPrediction]:
    """The fastest layout of each mode label among those whose memory fits."""
    best: dict[str, StepPrediction] = {}
    for label, p in results:
        if p.fits and (label not in best or p.step < best[label].step):
            best[label] = p
    return best
