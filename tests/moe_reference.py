"""A deliberately simple single-process MoE reference: every expert on every token, then pick and weight.

    y_TD[t] = sum_k gates_TK[t, k] * SwiGLU_{topk_idx_TK[t, k]}(x_TD[t])

No permutation, no grouped GEMM, no communication: what every optimised path must reproduce.
"""

import torch
import torch.nn.functional as F


def dense_moe_reference(x_TD, topk_idx_TK, gates_TK, w1_EDF, w3_EDF, w2_EFD, keep_TK=None):
    E = w1_EDF.shape[0]
    out_ETD = torch.stack([(F.silu(x_TD @ w1_EDF[e]) * (x_TD @ w3_EDF[e])) @ w2_EFD[e] for e in range(E)])
    T = x_TD.shape[0]
    picked_TKD = out_ETD[topk_idx_TK, torch.arange(T)[:, None]]
    weights_TK = gates_TK if keep_TK is None else gates_TK * keep_TK
    return (picked_TKD * weights_TK[..., None]).sum(1)
