"""Routing statistics per MoE layer, turned into flat metric dicts for the loggers.

Legend: T tokens, E experts.

    MaxVio  = (max_i load_i - mean_i load_i) / mean_i load_i        (0 when there is no load)
    entropy = mean_t -sum_i p_{t,i} log p_{t,i},   p_{t,i} = s_{t,i} / sum_j s_{t,j}

"max_vio" is measured on one batch (one optimizer step); "max_vio_global" on the load summed over a logging window
(`RoutingWindow`). Counts passed here are expected to be already reduced over ranks by the caller.

Metric keys (L = layer index):
    moe/layer{L}/tokens_per_expert         list[int]  routed copies per expert in the batch
    moe/layer{L}/max_vio                   float      batch MaxVio
    moe/layer{L}/max_vio_global            float      MaxVio of the window's summed load
    moe/layer{L}/tokens_per_expert_window  list[int]  the window's summed load
    moe/layer{L}/entropy                   float      router entropy (nats)
    moe/layer{L}/bias_min|bias_max|bias_std float     aux-loss-free routing bias statistics
    moe/layer{L}/dropped_frac              float      fraction of routed copies dropped (capacity mode)
    moe/layer{L}/rank_load_max_over_mean   float      max / mean of the tokens computed per rank (1 if none)
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = ["max_vio", "router_entropy", "RoutingWindow", "layer_metrics"]

ArrayLike = Union[torch.Tensor, Sequence[float]]


def _as_vector(x: ArrayLike, name: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    t = t.to(device="cpu", dtype=torch.float64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-d, got shape {tuple(t.shape)}")
    return t


def max_vio(load_E: ArrayLike) -> float:
    """`(max_i load_i - mean load) / mean load`; 0.0 when there is no load (or no experts)."""
    load_E = _as_vector(load_E, "load_E")
    if load_E.numel() == 0:
        return 0.0
    mean = load_E.mean()
    if mean <= 0:
        return 0.0
    return float((load_E.max() - mean) / mean)


def router_entropy(scores_TE: torch.Tensor) -> float:
    """Mean over tokens of `-sum_i p log p` of the per-token normalised scores (nats); 0.0 for no tokens."""
    if scores_TE.dim() != 2:
        raise ValueError(f"scores_TE must have shape (T, E), got {tuple(scores_TE.shape)}")
    if scores_TE.shape[0] == 0:
        return 0.0
    with torch.no_grad():
        s_TE = scores_TE.detach().double()
        p_TE = s_TE / s_TE.sum(-1, keepdim=True).clamp_min(1e-300)
        return float(-torch.special.xlogy(p_TE, p_TE).sum(-1).mean())


class RoutingWindow:
    """Accumulates tokens per expert per layer over a logging window; `summary()` reports and resets."""

    def __init__(self) -> None:
        self._load: dict[int, torch.Tensor] = {}

    def add(self, layer: int, tokens_per_expert_E: ArrayLike) -> None:
        counts_E = _as_vector(tokens_per_expert_E, "tokens_per_expert_E")
        prev_E = self._load.get(layer)
        if prev_E is None:
            self._load[layer] = counts_E.clone()
        elif prev_E.shape != counts_E.shape:
            raise ValueError(f"layer {layer}: {counts_E.numel()} experts, earlier in this window {prev_E.numel()}")
        else:
            prev_E += counts_E

    def __len__(self) -> int:
        return len(self._load)

    def summary(self, prefix: str = "moe") -> dict[str, Union[float, list]]:
        """Per layer: `{prefix}/layer{L}/max_vio_global` and `.../tokens_per_expert_window`; then resets the window."""
        out: dict[str, Union[float, list]] = {}
        for layer in sorted(self._load):
            load_E = self._load[layer]
            out[f"{prefix}/layer{layer}/max_vio_global"] = max_vio(load_E)
            out[f"{prefix}/layer{layer}/tokens_per_expert_window"] = [int(round(v)) for v in load_E.tolist()]
        self._load.clear()
        return out


def layer_metrics(
    layer: int,
    tokens_per_expert_E: ArrayLike,
    scores_TE: Optional[torch.Tensor] = None,
    bias_E: Optional[torch.Tensor] = None,
    dropped_frac: Optional[float] = None,
    rank_loads: Optional[ArrayLike] = None,
    prefix: str = "moe",
) -> dict[str, Union[float, list]]:
    """The metrics of one MoE layer for one step; only the keys whose inputs are given (see the module docstring)."""
    p = f"{prefix}/layer{layer}"
    counts_E = _as_vector(tokens_per_expert_E, "tokens_per_expert_E")
    out: dict[str, Union[float, list]] = {
        f"{p}/tokens_per_expert": [int(round(v)) for v in counts_E.tolist()],
        f"{p}/max_vio": max_vio(counts_E),
    }
    if scores_TE is not None:
        out[f"{p}/entropy"] = router_entropy(scores_TE)
    if bias_E is not None:
        b_E = _as_vector(bias_E, "bias_E")
        if b_E.numel():
            out[f"{p}/bias_min"] = float(b_E.min())
            out[f"{p}/bias_max"] = float(b_E.max())
            out[f"{p}/bias_std"] = float(b_E.std(unbiased=False))
    if dropped_frac is not None:
        out[f"{p}/dropped_frac"] = float(dropped_frac)
    if rank_loads is not None:
        loads_W = _as_vector(rank_loads, "rank_loads")
        mean = float(loads_W.mean()) if loads_W.numel() else 0.0
        out[f"{p}/rank_load_max_over_mean"] = float(loads_W.max()) / mean if mean > 0 else 1.0
    return out
