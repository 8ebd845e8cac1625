"""Reconstruction-based expert selection: keep the subset whose layer output is closest to the full layer's.

Legend: N calibration rows (the layer's recorded inputs), D model dim, E experts, S a candidate subset.

    err(S) = sum_n || y_full(x_n) - y_S(x_n) ||^2

y_S is the routed output with only the experts S (their router rows: the router renormalises over S and re-picks the
top-k among them); shared experts are the same on both sides and left out. When C(E, keep) <= ENUMERATE_LIMIT every
subset is tried; otherwise greedy backward elimination drops, one at a time, the expert whose removal raises the
error least. This is the layer-wise expert-selection idea of "Not All Experts are Equal: Efficient Expert Pruning and
Skipping for Mixture-of-Experts Large Language Models" (Lu et al., 2024), which enumerates subsets minimising the
layer-output reconstruction loss on calibration data.
Keeps: the chosen experts unchanged. Drops: the others and their router rows.
"""

from __future__ import annotations

import itertools
import math

import torch

from moetrain.compress.experts import routed_output
from moetrain.compress.methods import LayerJob, LayerResult, register

ENUMERATE_LIMIT = 256  # subsets tried exhaustively up to this many


@register("reconstruction")
def reconstruction(job: LayerJob) -> LayerResult:
    layer, cfg = job.experts, job.router_cfg
    x_ND = job.stats.inputs_ND.to(layer.w1_EDF.dtype)
    if x_ND.shape[0] == 0:
        raise ValueError("reconstruction needs recorded layer inputs; calibrate with at least one token")
    y_END = layer.outputs(x_ND)
    target_ND = routed_output(layer, x_ND, cfg, y_END)

    def error(subset: list[int]) -> float:
        idx = torch.as_tensor(subset)
        y_ND = routed_output(layer.select(subset), x_ND, cfg, y_END[idx])
        return float(((target_ND - y_ND) ** 2).sum())

    E = layer.num_experts
    if math.comb(E, job.keep) <= ENUMERATE_LIMIT:
        kept = list(min(itertools.combinations(range(E), job.keep), key=lambda s: error(list(s))))
    else:
        kept = list(range(E))
        while len(kept) > job.keep:
            drop = min(kept, key=lambda e: error([f for f in kept if f != e]))
            kept.remove(drop)
    return LayerResult(layer.select(kept), [[e] for e in kept])
