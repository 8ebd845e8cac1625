"""Neuron-level recombination: drop experts, then fold each dropped expert's neurons into the most compatible
retained expert (the DERN idea: "dropping experts, recombining neurons", retraining-free).

Legend: E experts, F expert hidden dim, D model dim, f_e routed-token count of expert e (calibration).

    retained: the `keep` most used experts; every other expert is dropped with its router row
    each dropped expert d is split into F neuron segments n_dj = [w1[:, j], w3[:, j], w2[j, :]] (3D values)
    its target: the retained neuron (r, i) of highest cosine similarity to n_dj over all retained experts r
    segments with cosine <= 0 (nothing compatible) are discarded
    retained neuron (r, i) <- n_ri + sum_{segments s onto it} (a_s / (f_r + sum a)) * (n_s - n_ri),  a_s = f_d * cos_s

i.e. a weighted average of the retained neuron and the segments merged into it, weighted by how often each expert
was used (and, for a segment, how well it fits). Retained experts keep their router rows and bias entries.
Keeps: every retained expert, enriched by the compatible parts of the dropped ones. Drops: the dropped experts'
router rows and their incompatible neurons.
"""

from __future__ import annotations

import torch

from moetrain.compress.methods import LayerJob, LayerResult, most_used, register


@register("dern")
def dern(job: LayerJob) -> LayerResult:
    layer, stats = job.experts, job.stats
    kept = most_used(stats, job.keep)
    dropped = [e for e in range(layer.num_experts) if e not in kept]
    F = layer.w1_EDF.shape[-1]
    D = layer.w1_EDF.shape[1]
    base_NX = torch.cat([layer.neurons(r) for r in kept]).double()  # N = keep * F retained neurons
    unit_NX = base_NX / base_NX.norm(dim=1, keepdim=True).clamp_min(1e-30)
    f = stats.freq_E.double() + 1e-9  # a never-used expert still counts a little
    total_N = f[torch.as_tensor(kept)].repeat_interleave(F).clone()  # each retained neuron's own weight f_r
    acc_NX = torch.zeros_like(base_NX)  # sum a_s (n_s - n_ri)
    sources = {r: [r] for r in kept}
    for d in dropped:
        seg_FX = layer.neurons(d).double()
        cos_FN = (seg_FX / seg_FX.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ unit_NX.t()
        best_cos, target = cos_FN.max(dim=1)
        ok = best_cos > 0
        a_F = f[d] * best_cos.clamp_min(0)
        acc_NX.index_add_(0, target[ok], a_F[ok, None] * (seg_FX[ok] - base_NX[target[ok]]))
        total_N.index_add_(0, target[ok], a_F[ok])
        for r_pos in sorted(set((target[ok] // F).tolist())):
            sources[kept[r_pos]].append(d)
    new_NX = base_NX + acc_NX / total_N[:, None]
    out = layer.select(kept)
    new_KFX = new_NX.view(len(kept), F, 3 * D).to(layer.w1_EDF.dtype)
    out.w1_EDF = new_KFX[:, :, :D].transpose(1, 2).contiguous()
    out.w3_EDF = new_KFX[:, :, D:2 * D].transpose(1, 2).contiguous()
    out.w2_EFD = new_KFX[:, :, 2 * D:].contiguous()
    return LayerResult(out, [sources[r] for r in kept])
