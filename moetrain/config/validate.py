"""Semantic checks of a composed TrainConfig, run before any process group starts.

Each problem is one line that names the key, the value and the fix. All problems are collected and reported
together, so a user fixes a command line once.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moetrain.config.schema import TrainConfig


class ConfigError(ValueError):
    """A configuration problem the user can fix on the command line."""


def _writable_dir(path: Path) -> bool:
    """Whether `path` is, or could be created as, a writable directory: probe its nearest existing ancestor by
    creating and removing a temporary directory there (os.access says yes to root even where writes fail)."""
    p = path.expanduser().absolute()
    while not p.exists():
        if p.parent == p:
            return False
        p = p.parent
    if not p.is_dir():
        return False
    try:
        os.rmdir(tempfile.mkdtemp(dir=p, prefix=".moetrain-probe-"))
    except OSError:
        return False
    return True


def check(cfg: TrainConfig, world_size: int) -> list[str]:
    m, r, par, o, d, t = cfg.model, cfg.router, cfg.parallel, cfg.optim, cfg.data, cfg.trainer
    errors: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            errors.append(msg)

    # model
    need(m.dim > 0 and m.n_heads > 0 and m.dim % m.n_heads == 0,
         f"model.dim={m.dim} must be a positive multiple of model.n_heads={m.n_heads}")
    need(m.n_kv_heads > 0 and m.n_heads % max(m.n_kv_heads, 1) == 0,
         f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads} (grouped-query attention)")
    need(m.n_heads > 0 and (m.dim // max(m.n_heads, 1)) % 2 == 0,
         f"head dim model.dim/model.n_heads={m.dim}/{m.n_heads} must be even for RoPE")
    need(m.n_layers > 0, f"model.n_layers={m.n_layers} must be at least 1")
    need(m.vocab_size >= 256, f"model.vocab_size={m.vocab_size} is below 256, the byte tokenizer's vocabulary; "
                              "set model.vocab_size=256 or more")
    need(m.num_experts >= 0, f"model.num_experts={m.num_experts} must be >= 0 (0 = dense model)")
    need(m.moe_every >= 1, f"model.moe_every={m.moe_every} must be >= 1")
    # router
    if m.num_experts > 0:
        need(1 <= r.top_k <= m.num_experts,
             f"router.top_k={r.top_k} must be between 1 and model.num_experts={m.num_experts}; "
             f"lower router.top_k or raise model.num_experts")
        need(r.score_func in ("softmax", "sigmoid"),
             f"router.score_func={r.score_func!r} is unknown; use softmax or sigmoid")
        need(r.num_groups >= 1 and m.num_experts % r.num_groups == 0,
             f"model.num_experts={m.num_experts} must be divisible by router.num_groups={r.num_groups}")
        need(1 <= r.topk_groups <= r.num_groups,
             f"router.topk_groups={r.topk_groups} must be between 1 and router.num_groups={r.num_groups}")
        if r.num_groups > 1 and m.num_experts % r.num_groups == 0:
            need(r.top_k <= r.topk_groups * (m.num_experts // r.num_groups),
                 f"router.top_k={r.top_k} exceeds the experts in router.topk_groups={r.topk_groups} groups of "
                 f"{m.num_experts // r.num_groups}; raise router.topk_groups")
        need(r.capacity_factor is None or r.capacity_factor > 0,
             f"router.capacity_factor={r.capacity_factor} must be > 0 (or null for dropless)")
        need(not r.pad_to_capacity or r.capacity_factor is not None,
             "router.pad_to_capacity=true needs a router.capacity_factor (padding is to the capacity)")
        need(r.bias_update_rate >= 0, f"router.bias_update_rate={r.bias_update_rate} must be >= 0 (0 turns it off)")
        for key in ("aux_loss_coeff", "seq_aux_loss_coeff", "z_loss_coeff"):
            need(getattr(r, key) >= 0, f"router.{key}={getattr(r, key)} must be >= 0")
    # parallel
    need(par.mode in ("ep", "fssdp"), f"parallel.mode={par.mode!r} is unknown; use ep or fssdp")
    if par.mode == "fssdp":
        need(m.num_experts > 0 and m.num_experts % world_size == 0,
             f"parallel.mode=fssdp shards whole experts over all {world_size} ranks: model.num_experts="
             f"{m.num_experts} must be a positive multiple of the world size")
        need(par.ep in (1, world_size), f"parallel.ep={par.ep} has no meaning with parallel.mode=fssdp (experts are "
                                        f"sharded over all ranks); drop parallel.ep")
        need(par.data_parallel == "ddp", "parallel.mode=fssdp keeps dense parameters with parallel.data_parallel=ddp")
        need(par.fssdp.budget >= 0 and par.fssdp.window >= 1 and par.fssdp.reshard_every >= 0,
             "parallel.fssdp.budget and parallel.fssdp.reshard_every must be >= 0, parallel.fssdp.window >= 1")
    need(par.ep >= 1, f"parallel.ep={par.ep} must be >= 1")
    if par.ep >= 1 and par.mode == "ep":
        need(world_size % par.ep == 0,
             f"world size {world_size} is not divisible by parallel.ep={par.ep}; launch a multiple of {par.ep} "
             f"processes or change parallel.ep")
        need(m.num_experts == 0 or m.num_experts % par.ep == 0,
             f"model.num_experts={m.num_experts} is not divisible by parallel.ep={par.ep}; "
             f"pick parallel.ep among the divisors of {m.num_experts}")
        need(par.ep == 1 or m.num_experts > 0, "parallel.ep > 1 needs MoE layers (model.num_experts > 0)")
    need(par.data_parallel in ("ddp", "fsdp"), f"parallel.data_parallel={par.data_parallel!r} is unknown; use ddp or fsdp")
    need(par.data_parallel != "fsdp" or par.ep == 1,
         "parallel.data_parallel=fsdp supports parallel.ep=1 only for now; use parallel.data_parallel=ddp with ep > 1")
    need(par.pipeline_degree in ("auto", "1", "2", "4", "8"),
         f"parallel.pipeline_degree={par.pipeline_degree!r} is invalid; use auto, 1, 2, 4 or 8")
    need(par.backend in ("auto", "gloo", "nccl"), f"parallel.backend={par.backend!r} is unknown; use auto, gloo or nccl")
    # optim
    need(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    need(o.schedule in ("cosine", "constant"), f"optim.schedule={o.schedule!r} is unknown; use cosine or constant")
    need(o.impl in ("auto", "fused", "foreach", "apex"), f"optim.impl={o.impl!r} is unknown; use auto, fused, foreach or apex")
    need(o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0 disables clipping)")
    # data
    need(d.seq_len >= 1, f"data.seq_len={d.seq_len} must be >= 1")
    need(d.seq_len <= m.max_seq_len,
         f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower data.seq_len or raise "
         f"model.max_seq_len")
    need(d.micro_batch_size >= 1, f"data.micro_batch_size={d.micro_batch_size} must be >= 1")
    if d.micro_batch_size >= 1:
        need(d.global_batch_size % (d.micro_batch_size * world_size) == 0 and d.global_batch_size > 0,
             f"data.global_batch_size={d.global_batch_size} must be a positive multiple of data.micro_batch_size="
             f"{d.micro_batch_size} x {world_size} ranks; e.g. data.global_batch_size="
             f"{d.micro_batch_size * world_size * max(1, d.global_batch_size // max(1, d.micro_batch_size * world_size))}")
    need(0 < d.val_fraction < 1, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    need(d.name in ("stdlib", "shards"), f"data.name={d.name!r} is unknown; use stdlib (embedded corpus) or shards")
    if d.name == "shards":
        if not d.path:
            errors.append("data.name=shards needs data.path=DIR; create DIR with `moetrain-prepare INPUT --out DIR`")
        elif not (Path(d.path) / "meta.json").is_file():
            errors.append(f"data.path={d.path} is not a shard directory (no meta.json); create it with "
                          f"`moetrain-prepare INPUT --out {d.path}`")
    # trainer
    need(t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1")
    need(t.log_every >= 1, f"trainer.log_every={t.log_every} must be >= 1")
    need(t.eval_every >= 0 and t.checkpoint_every >= 0, "trainer.eval_every and trainer.checkpoint_every must be >= 0")
    need(t.keep_checkpoints >= 1, f"trainer.keep_checkpoints={t.keep_checkpoints} must be >= 1")
    need(t.device in ("auto", "cpu", "cuda"), f"trainer.device={t.device!r} is unknown; use auto, cpu or cuda")
    if t.device == "cuda":
        import torch

        need(torch.cuda.is_available(), "trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
    need(_writable_dir(Path(t.run_dir)),
         f"trainer.run_dir={t.run_dir} cannot be written (permission denied or not a directory); "
         f"choose another trainer.run_dir")
    if t.resume not in ("auto", "none"):
        need((Path(t.resume) / "COMPLETE").is_file(),
             f"trainer.resume={t.resume} is not a complete checkpoint directory; use trainer.resume=auto or a "
             f"path like RUN_DIR/checkpoints/step_00000100")
    return errors


def validate(cfg: TrainConfig, world_size: int) -> None:
    errors = check(cfg, world_size)
    if errors:
        raise ConfigError("; ".join(errors) if len(errors) == 1 else
                          f"{len(errors)} config problems:\n  - " + "\n  - ".join(errors))
