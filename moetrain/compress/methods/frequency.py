"""Frequency pruning: keep the experts that calibration tokens are routed to most, drop the rest.

Keeps: the `keep` experts with the highest routed-token count (RoutingRecord.tokens_per_expert_E summed over the
calibration tokens; ties broken by router probability mass), their weights, router rows and bias entries unchanged.
Drops: the other experts and their router rows; the router's softmax then renormalises over the survivors.
A never-chosen expert is in no calibration token's top-k, so pruning only such experts leaves every token's choice
unchanged, and its gates too when they do not depend on the dropped scores: sigmoid scores, or softmax with the top-k
gates renormalised (norm_topk_prob, top_k > 1: the survivors' common rescaling cancels). Unnormalised softmax gates
grow by the dropped experts' share of the probability mass.
"""

from __future__ import annotations

from moetrain.compress.methods import LayerJob, LayerResult, most_used, register


@register("frequency")
def frequency(job: LayerJob) -> LayerResult:
    kept = most_used(job.stats, job.keep)
    return LayerResult(job.experts.select(kept), [[e] for e in kept])
