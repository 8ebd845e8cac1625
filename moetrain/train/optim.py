"""AdamW and the learning-rate schedule.

Weight decay applies to matrices (ndim >= 2) except the token embedding; norms' gains are not decayed.
Schedule (step s counted from 0, warm-up w, total N, floor r = min_lr_ratio):
    lr(s) = lr * (s + 1) / w                                       for s < w
    lr(s) = lr * (r + (1 - r) * 0.5 * (1 + cos(pi * (s - w) / (N - w))))   after (cosine), or lr (constant)
Implementation: `impl=auto` picks apex FusedAdam on CUDA when apex is importable, else torch's fused AdamW wherever
torch has a fused kernel for every parameter (floating point on a supported device: CPU and CUDA both, in torch 2.13),
else foreach. `impl=fused` asks for torch's fused AdamW regardless (torch refuses unsupported parameters). The choice
is made here, once; under FSDP2, `moetrain.parallel.fsdp.fit_optimizer` then drops to the per-tensor loop when plain
tensors sit next to DTensors (torch's fused and foreach kernels both refuse that mix).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moetrain.config.schema import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embed_ids = {id(p) for name, p in model.named_parameters() if "tok_embeddings" in name}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embed_ids else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # type: ignore
    except Exception:  # noqa: BLE001 - apex is optional and may be broken
        return None
    return FusedAdam


def fused_supported(params) -> bool:
    """Whether torch's fused AdamW has a kernel for every parameter: floating point on a device torch lists as having
    fused optimizer kernels (the check `torch.optim.AdamW(fused=True)` makes, done here without raising)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    params = list(params)
    return bool(params) and all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    impl = cfg.impl
    if impl in ("auto", "apex") and device.type == "cuda":
        fused_adam = _apex_fused_adam()
        if fused_adam is not None:
            return fused_adam(groups, adam_w_mode=True, **kwargs)
        if impl == "apex":
            raise RuntimeError("optim.impl=apex but NVIDIA apex is not importable; use optim.impl=auto")
    if impl == "apex" and device.type != "cuda":
        raise RuntimeError("optim.impl=apex needs a CUDA device; use optim.impl=auto")
    fused = impl == "fused" or (impl == "auto" and fused_supported(p for g in groups for p in g["params"]))
    return torch.optim.AdamW(groups, fused=fused, foreach=None if fused else True, **kwargs)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    w, r = cfg.warmup_steps, cfg.min_lr_ratio

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        if cfg.schedule == "constant" or max_steps <= w:
            return 1.0
        progress = min(1.0, (step - w) / (max_steps - w))
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, max_steps))


def set_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                        cfg: OptimConfig) -> None:
    """Give an optimizer restored from a checkpoint the config's lr, betas, eps and weight decay (its moments and
    step counts stay), and re-evaluate the schedule (built from this config) at the scheduler's current step."""
    groups = optimizer.param_groups
    for group, weight_decay in zip(groups, (cfg.weight_decay, 0.0)):  # the order of `param_groups`
        group.update(initial_lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=weight_decay)
    scheduler.base_lrs = [cfg.lr] * len(groups)
    for group, factor in zip(groups, scheduler.lr_lambdas):
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
