"""Calibration: per-MoE-layer statistics of a trained model on calibration tokens, in any parallel layout.

Legend: T calibration tokens (of one layer's input), D model dim, E routed experts of the layer, N kept input rows.

The model runs its ordinary forward; hooks read what each MoE layer already computes, nothing re-implements routing:
a forward pre-hook takes the layer's input x_TD (after ffn_norm), a forward hook on the router its RouterOutput
(logits_TE, scores_TE), a forward hook on the layer its RoutingRecord (tokens_per_expert_E). Per layer, summed over
the calibration tokens:

    freq_E          routed copies per expert (RoutingRecord.tokens_per_expert_E: the top-k choices)
    mass_E          sum_t p_te,  p_tE = scores_tE / sum_e scores_te   (the router's probability mass)
    logit_gram_EE   sum_t l_te * l_tf                  -> logit_sim_EE = cosine similarity of the experts' router-logit
                                                          columns over the tokens
    out_gram_EE     sum_t <y_e(x_t), y_f(x_t)>         -> out_sim_EE = cosine similarity of the experts' outputs on the
                                                          same tokens (every expert run on every token, routed or not)
    inputs_ND       the first `max_inputs` layer inputs (for the methods that measure a layer-output error)

Parallel layouts: every rank calibrates on its own tokens and its own experts (expert parallelism: experts
[r*E/W, (r+1)*E/W) of ep rank r; FSSDP: the experts it owns, its dispatcher's group being all ranks; the expert ids
come from the experts' `expert_ids`). Sums are all-reduced over the
world; for the output Gram each ep group first gathers its ranks' inputs, every rank runs its experts on all of
them and the outputs are gathered, so the Gram covers the group's tokens once per ep rank (divided out after the
world reduction). The result equals one process calibrating on the union of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from moetrain.moe.experts import reference_experts
from moetrain.moe.layer import MoELayer


@dataclass
class LayerStats:
    """The calibration statistics of one MoE layer (float64 sums over all calibration tokens, on the CPU)."""

    layer_id: int
    num_tokens: int
    freq_E: torch.Tensor
    mass_E: torch.Tensor
    logit_gram_EE: torch.Tensor
    out_gram_EE: torch.Tensor
    inputs_ND: torch.Tensor  # float32 layer inputs (the first max_inputs calibration tokens)

    @property
    def num_experts(self) -> int:
        return self.freq_E.numel()

    @property
    def logit_sim_EE(self) -> torch.Tensor:
        return _cosine(self.logit_gram_EE)

    @property
    def out_sim_EE(self) -> torch.Tensor:
        return _cosine(self.out_gram_EE)


def _cosine(gram_EE: torch.Tensor) -> torch.Tensor:
    norm_E = gram_EE.diagonal().clamp_min(1e-30).sqrt()
    return gram_EE / norm_E[:, None] / norm_E[None, :]


class _Collector:
    """Hooks on one MoE layer that accumulate its LayerStats on this rank."""

    def __init__(self, layer: MoELayer, max_inputs: int, ep_group: Optional[dist.ProcessGroup]):
        E = layer.num_experts
        self.layer, self.max_inputs, self.ep_group = layer, max_inputs, ep_group
        self.tokens = 0
        self.freq_E = torch.zeros(E, dtype=torch.float64)
        self.mass_E = torch.zeros(E, dtype=torch.float64)
        self.logit_gram_EE = torch.zeros(E, E, dtype=torch.float64)
        self.out_gram_EE = torch.zeros(E, E, dtype=torch.float64)
        self.inputs: list[torch.Tensor] = []
        self._x_TD: Optional[torch.Tensor] = None
        self.handles = [layer.register_forward_pre_hook(self._layer_input),
                        layer.router.register_forward_hook(self._router_output),
                        layer.register_forward_hook(self._layer_output)]

    def _layer_input(self, module, args, kwargs=None):
        x_BSD = args[0]
        self._x_TD = x_BSD.detach().reshape(-1, x_BSD.shape[-1]).float()

    def _router_output(self, module, args, routed):
        E = self.layer.num_experts
        logits_TE = routed.logits_TE.detach()[:, :E].double().cpu()  # dispatched experts only (no virtual ones)
        scores_TE = routed.scores_TE.detach()[:, :E].double().cpu()
        self.mass_E += (scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-30)).sum(0)
        self.logit_gram_EE += logits_TE.t() @ logits_TE

    def _layer_output(self, module, args, output):
        record = output[1]  # Block calls the layer with return_record=True
        self.freq_E += record.tokens_per_expert_E.detach().double().cpu()
        x_TD = self._x_TD
        self.tokens += x_TD.shape[0]
        kept = sum(t.shape[0] for t in self.inputs)
        if kept < self.max_inputs:
            self.inputs.append(x_TD[: self.max_inputs - kept].cpu())
        self.out_gram_EE += self._output_gram(x_TD)

    @torch.no_grad()
    def _output_gram(self, x_TD: torch.Tensor) -> torch.Tensor:
        """sum_t <y_e(x_t), y_f(x_t)> over this rank's tokens (under ep: over the ep group's tokens, see above)."""
        E = self.layer.num_experts
        group = self.ep_group
        if group is not None and dist.get_world_size(group) > 1:
            parts = [torch.empty_like(x_TD) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, x_TD.contiguous(), group=group)  # calibration micro-batches have equal shapes
            x_TD = torch.cat(parts)
        experts = self.layer.experts  # the experts this rank holds (ep: its slice; fssdp: the ones it owns)
        w1, w3, w2 = experts.w1_EDF, experts.w3_EDF, experts.w2_EFD
        L, T = w1.shape[0], x_TD.shape[0]
        x_RD = x_TD.to(w1.dtype).repeat(L, 1)  # every local expert on every token
        y_RD = reference_experts(x_RD, torch.full((L,), T), w1, w3, w2)
        y_LTD = y_RD.view(L, T, -1).double()
        ids = torch.as_tensor(experts.expert_ids)
        y_ETD = torch.zeros(E, T, y_LTD.shape[-1], dtype=torch.float64, device=y_LTD.device)
        y_ETD[ids.to(y_LTD.device)] = y_LTD
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(y_ETD, group=group)  # each expert's rows come from the one rank holding it
        y_ET = y_ETD.flatten(1)
        return (y_ET @ y_ET.t()).cpu()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def finish(self, world_group: Optional[dist.ProcessGroup]) -> LayerStats:
        inputs_ND = torch.cat(self.inputs) if self.inputs else torch.zeros(0, self.layer.dim)
        sums = torch.cat([torch.tensor([float(self.tokens)], dtype=torch.float64), self.freq_E, self.mass_E,
                          self.logit_gram_EE.flatten(), self.out_gram_EE.flatten()])
        if world_group is not None and dist.get_world_size(world_group) > 1:
            dist.all_reduce(sums, group=world_group)
            parts = [torch.empty_like(inputs_ND) for _ in range(dist.get_world_size(world_group))]
            dist.all_gather(parts, inputs_ND.contiguous(), group=world_group)
            inputs_ND = torch.cat(parts)[: self.max_inputs]
            ep = dist.get_world_size(self.ep_group) if self.ep_group is not None else 1
        else:
            ep = 1
        E = self.layer.num_experts
        tokens, freq_E, mass_E, logit_gram, out_gram = sums.split([1, E, E, E * E, E * E])
        return LayerStats(self.layer.layer_id, int(tokens.item()), freq_E, mass_E, logit_gram.view(E, E),
                          out_gram.view(E, E) / ep, inputs_ND)


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches: Iterable[torch.Tensor], max_inputs: int = 4096,
              world_group: Optional[dist.ProcessGroup] = None) -> list[LayerStats]:
    """LayerStats of every MoE layer of `model` (in order) after running it (eval mode) on this rank's token
    batches (int64 (B, S)). Collective when `world_group` has several ranks: every rank passes its own batches (the
    same number of the same shape) and gets the statistics of all of them. The ep group of each layer is its
    dispatcher's (`group`), none for local experts."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("the model has no MoE layer; there are no experts to compress")
    collectors = [_Collector(m, max_inputs, getattr(m.dispatcher, "group", None)) for m in layers]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for tokens_BS in batches:
            model(tokens_BS.to(device))
    finally:
        model.train(was_training)
        for c in collectors:
            c.remove()
    return [c.finish(world_group) for c in collectors]
