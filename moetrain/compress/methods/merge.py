"""Merging by router-similarity groups after neuron alignment, in the spirit of "Merge, Then Compress: Demystify
Efficient SMoE with Hints from Its Routing Policy" (MC-SMoE, Li et al., ICLR 2024).

Legend: E experts, F expert hidden dim, f_e routed-token count of expert e (calibration).

    dominant experts: the `keep` most used (f_e)
    group(e) = argmax_{d dominant} logit_sim(e, d)          (cosine of router-logit columns over calibration tokens)
    for each member e of d's group: perm_e = the neuron matching of e onto d (compress/experts.match_neurons)
    W_merged = W_d + sum_{e != d} (f_e / sum_group f) * (W_e[perm_e] - W_d)   = sum_group f_e W_e[perm_e] / sum f

(all three SwiGLU matrices with the same permutation; equal weights when the whole group was never routed to).
The merged expert keeps the dominant expert's router row and bias entry. Written as W_d plus weighted differences,
merging experts that are neuron permutations of each other returns W_d exactly.
Keeps: one expert per group (its dominant's routing), carrying every member's weights. Drops: the non-dominant
router rows; MC-SMoE's follow-up low-rank compression of the merged experts is not done here.
"""

from __future__ import annotations

import torch

from moetrain.compress.experts import match_neurons
from moetrain.compress.methods import LayerJob, LayerResult, most_used, register


@register("merge")
def merge(job: LayerJob) -> LayerResult:
    layer, stats = job.experts, job.stats
    dominant = most_used(stats, job.keep)
    sim_EE = stats.logit_sim_EE
    groups = {d: [d] for d in dominant}
    for e in range(layer.num_experts):
        if e not in groups:
            groups[max(dominant, key=lambda d: (float(sim_EE[e, d]), -d))].append(e)
    merged = layer.select(dominant)
    for i, d in enumerate(dominant):
        members = groups[d]
        weight = stats.freq_E[members].double()
        weight = weight / weight.sum() if weight.sum() > 0 else torch.full_like(weight, 1.0 / len(members))
        w1, w3, w2 = (t.clone() for t in (merged.w1_EDF[i], merged.w3_EDF[i], merged.w2_EFD[i]))
        anchor_FX = layer.neurons(d)
        for e, w in zip(members[1:], weight[1:].tolist()):
            a1, a3, a2 = layer.permute_neurons(e, match_neurons(anchor_FX, layer.neurons(e)))
            w1 += w * (a1 - layer.w1_EDF[d])
            w3 += w * (a3 - layer.w3_EDF[d])
            w2 += w * (a2 - layer.w2_EFD[d])
        merged.w1_EDF[i], merged.w3_EDF[i], merged.w2_EFD[i] = w1, w3, w2
    return LayerResult(merged, [groups[d] for d in dominant])


