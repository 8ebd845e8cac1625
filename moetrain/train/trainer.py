"""The training loop: micro-batches with gradient accumulation, gradient sync, clipping, bias update, optimizer step,
periodic evaluation, logging and checkpoints.

Legend: B micro-batch, S sequence, V vocabulary.

One optimizer step s (0-based; `step` in logs and checkpoints counts completed steps):
    for m in micro-batches:  loss_m = CE(model(x_BS), y_BS) + router losses;  (loss_m / accum).backward()
    sync gradients (dense over the world, experts over their expert-data-parallel group)  [DDP mode; under FSDP
        the backward reduce-scatters what FSDP shards, and only the experts it ignores are synchronised here]
    clip the global norm; update router biases from this step's global token counts; AdamW step; LR schedule step
The logged `loss` is the language-model loss averaged over all micro-batches and ranks (the router losses are logged
separately as `aux_loss`).

Guards, all decided from values every rank already shares after the step's collectives (no extra sync):
  * non-finite step: the loss mean over ranks or the global gradient norm is NaN/inf -> the optimizer step and the
    bias update are skipped (the step counter and LR schedule advance, the batch is consumed), `skipped_steps` counts
    it, no checkpoint is written until a healthy step; `trainer.max_bad_steps` in a row end the run (TrainingDiverged);
  * preemption: SIGTERM on any rank sets a flag that travels with the loss all-reduce; every rank finishes the
    current step, writes a checkpoint and returns normally.
On resume, the command line's optimizer settings win over the checkpoint's (the moments are kept), metrics.jsonl
drops what a crashed attempt logged after the checkpoint, and per-layer run-time state (the pipeline tuner's choice,
FSSDP owners and load window) is restored before the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import OmegaConf

from moetrain.balance.controller import BalanceController
from moetrain.config.compose import run_config_yaml
from moetrain.config.schema import TrainConfig
from moetrain.data.loader import build_loader
from moetrain.model.transformer import TransformerLM
from moetrain.parallel.grad_sync import clip_grad_norm_, sync_gradients
from moetrain.parallel.mesh import ParallelContext
from moetrain.parallel.moe_layer import moe_layer_factory
from moetrain.telemetry.loggers import build_loggers
from moetrain.telemetry.progress import Progress
from moetrain.telemetry.routing_stats import RoutingWindow, layer_metrics
from moetrain.train import checkpoint as ckpt
from moetrain.train.optim import build_optimizer, build_scheduler, set_hyperparameters
from moetrain.train.precision import precision_context, resolve_precision


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm was not finite for `trainer.max_bad_steps` consecutive steps."""


class Trainer:
    def __init__(self, cfg: TrainConfig, ctx: ParallelContext):
        self.cfg, self.ctx = cfg, ctx
        tc = cfg.trainer
        self.run_dir = Path(tc.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # a primary config: `moetrain-train -cd RUN_DIR -cn config [OVERRIDE ...]` continues this run's settings
            (self.run_dir / "config.yaml").write_text(run_config_yaml(cfg))

        fssdp = cfg.parallel.fssdp if cfg.parallel.mode == "fssdp" else None
        moe_layer = moe_layer_factory(cfg.router, ctx.ep_group, ctx.world_group, fssdp, cfg.parallel.pipeline_degree,
                                      cfg.parallel.pipeline_split)
        self.model = TransformerLM(cfg.model, cfg.router, moe_layer, tc.activation_checkpointing).to(ctx.device)
        self.model.init_weights(tc.seed)
        self.fsdp = cfg.parallel.data_parallel == "fsdp" and ctx.is_distributed
        if self.fsdp:
            from moetrain.parallel.fsdp import apply_fsdp

            apply_fsdp(self.model, ctx, cfg.parallel.dp_replicate, fssdp=fssdp is not None,
                       param_dtype=resolve_precision(cfg, ctx.device))
        self.optimizer = build_optimizer(self.model, cfg.optim, ctx.device)
        if self.fsdp:
            from moetrain.parallel.fsdp import fit_optimizer

            fit_optimizer(self.optimizer)  # plain experts next to DTensors: per-tensor AdamW
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.max_steps)
        self.loader = build_loader(cfg.data, tc.seed, ctx.rank, ctx.world_size)
        self.balance = BalanceController(self.model, cfg.router, tc.max_steps, ctx)
        self.window = RoutingWindow()
        self.autocast = precision_context(cfg, ctx.device)  # parallel.mixed_precision (moetrain/train/precision.py)
        self.loggers = None  # built in run(), once the step training starts from is known
        self.progress: Optional[Progress] = None  # the terminal's progress bar (trainer.progress), built in run()
        self.step = 0
        self.bad_streak, self.skipped_steps = 0, 0  # non-finite steps: in a row now, and in the whole run
        self._preempt_requested = False  # set by the SIGTERM handler; agreed on by all ranks each step
        self.preempted = False

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _extra_state(self) -> dict[str, torch.Tensor]:
        extra = {"step": torch.tensor([self.step], dtype=torch.int64), "rng_cpu": torch.get_rng_state()}
        if self.ctx.device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state(self.ctx.device)
        return extra

    def _trainer_state(self) -> dict:
        return {"optim": dataclasses.asdict(self.cfg.optim), "max_steps": self.cfg.trainer.max_steps,
                "skipped_steps": self.skipped_steps,
                "layers": {str(m.layer_id): m.trainer_state() for m in self.balance.layers}}

    def save(self) -> Optional[Path]:
        """Write a checkpoint of the current step, unless the last step was not finite (the newest checkpoint then
        stays the newest healthy one)."""
        if self.bad_streak or not self._weights_finite():
            self._say(f"step {self.step}: not writing a checkpoint after a non-finite step; the newest checkpoint "
                      "is still the last healthy one")
            return None
        return ckpt.save_checkpoint(self.ckpt_dir, self.step, self.model, self.optimizer, self.scheduler,
                                    extra=self._extra_state(), keep=self.cfg.trainer.keep_checkpoints,
                                    trainer_state=self._trainer_state())

    @torch.no_grad()
    def _weights_finite(self) -> bool:
        """Whether every rank's parameters are finite (a healthy step can still overflow in the update)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        ok = torch.stack([torch.isfinite(p).all() for p in local]).all().float().reshape(1).to(self.ctx.device)
        if self.ctx.is_distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.ctx.world_group)
        return bool(ok.item() > 0)

    def maybe_resume(self) -> Optional[Path]:
        resume = self.cfg.trainer.resume
        if resume == "none":
            return None
        path = ckpt.find_latest_valid(self.ckpt_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        state = ckpt.read_trainer_state(path)
        if state.get("weights_only"):  # written by a converter (moetrain/interop/run_dir.py): no optimizer state
            extra = {"step": torch.zeros(1, dtype=torch.int64)}
            ckpt.load_checkpoint(path, self.model, extra=extra, verify=resume != "auto")
            self.step = int(extra["step"].item())
            self._say(f"starting from the weights of {path} at step {self.step} with a fresh optimizer "
                      "(the checkpoint holds no optimizer state)")
            self.scheduler.last_epoch = self.step  # the schedule continues from the checkpoint's step
            set_hyperparameters(self.optimizer, self.scheduler, self.cfg.optim)
            return path
        rederived = []
        for m in self.balance.layers:  # owners first: the expert rows below load by the ids they define
            rederived += m.load_trainer_state(state.get("layers", {}).get(str(m.layer_id), {}))
        if rederived:
            self._say(f"resume: re-deriving {', '.join(rederived)} (saved under another layout)")
        extra = self._extra_state()
        # resume=auto's search has just verified the checksums; an explicit path is verified while loading
        ckpt.load_checkpoint(path, self.model, self.optimizer, self.scheduler, extra=extra, verify=resume != "auto")
        self.step = int(extra["step"].item())
        self.skipped_steps = int(state.get("skipped_steps", 0))
        torch.set_rng_state(extra["rng_cpu"])
        if "rng_cuda" in extra:
            torch.cuda.set_rng_state(extra["rng_cuda"], self.ctx.device)
        self._apply_config_hyperparameters(state)
        return path

    def _apply_config_hyperparameters(self, state: dict) -> None:
        """After a resume the command line wins: the optimizer keeps the checkpoint's moments but takes lr, betas,
        eps and weight decay from the config, and the LR schedule is re-evaluated at the resumed step with the
        config's lr, warm-up, schedule and max_steps. One line lists what changed."""
        o, saved = self.cfg.optim, self.optimizer.param_groups[0]  # the checkpoint's values, just loaded
        changes = [f"{label} {_fmt(saved[key])} -> {_fmt(now)}" for key, label, now in (
            ("initial_lr", "optim.lr", o.lr), ("betas", "optim.beta1/beta2", (o.beta1, o.beta2)),
            ("eps", "optim.eps", o.eps), ("weight_decay", "optim.weight_decay", o.weight_decay))
            if key in saved and _differs(saved[key], now)]
        saved_optim = state.get("optim", {})
        changes += [f"optim.{key} {_fmt(saved_optim[key])} -> {_fmt(getattr(o, key))}"
                    for key in ("warmup_steps", "schedule", "min_lr_ratio")
                    if key in saved_optim and _differs(saved_optim[key], getattr(o, key))]
        if "max_steps" in state and state["max_steps"] != self.cfg.trainer.max_steps:
            changes.append(f"trainer.max_steps {state['max_steps']} -> {self.cfg.trainer.max_steps}")
        set_hyperparameters(self.optimizer, self.scheduler, o)
        if changes:
            self._say("resume: the command line overrides the checkpoint's " + ", ".join(changes)
                      + " (optimizer moments kept)")

    def _say(self, message: str) -> None:
        if self.ctx.is_main:
            print(f"moetrain: {message}", file=sys.stderr, flush=True)

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
            with self.autocast:
                logits_BSV, records = model(inputs_BS, return_records=True)
                lm_loss = F.cross_entropy(logits_BSV.flatten(0, 1), targets_BS.flatten())
            self.balance.observe(records)
            router_losses = [r.loss for r in records if r.loss is not None]
            loss = lm_loss + sum(router_losses) if router_losses else lm_loss
            t2 = self._now()
            (loss / accum).backward()
            t3 = self._now()
            times["data"] += t1 - t0
            times["forward"] += t2 - t1
            times["backward"] += t3 - t2
            lm_total += lm_loss.item()
            for record in records:
                for name, term in record.losses.items():
                    aux_totals[name] = aux_totals.get(name, 0.0) + term.item()
        t0 = self._now()
        sync_gradients(model, self.ctx)  # under FSDP only what it ignores (experts it does not shard)
        grad_norm = float(self._clip())  # global: the same value on every rank
        # One all-reduce carries the losses and the preemption flag; a NaN/inf on any rank makes the mean non-finite.
        names = sorted(aux_totals)
        reduced = self._mean_over_ranks([lm_total / accum] + [aux_totals[n] / accum for n in names]
                                        + [float(self._preempt_requested)])
        self.preempted = reduced.pop() > 0
        healthy = all(math.isfinite(v) for v in reduced) and math.isfinite(grad_norm)
        t1 = self._now()
        self.counts_NE = self.balance.step(self.step, update_bias=healthy)
        if healthy:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._count_health(healthy, reduced[0], grad_norm)
        self.step_degrees = [layer.degree for layer in self.balance.layers]  # the degrees this step ran with
        for layer, counts_E in zip(self.balance.layers, self.counts_NE):
            layer.after_step(self.step, counts_E, self.optimizer)  # degree tuning; FSSDP placement and re-sharding
        times["grad_sync"], times["optimizer"] = t1 - t0, self._now() - t1
        metrics = {"loss": reduced[0], "aux_loss": sum(reduced[1:]), "grad_norm": grad_norm,
                   "skipped_steps": self.skipped_steps}
        metrics.update({f"aux/{n}": v for n, v in zip(names, reduced[1:])})
        metrics.update({f"time/{k}_s": v for k, v in times.items()})
        return metrics

    def _count_health(self, healthy: bool, loss: float, grad_norm: float) -> None:
        if healthy:
            self.bad_streak = 0
            return
        self.bad_streak += 1
        self.skipped_steps += 1
        bad = [f"{name} {value}" for name, value in (("loss", loss), ("gradient norm", grad_norm))
               if not math.isfinite(value)] or ["router loss"]
        self._say(f"step {self.step}: non-finite {' and '.join(bad)}: optimizer step skipped "
                  f"({self.bad_streak} in a row of trainer.max_bad_steps={self.cfg.trainer.max_bad_steps})")

    def _stop_if_diverged(self) -> None:
        limit = self.cfg.trainer.max_bad_steps
        if self.bad_streak >= limit:
            latest = ckpt.find_latest(self.ckpt_dir)
            raise TrainingDiverged(
                f"training diverged: loss or gradient norm not finite for {limit} steps in a row (steps "
                f"{self.step - limit + 1}-{self.step}); the newest healthy checkpoint is "
                f"{latest if latest is not None else 'none (none was written)'}; lower optim.lr, raise optim.warmup_steps "
                f"or check model.init_std and the data")

    def _clip(self) -> torch.Tensor:
        return clip_grad_norm_(self.model, self.cfg.optim.grad_clip, self.ctx)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over the validation set (`trainer.eval_batches` global batches, the same windows for any
        layout); {} when trainer.eval_batches=0."""
        if self.cfg.trainer.eval_batches == 0:
            return {}
        self.model.eval()
        total, n = 0.0, 0
        with self.autocast:
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
            metrics[f"moe/layer{m.layer_id}/experts_per_token"] = compute["experts_per_token"][i]
            metrics[f"moe/layer{m.layer_id}/flops_per_token"] = m.flops_per_token(compute["experts_per_token"][i])
            metrics[f"moe/layer{m.layer_id}/pipeline_degree"] = self.step_degrees[i]
        metrics.update(self.window.summary())
        for m in self.balance.layers:
            metrics.update(m.step_metrics())
        return metrics

    def run(self) -> dict[str, float]:
        """Train to trainer.max_steps (or until preempted by SIGTERM: the current step finishes, a checkpoint is
        written and run returns normally with `self.preempted` set)."""
        previous = self._catch_sigterm()
        try:
            return self._run()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if self.progress is not None:
                self.progress.close()
            if self.loggers is not None:
                self.loggers.close()

    def _catch_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            return None  # signal handlers can only be installed from the main thread

        def request_stop(signum, frame):
            self._preempt_requested = True

        return signal.signal(signal.SIGTERM, request_stop)

    def _run(self) -> dict[str, float]:
        tc, ctx = self.cfg.trainer, self.ctx
        resumed = self.maybe_resume()
        if resumed is not None and ctx.is_main:
            print(f"resumed from {resumed} at step {self.step}", flush=True)
        self.loggers = build_loggers(self.cfg.logger, self.run_dir, ctx.rank,
                                     OmegaConf.to_container(OmegaConf.structured(self.cfg)), start_step=self.step)
        self.progress = Progress(tc.max_steps, self.step, enabled=tc.progress and ctx.is_main)
        tokens_per_step = self.cfg.data.global_batch_size * self.cfg.data.seq_len
        last: dict[str, float] = {}
        if self.step == 0 and tc.eval_every and tc.eval_batches:
            self.loggers.log(0, self.evaluate())  # the starting point of the validation curve
        start_time, start_step = _clock(), self.step
        # Throughput window: the steps since the previous log line and their wall time, validation excluded.
        window_start, window_steps, window_eval_s = start_time, 0, 0.0
        while self.step < tc.max_steps:
            metrics = self.train_step()
            window_steps += 1
            log_now = self.step % tc.log_every == 0 or self.step == tc.max_steps
            metrics.update(self._routing_metrics(log_now))
            if self.step == tc.max_steps or (tc.eval_every and self.step % tc.eval_every == 0):
                t_eval = _clock()
                metrics.update(self.evaluate())  # periodic, and always at the end
                window_eval_s += _clock() - t_eval
            if log_now or "val_loss" in metrics:
                now = _clock()
                elapsed, done = now - start_time, self.step - start_step
                step_time = max(now - window_start - window_eval_s, 1e-12) / window_steps
                metrics.update(lr=self.scheduler.get_last_lr()[0], tokens_per_s=tokens_per_step / step_time,
                               step_time_s=step_time, eta_s=elapsed / max(done, 1) * (tc.max_steps - self.step))
                self.loggers.log(self.step, metrics)
                window_start, window_steps, window_eval_s = now, 0, 0.0
            last = metrics
            self.progress.update(self.step, metrics)
            self._stop_if_diverged()
            if self.preempted:
                saved = self.save()
                self._say(f"SIGTERM: stopped after step {self.step}"
                          + (f", checkpoint {saved}" if saved else "") + "; resume with trainer.resume=auto")
                return last
            if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.max_steps:
                self.save()
        if start_step < tc.max_steps or not ckpt.find_latest(self.ckpt_dir):
            self.save()
        if ctx.is_main:
            summary = {k: v for k, v in last.items() if isinstance(v, (int, float))}
            (self.run_dir / "summary.json").write_text(json.dumps({"step": self.step, **summary}, indent=1))
        return last


_clock = time.perf_counter  # the wall clock of `_run`'s throughput metrics (a test may replace it)


def _differs(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) != list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return not math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a != b


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)
