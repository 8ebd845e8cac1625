"""Random pruning, the floor every method should beat: keep `keep` experts drawn uniformly (seeded by --seed and
the layer), drop the rest with their router rows."""

from __future__ import annotations

import torch

from moetrain.compress.methods import LayerJob, LayerResult, register


@register("random")
def random_prune(job: LayerJob) -> LayerResult:
    g = torch.Generator().manual_seed(job.seed * 1_000_003 + job.layer_id)
    kept = sorted(torch.randperm(job.experts.num_experts, generator=g)[: job.keep].tolist())
    return LayerResult(job.experts.select(kept), [[e] for e in kept])
