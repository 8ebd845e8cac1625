"""Compression methods: one file each, registered by name.

A method compresses one MoE layer at a time:

    @register("name")
    def compress_layer(job: LayerJob) -> LayerResult

`job` holds the layer's experts (compress/experts.py), its calibration statistics (compress/calibration.py), the
number of experts to keep, the routing config and a seed; the result is the new layer (`keep` experts) and, for each
new expert, the original experts it came from. The writer (compress/writer.py) turns the results into a run
directory. Importing this package imports every module in it, so a new method is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from moetrain.compress.calibration import LayerStats
from moetrain.compress.experts import LayerExperts
from moetrain.config.schema import RouterConfig


@dataclass
class LayerJob:
    layer_id: int
    experts: LayerExperts
    stats: LayerStats
    keep: int  # experts the compressed layer has, 1 <= keep <= experts.num_experts
    router_cfg: RouterConfig
    seed: int = 0


@dataclass
class LayerResult:
    experts: LayerExperts
    sources: list[list[int]]  # for each new expert, the original expert ids folded into it (its own first)


METHODS: dict[str, Callable[[LayerJob], LayerResult]] = {}


def register(name: str):
    def add(fn):
        if name in METHODS:
            raise ValueError(f"two compression methods are named {name!r}")
        METHODS[name] = fn
        return fn
    return add


def most_used(stats: LayerStats, k: int) -> list[int]:
    """The k experts with the most routed tokens (ties: more router probability mass, then the lower id), in id
    order."""
    E = stats.num_experts
    order = sorted(range(E), key=lambda e: (-float(stats.freq_E[e]), -float(stats.mass_E[e]), e))
    return sorted(order[:k])


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
