"""Measured per-rank memory of the training state: parameters, gradients and optimizer state, dense and expert.

    measured_state_bytes(model, optimizer) -> {"dense_params", "dense_grads", "dense_optim",
                                               "expert_params", "expert_grads", "expert_optim"}   (bytes, this rank)

Counted from the tensors this rank actually holds: a DTensor (FSDP2) counts its local shard (`to_local()`), and the
bytes are those of the storages behind the tensors, each storage once (FSDP2's padded shards count with their
padding). A storage shared by several tensors (tied weights, views, FSDP2's one reduce-scatter buffer that all
gradients of a unit view, dense and expert alike) is split between the categories in proportion to the bytes of the
distinct tensors viewing it. Expert parameters are the ones with `expert_ids` (moe/experts.py); optimizer state is
attributed to the parameter it belongs to. Measure between backward and `zero_grad` to see the gradients; the
optimizer state exists after the first step. The dry-run estimate is compared against these figures.
"""

from __future__ import annotations

import torch
from torch import nn

KEYS = ("dense_params", "dense_grads", "dense_optim", "expert_params", "expert_grads", "expert_optim")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def measured_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients and optimizer state, split into dense and expert (see module)."""
    storages: dict[tuple[str, int], tuple[int, dict[tuple, tuple[str, int]]]] = {}

    def add(key: str, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        local = _local(t)
        storage = local.untyped_storage()
        if storage.nbytes() == 0:
            return
        ident = (str(storage.device), storage.data_ptr())
        views = storages.setdefault(ident, (storage.nbytes(), {}))[1]
        view = (local.data_ptr(), tuple(local.shape), tuple(local.stride()))  # the same view seen twice counts once
        views.setdefault(view, (key, local.numel() * local.element_size()))

    for p in dict.fromkeys(model.parameters()):
        kind = "expert" if getattr(p, "expert_ids", None) is not None else "dense"
        add(f"{kind}_params", p)
        add(f"{kind}_grads", p.grad)
        if optimizer is not None:
            for value in optimizer.state.get(p, {}).values():
                add(f"{kind}_optim", value)

    out = dict.fromkeys(KEYS, 0)
    for nbytes, views in storages.values():
        shares: dict[str, int] = {}
        for key, size in views.values():
            shares[key] = shares.get(key, 0) + size
        total = sum(shares.values())
        if total == 0:  # only empty views: the storage goes to the first
            out[next(iter(views.values()))[0]] += nbytes
            continue
        given = 0
        for key, size in sorted(shares.items(), key=lambda kv: -kv[1]):
            part = nbytes * size // total
            out[key] += part
            given += part
        out[max(shares, key=shares.get)] += nbytes - given  # rounding: to the largest share
    return out
