"""Routing load for the simulator: the share of routed token copies each expert receives, per step and MoE layer.

Legend: E experts, W ranks of the expert group, p_E the fraction of all routed copies going to each expert (sums to 1).

Sources (`parse_routing`):
    balanced        p_e = 1/E
    zipf:S          p_e ∝ 1/(rank_e + 1)^S; the hottest experts sit at ids 0, 1, ... (expert parallelism's worst case,
                    as in bench/fssdp_bench.py) unless `zipf:S:shuffle` puts them at random ids (seed 0)
    trace:PATH      the per-expert counts a training run logged (`moe/layer{L}/tokens_per_expert` in PATH, a
                    metrics.jsonl or its run directory), one step after another; `trace:PATH:LAYER` keeps one layer

Every source rank is assumed to route the same distribution (expected counts T*K*p_e per rank); what varies between
ranks is where the copies go, decided by the placement (see moetrain/sim/layer.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

_TPE_RE = re.compile(r"^moe/layer(?P<layer>\d+)/tokens_per_expert$")


@dataclass
class RoutingLoad:
    """steps_LE[s][l]: p_E of MoE layer l at step s (a float64 tensor of E). A synthetic source has one step and one
    shared layer (None layer ids)."""

    name: str
    steps: list[list[torch.Tensor]]
    layer_ids: Optional[list[int]] = None

    @property
    def num_experts(self) -> int:
        return self.steps[0][0].numel()

    def for_layer(self, step: int, moe_index: int) -> torch.Tensor:
        layers = self.steps[step % len(self.steps)]
        return layers[moe_index % len(layers)]


def balanced(num_experts: int) -> RoutingLoad:
    return RoutingLoad("balanced", [[torch.full((num_experts,), 1.0 / num_experts, dtype=torch.float64)]])


def zipf(num_experts: int, s: float, shuffle: bool = False, seed: int = 0) -> RoutingLoad:
    """p_e ∝ 1/(e+1)^s, the distribution bench/fssdp_bench.py draws from (there: K distinct experts per token)."""
    p = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    if shuffle:
        p = p[torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))]
    return RoutingLoad(f"zipf {s:g}" + (" shuffled" if shuffle else ""), [[p / p.sum()]])


def topk_distinct_share(p_E: torch.Tensor, top_k: int, samples: int = 20000, seed: int = 0) -> torch.Tensor:
    """The share of copies each expert gets when each token draws `top_k` distinct experts from p_E (what
    `torch.multinomial(..., replacement=False)` does in bench/fssdp_bench.py): hot experts saturate at one copy
    per token, so the shares flatten as K grows. Estimated by sampling."""
    if top_k <= 1:
        return p_E.clone()
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(p_E.float().expand(samples, -1), top_k, replacement=False, generator=g)
    counts = torch.bincount(idx.flatten(), minlength=p_E.numel()).double()
    return counts / counts.sum()


def read_trace(path: str, layer: Optional[int] = None) -> RoutingLoad:
    """Per-step, per-layer expert shares from a run's metrics.jsonl (or its run directory). ValueError (one line)
    when the file is missing or holds no `moe/layer{L}/tokens_per_expert` lists."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise ValueError(f"routing trace {path}: no such metrics.jsonl (give a run directory or its metrics.jsonl)")
    steps: list[list[torch.Tensor]] = []
    layer_ids: Optional[list[int]] = None
    for line in p.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        found = {}
        for key, value in row.items():
            m = _TPE_RE.match(key)
            if m and isinstance(value, list) and (layer is None or int(m["layer"]) == layer):
                found[int(m["layer"])] = torch.tensor(value, dtype=torch.float64)
        if not found:
            continue
        ids = sorted(found)
        if layer_ids is None:
            layer_ids = ids
        if ids != layer_ids:
            continue  # a line logging another set of layers (should not happen): keep the trace consistent
        shares = []
        for i in ids:
            c = found[i]
            shares.append(c / c.sum() if c.sum() > 0 else torch.full_like(c, 1.0 / c.numel()))
        steps.append(shares)
    if not steps:
        which = f"moe/layer{layer}/tokens_per_expert" if layer is not None else "moe/layer*/tokens_per_expert"
        raise ValueError(f"routing trace {path}: no {which} lists in {p}")
    return RoutingLoad(f"trace {p}", steps, layer_ids)


def parse_routing(spec: str, num_experts: int) -> RoutingLoad:
    """balanced | zipf:S[:shuffle] | trace:PATH[:LAYER]; ValueError (one line) on anything else."""
    kind, _, rest = spec.partition(":")
    if kind == "balanced" and not rest:
        return balanced(num_experts)
    if kind == "zipf":
        s, _, flag = rest.partition(":")
        try:
            exponent = float(s)
        except ValueError:
            exponent = -1.0
        if exponent < 0 or flag not in ("", "shuffle"):
            raise ValueError(f"--routing {spec}: write zipf:S or zipf:S:shuffle with an exponent S >= 0")
        return zipf(num_experts, exponent, shuffle=flag == "shuffle")
    if kind == "trace" and rest:
        path, layer = rest, None
        head, _, tail = rest.rpartition(":")
        if head and tail.isdigit():
            path, layer = head, int(tail)
        load = read_trace(path, layer)
        if load.num_experts != num_experts:
            raise ValueError(f"--routing {spec}: the trace has {load.num_experts} experts per layer, the model "
                             f"{num_experts}; simulate the run's model (model.num_experts={load.num_experts})")
        return load
    raise ValueError(f"--routing {spec}: unknown routing source; use balanced, zipf:S[:shuffle] or "
                     f"trace:RUN_DIR_OR_METRICS_JSONL[:LAYER]")
