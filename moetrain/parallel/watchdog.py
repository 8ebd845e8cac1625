"""Heartbeats, and the one line that names the rank that stopped answering when a collective fails.

Every rank of a distributed run starts a `Heartbeat`: a daemon thread that writes the wall-clock time into the c10d
store (key `moetrain/heartbeat/<rank>`, one `set` every `interval_s` = timeout_s / 4, at most 5 s) until `stop()`.
Under torchrun the store lives in the elastic agent, so it keeps answering when a worker is frozen or dead.

When a collective fails on a rank (gloo raises on the waiting ranks after `parallel.timeout_s`, or at once when a
peer's connection closes), `diagnose` reads the other ranks' heartbeats and returns one line: the ranks whose last
heartbeat is older than `stale_s` (2 intervals + 1 s) are the ones that stopped answering. It waits up to `stale_s`
for a dead peer's heartbeat to go stale, so a crash seen at once is still named. Ages compare wall clocks, which is
exact on one node and as good as the clock sync between nodes.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

KEY = "moetrain/heartbeat/{rank}"
MAX_INTERVAL_S = 5.0
MIN_INTERVAL_S = 0.1
_TORCH_DISTRIBUTED = os.path.join("torch", "distributed", "")
STORE_TIMEOUT_S = 5.0  # a heartbeat write or read that waits longer gives up (the store itself stopped answering)


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeats: a quarter of the collective timeout, between 0.1 and 5 s."""
    return min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, timeout_s / 4))


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a failed or timed-out collective or store operation:
    a DistError, a gloo error, or a RuntimeError raised inside torch.distributed (gloo's follow-up errors, such as
    "Application timeout caused pair closure", name neither gloo nor a type of their own)."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and (
                "gloo" in str(e).lower() or _raised_in_torch_distributed(e))):
            return True
        e = e.__cause__ or e.__context__
    return False


def _raised_in_torch_distributed(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return _TORCH_DISTRIBUTED in os.path.normpath(tb.tb_frame.f_code.co_filename)


def _summary(exc: BaseException) -> str:
    """The first sentence of an error, without gloo's leading `[file.cc:123]` source location."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    return text.split(". ")[0][:200]


def _timed_out(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


class Heartbeat:
    """One rank's heartbeat thread; `diagnose` explains a failed collective from everyone's heartbeats."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = heartbeat_interval(timeout_s)
        self.stale_s = 2 * self.interval_s + 1.0
        self._store = store
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _client(self) -> dist.Store:
        """A connection of our own to the store, so a slow store never holds up the training thread's requests."""
        client = self._store.clone()
        client.set_timeout(timedelta(seconds=STORE_TIMEOUT_S))
        return client

    def start(self) -> "Heartbeat":
        client = self._client()
        key = KEY.format(rank=self.rank)
        client.set(key, repr(time.time()))  # the first beat before training starts

        def beat() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    client.set(key, repr(time.time()))
                except Exception:  # noqa: BLE001 - a store that does not answer now may answer at the next beat
                    pass

        self._thread = threading.Thread(target=beat, name=f"moetrain-heartbeat-{self.rank}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """End the thread (waits at most one interval plus one store timeout)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval_s + STORE_TIMEOUT_S)
            self._thread = None

    def ages(self, client: Optional[dist.Store] = None) -> dict[int, Optional[float]]:
        """Seconds since each other rank's last heartbeat (None: it never sent one)."""
        client = client or self._client()
        now, ages = time.time(), {}
        for rank in range(self.world_size):
            if rank == self.rank:
                continue
            key = KEY.format(rank=rank)
            ages[rank] = now - float(client.get(key).decode()) if client.check([key]) else None
        return ages

    def silent_ranks(self) -> dict[int, Optional[float]]:
        """The other ranks whose heartbeat is older than `stale_s`, with their ages; waits up to `stale_s` for a
        rank that just died to go stale. Raises what the store raises when it does not answer."""
        client = self._client()
        deadline = time.monotonic() + self.stale_s
        while True:
            silent = {r: a for r, a in self.ages(client).items() if a is None or a > self.stale_s}
            if silent or time.monotonic() >= deadline:
                return silent
            time.sleep(min(0.5, self.interval_s))

    def diagnose(self, exc: BaseException) -> str:
        """One line for stderr explaining the failed collective `exc` on this rank."""
        if _timed_out(exc):
            what = f"the collective on rank {self.rank} timed out after parallel.timeout_s={self.timeout_s:g}"
        else:
            what = f"a collective on rank {self.rank} failed ({_summary(exc)})"
        tail = "exiting so the launcher can restart"
        try:
            silent = self.silent_ranks()
        except Exception as e:  # noqa: BLE001 - the store itself is gone or frozen
            return f"{what}; the heartbeats cannot be read ({_summary(e)}), so no rank can be named; {tail}"
        if not silent:
            return (f"{what}, but every rank still sends heartbeats (a rank is alive but stuck, or the ranks ran "
                    f"different collectives); {tail}")
        ranks = sorted(silent)
        ages = ", ".join("ever" if silent[r] is None else f"for {silent[r]:.0f} s" for r in ranks)
        who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
        return f"{who} stopped answering (no heartbeat {ages}; frozen or dead); {what}; {tail}"
