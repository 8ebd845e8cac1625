"""Kill a worker, let torchrun restart the workers, again and again: does training come back on the same loss curve?

    python bench/kill_recover.py [--cycles 10] [--steps 120] [--checkpoint-every 10] [--max-restarts 3]
                                 [--timeout-s 60] [--signal KILL|STOP] [--seed 0] [--work-dir DIR]

First one uninterrupted reference run, then per cycle a fresh run of the same training, launched the way users do:

    torchrun --standalone --nproc_per_node=2 --max-restarts=3 -m moetrain.train ... \\
        trainer.checkpoint_every=10 trainer.resume=auto

(a tiny model on the embedded corpus, gloo on loopback). Once a checkpoint exists the bench waits until training
reaches a random later step, SIGKILLs one worker rank chosen at random and lets torchrun restart the workers, which
resume from the latest checkpoint and finish. A cycle recovers when torchrun exits 0 after exactly one restart and,
for every step after the resume, the last loss metrics.jsonl holds for that step (should a replayed step appear
twice) equals the reference's within 1e-5. Recovery time: from the signal to the first step the restarted workers
log. Prints one line per cycle, then recoveries out of attempts and the recovery times.

`--signal STOP` freezes the worker instead (SIGSTOP): the other worker's collective times out after --timeout-s,
it prints the line naming the frozen rank and exits, then torchrun stops the frozen one (SIGTERM, which a stopped
process cannot act on, then SIGKILL after torchrun's 30 s grace) and restarts both. Such a cycle also needs that
line in torchrun's output, and reports the time from the SIGSTOP to the other worker's exit.

Every process the bench starts runs in its own session and is killed when its cycle ends, whatever happened.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5

TINY = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=64",
    "model.num_experts=4", "model.moe_hidden=32", "model.first_k_dense=0", "router.top_k=2",
    "data.seq_len=32", "data.global_batch_size=8", "data.micro_batch_size=2", "data.max_corpus_bytes=300000",
    "optim.warmup_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
    "trainer.progress=false", "logger.console=false",
]


@dataclass
class Setup:
    """What every run of one bench shares."""

    cache_dir: Path
    steps: int = 120
    checkpoint_every: int = 10
    max_restarts: int = 3
    timeout_s: float = 60.0  # parallel.timeout_s
    deadline_s: float = 300.0  # a run still going after this long counts as hung

    def overrides(self, run_dir: Path) -> list[str]:
        return TINY + [f"trainer.run_dir={run_dir}", f"data.cache_dir={self.cache_dir}",
                       f"trainer.max_steps={self.steps}", f"trainer.checkpoint_every={self.checkpoint_every}",
                       "trainer.keep_checkpoints=2", "trainer.resume=auto", f"parallel.timeout_s={self.timeout_s:g}"]


@dataclass
class Cycle:
    signal: str = "KILL"
    killed_rank: int = -1
    kill_step: int = -1
    resume_step: int = -1
    other_exit_s: float = float("nan")  # from the signal until the other worker exited
    recovery_s: float = float("nan")
    restarts: int = 0
    returncode: int | None = None
    mismatched_steps: list[int] = field(default_factory=list)
    max_diff: float = float("nan")
    note: str = ""

    @property
    def recovered(self) -> bool:
        return self.returncode == 0 and self.restarts == 1 and not self.mismatched_steps and not self.note

    def describe(self) -> str:
        head = (f"SIG{self.signal} to rank {self.killed_rank} at step {self.kill_step}, other rank exited after "
                f"{self.other_exit_s:.1f} s -> resumed at step {self.resume_step}, recovered in {self.recovery_s:.1f} s, "
                f"torchrun exit {self.returncode}, {self.restarts} restart(s)")
        if self.recovered:
            return f"{head}: ok (every step after the resume matches, max |diff| {self.max_diff:.1e})"
        why = self.note or (f"{len(self.mismatched_steps)} steps off the reference, first {self.mismatched_steps[:5]}"
                            if self.mismatched_steps else "unexpected exit or restart count")
        return f"{head}: FAILED ({why})"


# ---------------------------------------------------------------------------------------------------- processes


def launch(setup: Setup, run_dir: Path, log_path: Path, max_restarts: int) -> subprocess.Popen:
    """torchrun with two workers in a session of its own (so that everything it starts can be killed at once)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={max_restarts}", "-m", "moetrain.train", *setup.overrides(run_dir)]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def stop(proc: subprocess.Popen, known_workers: Iterable[int] = ()) -> None:
    """Kill torchrun and every worker it started, and reap torchrun. torchrun starts each worker in a session of its
    own, so killing torchrun's session is not enough: the agent is frozen first (no new workers), then its workers
    (and `known_workers`, should some have been orphaned) are killed with their sessions, then the agent's session."""
    running = proc.poll() is None  # until we reap it, torchrun's pid stays ours even if it exits meanwhile
    if running:
        _signal_group(proc.pid, signal.SIGSTOP)
    for pid in set(known_workers) | ({pid for pid, _ in workers(proc.pid).values()} if running else set()):
        if _is_worker(pid):
            _signal_group(pid, signal.SIGKILL)
    if running:
        _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _is_worker(pid: int) -> bool:
    """Whether `pid` is (still) a moetrain worker, not a recycled pid."""
    try:
        return b"moetrain.train" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def workers(agent_pid: int) -> dict[int, tuple[int, int]]:
    """{global rank: (pid, restart count)} of the agent's live worker processes (zombies excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) != agent_pid or state == "Z":
                continue
            env = dict(kv.split(b"=", 1) for kv in (entry / "environ").read_bytes().split(b"\0") if b"=" in kv)
            found[int(env[b"RANK"])] = (int(entry.name), int(env[b"TORCHELASTIC_RESTART_COUNT"]))
        except (OSError, ValueError, KeyError):  # the process ended while we looked, or is no worker
            continue
    return found


# ------------------------------------------------------------------------------------------------------ metrics


def metric_rows(path: Path) -> list[dict]:
    """The complete JSON lines of metrics.jsonl (a line still being written is left out)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in data.split(b"\n")[:-1] if line.strip()]


def _first_new_row(before: list[dict], now: list[dict]) -> dict | None:
    """The first row of `now` that `before` (the file when the restarted workers appeared) does not hold at the same
    place. A resumed run first drops the rows after its checkpoint, then logs the replayed steps again; a replayed
    row differs from the old one at least in its timings."""
    for i, row in enumerate(now):
        if i >= len(before) or row != before[i]:
            return row
    return None


def last_losses(run_dir: Path) -> dict[int, float]:
    """The last loss logged for each step."""
    return {row["step"]: row["loss"] for row in metric_rows(run_dir / "metrics.jsonl") if "loss" in row}


def reference(setup: Setup, run_dir: Path) -> dict[int, float]:
    """Losses of one uninterrupted run of the same training."""
    proc = launch(setup, run_dir, run_dir.with_suffix(".log"), max_restarts=0)
    try:
        returncode = proc.wait(timeout=setup.deadline_s)
    finally:
        stop(proc)
    ref = last_losses(run_dir)
    if returncode != 0 or sorted(ref) != list(range(1, setup.steps + 1)):
        raise RuntimeError(f"the reference run failed (exit {returncode}); see {run_dir.with_suffix('.log')}")
    return ref


# ------------------------------------------------------------------------------------------------------- cycles


def _wait(condition, deadline: float, what: str, poll_s: float = 0.05):
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(poll_s)


def kill_cycle(setup: Setup, run_dir: Path, ref: dict[int, float], rng: random.Random,
               sig: signal.Signals = signal.SIGKILL) -> Cycle:
    """One run: `sig` to a random worker at a random step after the first checkpoint; torchrun restarts; compare."""
    metrics, latest = run_dir / "metrics.jsonl", run_dir / "checkpoints" / "latest"
    cycle, seen = Cycle(signal=sig.name[3:]), set()
    proc = launch(setup, run_dir, run_dir.with_suffix(".log"), setup.max_restarts)
    deadline = time.monotonic() + setup.deadline_s
    try:
        target = rng.randint(setup.checkpoint_every + 1, setup.steps - setup.checkpoint_every)
        _wait(lambda: latest.is_file() and max(last_losses(run_dir), default=0) >= target, deadline,
              f"training never reached step {target}")
        old = workers(proc.pid)
        seen = {pid for pid, _ in old.values()}
        cycle.killed_rank = rng.randrange(len(old))
        cycle.kill_step = max(last_losses(run_dir))
        other = old[1 - cycle.killed_rank][0]
        os.kill(old[cycle.killed_rank][0], sig)
        killed_at = time.monotonic()

        def restarted() -> bool:  # also notes every worker pid, to kill whatever is left at the end
            if cycle.other_exit_s != cycle.other_exit_s and not alive(other):  # still nan: first seen gone
                cycle.other_exit_s = time.monotonic() - killed_at
            now = workers(proc.pid).values()
            seen.update(pid for pid, _ in now)
            cycle.restarts = max([cycle.restarts, *(attempt for _, attempt in now)])
            return cycle.restarts > 0

        # The agent stops every old worker before it starts new ones: nothing of the old attempt writes after this.
        _wait(restarted, deadline, "torchrun never restarted the workers")
        before = metric_rows(metrics)
        first = _wait(lambda: _first_new_row(before, metric_rows(metrics)), deadline,
                      "the restarted workers never logged a step")
        cycle.recovery_s = time.monotonic() - killed_at
        cycle.resume_step = first["step"] - 1
        while proc.poll() is None:  # watch for further restarts until torchrun ends
            if time.monotonic() > deadline:
                raise TimeoutError("torchrun never finished")
            restarted()
            time.sleep(0.1)
        cycle.returncode = proc.returncode
        named = f"moetrain-train: error: rank {cycle.killed_rank} stopped answering"
        if sig == signal.SIGSTOP and named not in run_dir.with_suffix(".log").read_text(errors="replace"):
            cycle.note = "the frozen rank was not named"
    except TimeoutError as e:
        cycle.note = f"hung: {e} within {setup.deadline_s:g} s"
    finally:
        stop(proc, seen)

    final = last_losses(run_dir)
    after = range(max(cycle.resume_step, 0) + 1, setup.steps + 1)
    cycle.mismatched_steps = [s for s in after if s not in final or abs(final[s] - ref[s]) > TOLERANCE]
    diffs = [abs(final[s] - ref[s]) for s in after if s in final]
    cycle.max_diff = max(diffs, default=float("nan"))
    return cycle


def run_cycles(setup: Setup, work_dir: Path, cycles: int, seed: int = 0, sig: signal.Signals = signal.SIGKILL,
               out=print) -> list[Cycle]:
    """The reference run, then `cycles` signal-and-recover cycles; prints a line per cycle and a summary."""
    rng = random.Random(seed)
    ref = reference(setup, work_dir / "reference")
    results = []
    for i in range(cycles):
        cycle = kill_cycle(setup, work_dir / f"cycle{i:02d}", ref, rng, sig)
        results.append(cycle)
        out(f"cycle {i + 1}/{cycles}: {cycle.describe()}")
    ok = [c for c in results if c.recovered]
    out(f"recovered {len(ok)}/{cycles}")
    for what, values in (("recovery time (signal to the first step logged after the restart)",
                          [c.recovery_s for c in ok]),
                         ("other rank's exit (signal to its exit)", [c.other_exit_s for c in ok])):
        if values:
            out(f"{what}: median {statistics.median(values):.1f} s, min {min(values):.1f} s, max {max(values):.1f} s;"
                f" per cycle: {', '.join(f'{t:.1f}' for t in values)}")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--max-restarts", type=int, default=3)
    ap.add_argument("--timeout-s", type=float, default=60.0, help="parallel.timeout_s of the runs")
    ap.add_argument("--signal", choices=("KILL", "STOP"), default="KILL", help="SIGKILL (dead) or SIGSTOP (frozen)")
    ap.add_argument("--seed", type=int, default=0, help="picks the kill steps and ranks")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep run directories and logs here (default: temp)")
    args = ap.parse_args()
    if args.steps < 2 * args.checkpoint_every + 1:
        ap.error("--steps must exceed twice --checkpoint-every: the kill falls between the first checkpoint and the end")
    with tempfile.TemporaryDirectory(prefix="kill_recover_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        setup = Setup(cache_dir=work_dir / "corpus-cache", steps=args.steps, checkpoint_every=args.checkpoint_every,
                      max_restarts=args.max_restarts, timeout_s=args.timeout_s)
        results = run_cycles(setup, work_dir, args.cycles, args.seed, signal.Signals[f"SIG{args.signal}"])
    return 0 if all(c.recovered for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
