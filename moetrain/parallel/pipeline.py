"""Adaptive pipelining degree: how many chunks a layer's all-to-all is split into, chosen from measurements.

Legend: n pipeline degree (chunks), L experts computed on a rank.

With n chunks the dispatch all-to-all of chunk i+1 is in flight while the experts compute chunk i, and the combine of
chunk i while chunk i+1 computes (Tutel arXiv 2206.03382, FSMoE arXiv 2501.10714). More chunks hide more
communication but pay more per-collective latency and smaller GEMMs, so the best n depends on the interconnect, the
shapes and the routing. Tutel's paper picks n at run time and its public code does not; we do, per layer:

  * trial phase: each candidate n in {1, 2, 4, 8} (at most L) runs for `trial_steps` consecutive optimizer steps
    (so every micro-batch of a step, and any activation recomputation in its backward, uses one degree); for every
    training micro-batch the layer's forward (from `plan` to the end of `combine_postprocess`) plus its backward
    (from the gradient reaching the combine output to the end of the backward of `dispatch_preprocess`) is recorded.
    The first step of each candidate's block is a warm-up and not recorded (new chunk shapes, first allocations)
    unless `trial_steps` is 1. Timing the forward alone misleads: the backward gains much less from more chunks than
    the forward does (measured: n=8 looked 1.6-1.75x faster than n=1 in forward time, but was 1.07-1.10x over
    forward + backward, where n=4 gave 1.16-1.21x), so forward-only timing kept choosing the largest n;
  * decision: each candidate's median time (robust to a step slowed by other load) is all-reduced with MAX over the
    group (the slowest rank is what the step waits for), so every rank sees the same figures. Candidates within
    `close` (8%) of the best are measured again, in another round of blocks, up to `extra_rounds` times (noise of a
    few percent would otherwise decide between them); then every rank picks the same argmin of the medians over all
    rounds;
  * activation checkpointing: a forward recomputed inside backward is not timed as a forward (it would be counted
    twice), but the recomputation that the region's backward triggers lies inside the backward interval and is
    counted there. For the MoE part that is a real cost of the degree (the recomputed forward dispatches and
    combines again, with the same n); under `full` checkpointing the block's attention is recomputed in the same
    interval, which adds the same time to every candidate and so does not change the argmin;
  * re-tuning: when the tokens per micro-batch change, or the global expert load drifts from the distribution seen at
    decision time by more than `retune_drift` in total-variation distance, the trial phase starts again.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

CANDIDATES = (1, 2, 4, 8)


def chunk_of_slot(slot, num_chunks: int, num_slots):
    """The chunk that carries a rank's expert slot s (its position among the M experts the rank computes, in id
    order): s * n // M, so every chunk holds a contiguous range of about M/n experts. Works on ints and tensors."""
    return slot * num_chunks // num_slots


def chunk_slot_range(chunk: int, num_chunks: int, num_slots: int) -> tuple[int, int]:
    """[lo, hi): the slots s with s * n // M == chunk (the inverse of `chunk_of_slot`)."""
    return -(-chunk * num_slots // num_chunks), -(-(chunk + 1) * num_slots // num_chunks)


class DegreeTuner:
    def __init__(self, max_degree: int, group: Optional[dist.ProcessGroup], trial_steps: int = 2,
                 retune_drift: float = 0.25, candidates: Sequence[int] = CANDIDATES, close: float = 0.08,
                 extra_rounds: int = 3):
        self.candidates = [n for n in candidates if n <= max(1, max_degree)] or [1]
        self.group, self.trial_steps, self.retune_drift = group, trial_steps, retune_drift
        self.close, self.extra_rounds = close, extra_rounds
        self.chosen: Optional[int] = None
        self.decisions = 0  # how many times a degree was chosen (1 + re-tunings)
        self._start_trials()
        self._num_tokens: Optional[int] = None
        self._load_at_decision: Optional[torch.Tensor] = None

    def _start_trials(self) -> None:
        self.chosen = None
        self._active = list(self.candidates)  # the candidates of the current round, in order
        self._trial_index, self._steps_in_trial, self._rounds = 0, 0, 0  # position in the round; extra rounds done
        self._times: dict[int, list[float]] = {n: [] for n in self.candidates}  # forward + backward per micro-batch
        # (forward, backward) seconds of the same records, for inspection (not part of the checkpointed state).
        self.components: dict[int, list[tuple[float, float]]] = {n: [] for n in self.candidates}
        self._shape_changed = False

    @property
    def degree(self) -> int:
        """The degree to use for every forward of the current step."""
        return self.chosen if self.chosen is not None else self._active[self._trial_index]

    def record(self, seconds: float, num_tokens: int, backward_seconds: float = 0.0) -> None:
        """A training micro-batch of this layer took `seconds` in forward and `backward_seconds` in backward with
        `num_tokens` tokens at the current degree; their sum is what the candidates are compared on (the first step
        of a candidate's block is a warm-up and not kept, unless trial_steps is 1)."""
        if self._num_tokens is not None and num_tokens != self._num_tokens:
            self._shape_changed = True
        self._num_tokens = num_tokens
        if self.chosen is None and (self._steps_in_trial > 0 or self.trial_steps == 1):
            self._times[self.degree].append(seconds + backward_seconds)
            self.components[self.degree].append((seconds, backward_seconds))

    def end_step(self, global_load_E: Optional[torch.Tensor] = None) -> None:
        """Called once per optimizer step on every rank of the group, in the same order. The degree changes only
        here, so all micro-batches of a step (and their recomputation in backward) use the same one."""
        if self._shape_changed and self.chosen is not None:
            self._start_trials()  # the batch shape changed: measure again
            return
        if self.chosen is None:
            self._steps_in_trial += 1
            if self._steps_in_trial < self.trial_steps:
                return
            self._trial_index, self._steps_in_trial = self._trial_index + 1, 0
            if self._trial_index < len(self._active):
                return
            self._trial_index = 0
            medians = self.medians()
            best = float(medians.min())
            close = [n for n, m in zip(self.candidates, medians.tolist()) if m <= best * (1 + self.close)]
            if len(close) > 1 and self._rounds < self.extra_rounds and best < float("inf"):
                self._active, self._rounds = close, self._rounds + 1  # too close to call: measure those again
                return
            self.chosen = self.candidates[int(torch.argmin(medians))]
            self.decisions += 1
            self._load_at_decision = _normalise(global_load_E)
            return
        current = _normalise(global_load_E)
        if current is not None and self._load_at_decision is not None:
            drift = 0.5 * (current - self._load_at_decision).abs().sum().item()
            if drift > self.retune_drift:
                self._start_trials()

    def medians(self) -> torch.Tensor:
        """Per candidate: the median of its recorded times, the MAX over the group (inf when none was recorded).
        A collective when the group has more than one rank."""
        medians = torch.tensor([statistics.median(t) if t else float("inf") for t in self._times.values()],
                               dtype=torch.float64)
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(medians, op=dist.ReduceOp.MAX, group=self.group)
        return medians

    # ------------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict:
        """The tuner's decision and trial progress as JSON-able values, so a resumed run neither re-measures a
        degree it already chose nor restarts a trial phase half-way."""
        return {"candidates": list(self.candidates), "chosen": self.chosen, "decisions": self.decisions,
                "active": list(self._active), "rounds": self._rounds,
                "trial_index": self._trial_index, "steps_in_trial": self._steps_in_trial,
                "times": [self._times[n] for n in self.candidates], "shape_changed": self._shape_changed,
                "num_tokens": self._num_tokens,
                "load_at_decision": None if self._load_at_decision is None else self._load_at_decision.tolist()}

    def load_state_dict(self, state: dict) -> bool:
        """Restore `state_dict()`; returns False (and keeps a fresh trial phase) when it was written for other
        candidate degrees (a different layout) or by a tuner without re-measurement rounds; the degrees then get
        measured again."""
        if list(state.get("candidates", [])) != self.candidates or "active" not in state:
            return False
        self.chosen, self.decisions = state["chosen"], int(state["decisions"])
        self._active, self._rounds = [int(n) for n in state["active"]], int(state["rounds"])
        self._trial_index, self._steps_in_trial = int(state["trial_index"]), int(state["steps_in_trial"])
        self._times = {n: [float(t) for t in times] for n, times in zip(self.candidates, state["times"])}
        self.components = {n: [] for n in self.candidates}
        self._shape_changed, self._num_tokens = bool(state["shape_changed"]), state["num_tokens"]
        load = state["load_at_decision"]
        self._load_at_decision = None if load is None else torch.tensor(load, dtype=torch.float64)
        return True


def _normalise(load_E: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if load_E is None:
        return None
    load = load_E.detach().double().cpu()
    total = load.sum()
    return load / total if total > 0 else None


def clock_start(device: torch.device):
    """A timestamp for the tuner: host time on CPU, a CUDA event on GPU (resolved after the step, no sync here)."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def clock_stop(start):
    if isinstance(start, float):
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def elapsed_s(start, stop) -> float:
    if isinstance(start, float):
        return stop - start
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3


class RegionTiming:
    """The clocks of one timed training micro-batch of a layer's MoE region: forward from `plan` to the end of
    `combine_postprocess`, backward from the gradient reaching the combine output to the end of the backward of
    `dispatch_preprocess` (filled in by the marker Functions below when the backward runs)."""

    __slots__ = ("start", "forward_stop", "backward_start", "backward_stop", "num_tokens")

    def __init__(self, start, num_tokens: int):
        self.start, self.num_tokens = start, num_tokens
        self.forward_stop = self.backward_start = self.backward_stop = None

    def seconds(self) -> tuple[float, float]:
        """(forward, backward). Backward is 0 when it did not run through the whole region (no backward this step,
        or the region's input does not require grad so no gradient reaches its marker): the same for every
        candidate of a layer, so the comparison stays fair."""
        forward = elapsed_s(self.start, self.forward_stop)
        if self.backward_start is None or self.backward_stop is None:
            return forward, 0.0
        return forward, elapsed_s(self.backward_start, self.backward_stop)


class _MarkBackward(torch.autograd.Function):
    """Identity that records, in `timing.<field>`, when its backward runs: on the region's output that is when the
    gradient reaches it (backward_start); on the region's input, once the region's backward has produced that
    input's gradient (backward_stop: autograd runs a node only after all its consumers' gradients are in). A graph
    backpropagated twice (retain_graph) keeps the first time."""

    @staticmethod
    def forward(ctx, x, timing, field):
        ctx.timing, ctx.field = timing, field
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if getattr(ctx.timing, ctx.field) is None:
            setattr(ctx.timing, ctx.field, clock_stop(ctx.timing.start))
        return grad, None, None


def mark_region_input(x: torch.Tensor, timing: Optional[RegionTiming]) -> torch.Tensor:
    """x unchanged; when timed and x takes part in autograd, the end of the region's backward gets recorded."""
    if timing is None or not x.requires_grad:
        return x
    return _MarkBackward.apply(x, timing, "backward_stop")


def mark_region_output(y: torch.Tensor, timing: Optional[RegionTiming]) -> torch.Tensor:
    """y unchanged; when timed, records the end of the forward and (if y takes part in autograd) marks the start of
    the region's backward."""
    if timing is None:
        return y
    timing.forward_stop = clock_stop(timing.start)
    return _MarkBackward.apply(y, timing, "backward_start") if y.requires_grad else y
