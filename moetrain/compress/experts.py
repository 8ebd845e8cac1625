"""One MoE layer's routed experts as plain tensors, and what the methods share: selection, neuron matching, the
layer output on given inputs.

Legend: E experts, D model dim, F expert hidden dim, N input rows, K top-k.

A layer is its router rows gate_ED (router.gate.weight), the aux-loss-free selection bias bias_E
(router.expert_bias_E) and the stacked SwiGLU weights w1_EDF, w3_EDF, w2_EFD (moe/experts.py's layout):

    y_e(x) = (silu(x @ w1_EDF[e]) * (x @ w3_EDF[e])) @ w2_EFD[e]

Keeping a subset S of the experts keeps their gate rows and bias entries: the router's softmax (or sigmoid) then
runs over the survivors only, so their probabilities are renormalised over S and top-k chooses among them.
Hidden neuron j of expert e is the triple (w1_EDF[e, :, j], w3_EDF[e, :, j], w2_EFD[e, j, :]); permuting the neurons
of an expert (the same permutation on all three) leaves y_e unchanged, which is what merging aligns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetrain.config.schema import RouterConfig
from moetrain.moe.experts import reference_experts
from moetrain.moe.routers import build_router


@dataclass
class LayerExperts:
    gate_ED: torch.Tensor
    bias_E: torch.Tensor
    w1_EDF: torch.Tensor
    w3_EDF: torch.Tensor
    w2_EFD: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.gate_ED.shape[0]

    def select(self, ids: list[int]) -> "LayerExperts":
        """The experts `ids` (in that order), router rows and bias entries included."""
        idx = torch.as_tensor(ids, dtype=torch.long)
        return LayerExperts(*(t[idx].clone() for t in (self.gate_ED, self.bias_E, self.w1_EDF, self.w3_EDF,
                                                        self.w2_EFD)))

    def neurons(self, e: int) -> torch.Tensor:
        """(F, 3D): neuron j of expert e as one vector [w1[:, j], w3[:, j], w2[j, :]]."""
        return torch.cat([self.w1_EDF[e].t(), self.w3_EDF[e].t(), self.w2_EFD[e]], dim=1)

    def permute_neurons(self, e: int, perm_F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1_DF, w3_DF, w2_FD) of expert e with its neurons reordered: new neuron j = old neuron perm_F[j]."""
        return self.w1_EDF[e][:, perm_F], self.w3_EDF[e][:, perm_F], self.w2_EFD[e][perm_F]

    def outputs(self, x_ND: torch.Tensor) -> torch.Tensor:
        """y_END: every expert on every row."""
        E, N = self.num_experts, x_ND.shape[0]
        y = reference_experts(x_ND.repeat(E, 1), torch.full((E,), N), self.w1_EDF, self.w3_EDF, self.w2_EFD)
        return y.view(E, N, -1)


def routed_output(layer: LayerExperts, x_ND: torch.Tensor, router_cfg: RouterConfig,
                  outputs_END: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's routed output sum_k gate_k * y_{idx_k}(x) on the rows x_ND (no shared experts), routed by the
    layer's own router class (moe/routers) built over `layer`'s experts. `outputs_END`: precomputed y_e(x) of these
    experts (reused across candidate subsets)."""
    router = build_router(x_ND.shape[1], layer.num_experts, router_cfg)
    with torch.no_grad():
        router.gate.weight.copy_(layer.gate_ED)
        router.expert_bias_E.copy_(layer.bias_E)
        routed = router(x_ND)
        y_END = layer.outputs(x_ND) if outputs_END is None else outputs_END
        rows_N = torch.arange(x_ND.shape[0])
        y_ND = torch.zeros_like(x_ND)
        for k in range(routed.topk_idx_TK.shape[1]):
            gate_N = routed.gates_TK[:, k]
            if routed.keep_TK is not None:
                gate_N = gate_N * routed.keep_TK[:, k]
            y_ND += gate_N[:, None].to(y_ND.dtype) * y_END[routed.topk_idx_TK[:, k], rows_N]
    return y_ND


def match_neurons(anchor_FX: torch.Tensor, other_FX: torch.Tensor) -> torch.Tensor:
    """perm_F maximising sum_j <anchor_FX[j], other_FX[perm_F[j]]> (a one-to-one neuron matching): scipy's
    linear_sum_assignment when scipy is installed (the `compress` extra), else a greedy matching taking the most
    similar remaining pair first (exact on permuted copies, whose best pairs are unique)."""
    score_FF = (anchor_FX.double() @ other_FX.double().t())
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return _greedy_matching(score_FF)
    rows, cols = linear_sum_assignment(score_FF.numpy(), maximize=True)
    perm = torch.empty(score_FF.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def _greedy_matching(score_FF: torch.Tensor) -> torch.Tensor:
    F = score_FF.shape[0]
    perm = torch.full((F,), -1, dtype=torch.long)
    s = score_FF.clone()
    for _ in range(F):
        flat = int(torch.argmax(s))
        i, j = divmod(flat, F)
        perm[i] = j
        s[i, :] = float("-inf")
        s[:, j] = float("-inf")
    return perm
