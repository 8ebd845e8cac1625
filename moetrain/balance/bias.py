"""Aux-loss-free load balancing (DeepSeek-V3, arXiv 2408.15664): the per-expert routing bias controller.

Legend: E experts.

After the backward pass and before the optimizer step, with c_E the routed copies per expert summed over the
micro-batches of the step and all-reduced over the data-parallel ranks:

    rule=proportional:  u_E = rate * (mean(c) - c) / mean(c)   # a step proportional to the normalised violation
    rule=sign:          u_E = rate * sign(mean(c) - c)         # DeepSeek-V3's fixed step; sign(0) = 0
    u_E = u_E - mean(u_E)                   # only with center=True: the bias keeps zero mean
    b_E += u_E

Overloaded experts go down, underloaded go up. The proportional rule is a dual (sub)gradient step on the balance
constraint c_i = mean(c) (the primal-dual view of Han & Zhong 2025, arXiv 2512.03915): its step shrinks as the loads
approach balance, so the bias settles instead of moving +-rate every step as the sign rule does at balance, and a
large violation moves it fast (an unused expert gains +rate, the busiest one loses rate * its MaxVio). The proportional
update has zero mean by construction (centering changes nothing); all-zero counts leave the bias unchanged.

The bias is fp32, never receives a gradient, and only affects top-k selection (gates come from the raw scores).
The rate is schedulable to zero late in training (`bias_rate_at`), freezing the routing bias.
"""

from __future__ import annotations

import torch

__all__ = ["BIAS_UPDATE_RULES", "bias_update_", "bias_rate_at"]

BIAS_UPDATE_RULES = ("proportional", "sign")


@torch.no_grad()
def bias_update_(
    bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float, center: bool = False,
    rule: str = "proportional",
) -> torch.Tensor:
    """In place `b_E += u_E` (minus its mean if `center`); returns the applied update u_E.

    rule="sign": u_E = rate * sign(mean(c) - c); rule="proportional": u_E = rate * (mean(c) - c) / mean(c).
    An expert at exactly the mean load is left unchanged; an expert nobody picked gets +rate (unless every expert is
    unused, then nothing changes).
    """
    if rule not in BIAS_UPDATE_RULES:
        raise ValueError(f"unknown bias update rule {rule!r}; expected one of {BIAS_UPDATE_RULES}")
    if bias_E.dtype != torch.float32:
        raise TypeError(f"the routing bias must be fp32, got {bias_E.dtype}")
    if bias_E.dim() != 1 or tokens_per_expert_E.numel() != bias_E.numel():
        raise ValueError(
            f"bias_E must be 1-d and match tokens_per_expert_E: {tuple(bias_E.shape)} vs "
            f"{tuple(tokens_per_expert_E.shape)}"
        )
    counts_E = tokens_per_expert_E.detach().reshape(-1).to(device=bias_E.device, dtype=torch.float64)
    mean = counts_E.mean()
    if rule == "sign":
        update_E = (rate * torch.sign(mean - counts_E)).to(torch.float32)
    else:  # all-zero counts: 0 / tiny = 0 (no host sync to test the mean)
        update_E = (rate * (mean - counts_E) / mean.clamp(min=1e-12)).to(torch.float32)
    if center:
        update_E = update_E - update_E.mean()
    bias_E.add_(update_E)
    return update_E


def bias_rate_at(step: int, max_steps: int, rate: float, stop_frac: float) -> float:
    """The bias update rate at `step`: `rate` before `stop_frac * max_steps`, 0 from then on.

    Schedulable to zero late in training: stop_frac=1.0 keeps updating for the whole run, 0.8 freezes the bias for
    the last 20% of the steps, 0.0 never updates.
    """
    if not 0.0 <= stop_frac:
        raise ValueError(f"bias_update_stop_frac must be >= 0, got {stop_frac}")
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    return float(rate) if step < stop_frac * max_steps else 0.0
