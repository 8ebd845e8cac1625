"""The training loop: micro-batches with gradient accumulation, gradient sync, clipping, bias update, optimizer step,
periodic evaluation, logging and checkpoints.

Legend: B micro-batch, S sequence, V vocabulary.

One optimizer step s (0-based; `step` in logs and checkpoints counts completed steps):
    for m in micro-batches:  loss_m = CE(model(x_BS), y_BS) + router losses;  (loss_m / accum).backward()
    sync gradients (dense over the world, experts over their expert-data-parallel group)  [DDP mode]
    clip the global norm; update router biases from this step's global token counts; AdamW step; LR schedule step
The logged `loss` is the language-model loss averaged over all micro-batches and ranks (the router losses are logged
separately as `aux_loss`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from moetrain.balance.controller import BalanceController, router_counting
from moetrain.config.schema import TrainConfig
from moetrain.data.loader import build_loader
from moetrain.model.transformer import TransformerLM
from moetrain.parallel.grad_sync import clip_grad_norm_, sync_gradients
from moetrain.parallel.mesh import ParallelContext
from moetrain.telemetry.loggers import build_loggers
from moetrain.telemetry.routing_stats import RoutingWindow, layer_metrics
from moetrain.train import checkpoint as ckpt
from moetrain.train.optim import build_optimizer, build_scheduler


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        tc = cfg.trainer
        self.run_dir = Path(tc.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))

        fssdp = cfg.parallel.fssdp if cfg.parallel.mode == "fssdp" else None
        self.model = TransformerLM(cfg.model, cfg.router, ctx.ep_group, ctx.world_group,
                                   tc.activation_checkpointing, fssdp, cfg.parallel.pipeline_degree).to(ctx.device)
        self.model.init_weights(tc.seed)
        self.fsdp = cfg.parallel.data_parallel == "fsdp" and ctx.is_distributed
        if self.fsdp:
            from moetrain.parallel.fsdp import apply_fsdp

            apply_fsdp(self.model, ctx)
        self.optimizer = build_optimizer(self.model, cfg.optim, ctx.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.max_steps)
        self.loader = build_loader(cfg.data, tc.seed, ctx.rank, ctx.world_size)
        self.balance = BalanceController(self.model, cfg.router, tc.max_steps, ctx)
        self.window = RoutingWindow()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda"
                         else nullcontext())
        self.loggers = build_loggers(cfg.logger, self.run_dir, ctx.rank,
                                     OmegaConf.to_container(OmegaConf.structured(cfg)))
        self.step = 0

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict[str, torch.Tensor]:
        extra = {"step": torch.tensor([self.step], dtype=torch.int64), "rng_cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        return extra

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                                    extra=self._extra_state(), keep=self.cfg.trainer.keep_checkpoints)

    def maybe_resume(self) -> Optional[Path]:
        resume = self.cfg.trainer.resume
        if resume == "none":
            return None
        path = ckpt.find_latest(self.ckpt_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        extra = self._extra_state()
        ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler, extra=extra)
        self.step = int(extra["step"].item())
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra:
            torch.cuda.set_rng_state(extra["rng_cuda"], self.ctx.device)
        return path

    # ---------------------------------------------------------------------------------------------- train / eval
    def _mean_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.ctx.device)
        if self.ctx.is_distributed:
            dist.all_reduce(t, group=self.ctx.world_group)
            t /= self.ctx.world_size
        return t.cpu().tolist()

    def _now(self) -> float:
        if self.ctx.device.type == "cuda":  # time finished work, not queued kernels
            torch.cuda.synchronize(self.ctx.device)
        return time.perf_counter()

    def train_step(self) -> dict[str, float]:
        model, accum = self.model, self.loader.grad_accum_steps
        model.train()
        lm_total = 0.0
        aux_totals: dict[str, float] = {}
        times = dict.fromkeys(("data", "forward", "backward", "grad_sync", "optimizer"), 0.0)
        for micro in range(accum):
            t0 = self._now()
            inputs_BS, targets_BS = self.loader.train_batch(self.step, micro)
            inputs_BS, targets_BS = inputs_BS.to(self.ctx.device), targets_BS.to(self.ctx.device)
            t1 = self._now()
            with router_counting(model, True), self.autocast:
                logits_BSV = model(inputs_BS)
                lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten())
                aux = model.aux_loss()
            self.balance.after_forward()
            loss = lm_loss if aux is None else lm_loss + aux
            t2 = self._now()
            with router_counting(model, False):
                (loss / accum).backward()
            t3 = self._now()
            times["data"] += t1 - t0
            times["forward"] += t2 - t1
            times["backward"] += t3 - t2
            lm_total += lm_loss.item()
            for layer in self.balance.layers:
                for name, term in layer.aux_terms.items():
                    aux_totals[name] = aux_totals.get(name, 0.0) + term.item()
        t0 = self._now()
        if not self.fsdp:
            sync_gradients(model, self.ctx)
        grad_norm = self._clip()
        t1 = self._now()
        self.counts_NE = self.balance.step(self.step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.step_degrees = [layer.degree for layer in self.balance.layers]  # the degrees this step ran with
        for layer, counts_E in zip(self.balance.layers, self.counts_NE):
            layer.end_step(counts_E)  # pipeline degree tuning
            if layer.fssdp_state is not None:  # next placement (and periodic re-sharding) from this step's load
                layer.fssdp_state.after_step(self.step, counts_E, list(layer.experts.parameters()), self.optimizer)
        times["grad_sync"], times["optimizer"] = t1 - t0, self._now() - t1
        names = sorted(aux_totals)
        reduced = self._mean_over_ranks([lm_total / accum] + [aux_totals[n] / accum for n in names])
        metrics = {"loss": reduced[0], "aux_loss": sum(reduced[1:]), "grad_norm": float(grad_norm)}
        metrics.update({f"aux/{n}": v for n, v in zip(names, reduced[1:])})
        metrics.update({f"time/{k}_s": v for k, v in times.items()})
        return metrics

    def _clip(self) -> torch.Tensor:
        max_norm = self.cfg.optim.grad_clip
        if self.fsdp:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm if max_norm > 0 else float("inf"))
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return clip_grad_norm_(self.model, max_norm, self.ctx)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        total, n = 0.0, 0
        with router_counting(self.model, False), self.autocast:
            for inputs_BS, targets_BS in self.loader.val_batches(self.cfg.trainer.eval_batches):
                logits = self.model(inputs_BS.to(self.ctx.device))
                total += F.cross_entropy(logits.flatten(0, 1), targets_BS.to(self.ctx.device).flatten()).item()
                n += 1
        self.model.train()
        if self.fsdp:  # FSDP2 keeps the root's parameters unsharded after a forward without backward
            self.model.reshard()
        (val_loss,) = self._mean_over_ranks([total / max(n, 1)])
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    def _routing_metrics(self, log_now: bool) -> dict:
        for m, counts_E in zip(self.balance.layers, self.counts_NE):
            self.window.add(m.layer_id, counts_E)
        if not log_now:
            return {}
        compute = self.balance.pop_compute_stats()
        metrics: dict = {}
        for i, (m, counts_E) in enumerate(zip(self.balance.layers, self.counts_NE)):
            metrics.update(layer_metrics(
                m.layer_id, counts_E, bias_E=m.router.expert_bias_E,
                dropped_frac=compute["dropped_frac"][i] if m.router_cfg.capacity_factor else None,
                rank_loads=compute["rank_loads"][i]))
            metrics[f"moe/layer{m.layer_id}/entropy"] = compute["entropy"][i]
            metrics[f"moe/layer{m.layer_id}/pipeline_degree"] = self.step_degrees[i]
        metrics.update(self.window.summary())
        for m in self.balance.layers:
            if m.fssdp_state is not None:
                metrics[f"moe/layer{m.layer_id}/replicas"] = m.fssdp_state.placement.num_replicas()
                metrics[f"moe/layer{m.layer_id}/owners"] = list(m.fssdp_state.owners)
                metrics[f"moe/layer{m.layer_id}/spag_bytes_rank0"] = m.fssdp_state.bytes_gathered
                m.fssdp_state.bytes_gathered = 0
        return metrics

    def run(self) -> dict[str, float]:
        tc, ctx = self.cfg.trainer, self.ctx
        resumed = self.maybe_resume()
        if resumed is not None and ctx.is_main:
            print(f"resumed from {resumed} at step {self.step}", flush=True)
        tokens_per_step = self.cfg.data.global_batch_size * self.cfg.data.seq_len
        last: dict[str, float] = {}
        if self.step == 0 and tc.eval_every:
            self.loggers.log(0, self.evaluate())  # the starting point of the validation curve
        start_time, start_step = time.perf_counter(), self.step
        while self.step < tc.max_steps:
            t0 = time.perf_counter()
            metrics = self.train_step()
            dt = time.perf_counter() - t0
            log_now = self.step % tc.log_every == 0 or self.step == tc.max_steps
            metrics.update(self._routing_metrics(log_now))
            if self.step == tc.max_steps or (tc.eval_every and self.step % tc.eval_every == 0):
                metrics.update(self.evaluate())  # periodic, and always at the end
            if log_now or "val_loss" in metrics:
                elapsed = time.perf_counter() - start_time
                done = self.step - start_step
                metrics.update(lr=self.scheduler.get_last_lr()[0], tokens_per_s=tokens_per_step / dt,
                               step_time_s=dt, eta_s=elapsed / max(done, 1) * (tc.max_steps - self.step))
                self.loggers.log(self.step, metrics)
            last = metrics
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.max_steps:
                self.save()
        if start_step < tc.max_steps or not ckpt.find_latest(self.ckpt_dir):
            self.save()
        self.loggers.close()
        if ctx.is_main:
            summary = {k: v for k, v in last.items() if isinstance(v, (int, float))}
            (self.run_dir / "summary.json").write_text(json.dumps({"step": self.step, **summary}, indent=1))
        return last
