"""Frequency pruning: keep the experts that calibration tokens are routed to most, drop the rest.

Keeps: the `keep` experts with the highest routed-token count (RoutingRecord.tokens_per_expert_E summed over the
calibration tokens; ties broken by router probability mass), their weights, router rows and bias entries unchanged.
Drops: the other experts and their router rows; the router's softmax then renormalises over the survivors.
A never-chosen expert contributes nothing to any calibration token, so pruning only such experts leaves the layer's
output on those tokens unchanged whenever each token's top-k selection among the survivors is the same (it is: the
dropped experts were never in anyone's top-k) -- up to the renormalisation of the gates when norm_topk_prob=false.
"""

from __future__ import annotations

from moetrain.compress.methods import LayerJob, LayerResult, most_used, register


@register("frequency")
def frequency(job: LayerJob) -> LayerResult:
    kept = most_used(job.stats, job.keep)
    return LayerResult(job.experts.select(kept), [[e] for e in kept])
