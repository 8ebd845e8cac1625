"""Ranks that die or freeze: restarts meet under a fresh store prefix, every group has the collective timeout, a
SIGKILLed worker is recovered by torchrun on the uninterrupted loss curve, and a SIGSTOPped worker is named by the
rank that waited for it, which then exits.

The torchrun tests start every process in a session of their own and kill whatever is left in a finally block.
"""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from bench.kill_recover import Setup, alive, kill_cycle, reference, stop, workers
from moetrain.parallel.mesh import ATTEMPT_KEY, attempt_store, group_timeout, init_parallel
from moetrain.parallel.watchdog import Heartbeat, heartbeat_interval, is_collective_failure
from tests.distributed import free_port, run_distributed
from tests.train_utils import overrides


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


# ------------------------------------------------------------------------------------------- store prefix per attempt


def test_a_token_left_by_a_dead_attempt_is_not_taken(monkeypatch):
    """The agent's store still holds the previous attempt's token; rank 1 must wait for the live one of rank 0."""
    port = free_port()
    agent_store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    agent_store.set(ATTEMPT_KEY, f"{free_port()} deadbeefdeadbeef")  # nobody listens on that port any more
    got = {}
    rank1 = threading.Thread(target=lambda: got.update(store=attempt_store(1, timedelta(seconds=30))[0]))
    rank1.start()
    time.sleep(1.0)  # rank 1 reads the stale token first
    assert rank1.is_alive()
    store0, probe = attempt_store(0, timedelta(seconds=30))
    rank1.join(30)
    probe.close()
    assert not rank1.is_alive()
    store0.set("hello", "from rank 0")
    assert got["store"].get("hello") == b"from rank 0"  # both ranks use the same, new prefix
    assert not dist.PrefixStore("moetrain/deadbeefdeadbeef/", agent_store).check(["hello"])


# ------------------------------------------------------------------------------------------------- group timeouts


def _timeouts(rank, world_size, ep):
    ctx = init_parallel(ep, "cpu", "gloo", timeout_s=7.0)
    return [group_timeout(g).total_seconds() for g in (ctx.world_group, ctx.ep_group, ctx.edp_group)]


def test_every_group_gets_the_collective_timeout():
    # ep=2 on 2 ranks: the ep dim is the world group, the dp dim singleton subgroups made by new_group, which torch
    # would give its 30-minute default.
    assert run_distributed(_timeouts, 2, 2) == [[7.0, 7.0, 7.0]] * 2


# ------------------------------------------------------------------------------------------------------ watchdog


def test_heartbeats_name_the_rank_that_never_answered():
    store = dist.HashStore()
    beats = [Heartbeat(store, rank, 3, timeout_s=0.4) for rank in range(3)]
    beats[0].start(), beats[2].start()  # rank 1 never beats
    try:
        assert heartbeat_interval(0.4) == 0.1 and heartbeat_interval(180) == 5.0
        error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting "
                             "400ms for recv operation to complete")
        assert is_collective_failure(error) and not is_collective_failure(RuntimeError("bad shape"))
        assert is_collective_failure(_raised_in_c10d("Application timeout caused pair closure"))
        line = beats[0].diagnose(error)
        assert line == ("rank 1 stopped answering (no heartbeat ever; frozen or dead); the collective on rank 0 "
                        "timed out after parallel.timeout_s=0.4; exiting so the launcher can restart")
    finally:
        beats[0].stop(), beats[2].stop()


def _raised_in_c10d(message: str) -> RuntimeError:
    """A RuntimeError as gloo's follow-up errors come: from a frame in torch/distributed, naming neither gloo nor a
    distributed error type."""
    where = os.path.join(os.path.dirname(dist.__file__), "distributed_c10d.py")
    try:
        exec(compile(f"raise RuntimeError({message!r})", where, "exec"))
    except RuntimeError as e:
        return e
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------ dead and frozen ranks


def test_sigkilled_rank_recovers_on_the_uninterrupted_loss_curve(tmp_path, cache_dir):
    """Two cycles of bench/kill_recover.py: torchrun --max-restarts=3, SIGKILL a random worker after a checkpoint."""
    setup = Setup(cache_dir=cache_dir, steps=60, checkpoint_every=10, timeout_s=60, deadline_s=180)
    ref = reference(setup, tmp_path / "reference")
    rng = random.Random(1)
    for i in range(2):
        cycle = kill_cycle(setup, tmp_path / f"cycle{i}", ref, rng)
        assert cycle.recovered, cycle.describe()


@pytest.mark.parametrize("stopped_rank", [0, 1])
def test_sigstopped_rank_is_named_and_the_other_exits(tmp_path, cache_dir, stopped_rank):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moetrain.train",
           *overrides(run, cache_dir, "trainer.max_steps=100000", "parallel.timeout_s=5")]
    log = tmp_path / "torchrun.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=Path(__file__).resolve().parent.parent)
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_bytes().splitlines()) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        ranks = {rank: pid for rank, (pid, _) in workers(proc.pid).items()}
        pids.update(ranks.values())
        other = ranks[1 - stopped_rank]
        os.kill(ranks[stopped_rank], signal.SIGSTOP)
        stopped_at = time.monotonic()
        while alive(other):
            assert time.monotonic() - stopped_at < 60, "the waiting rank did not exit within 60 s"
            time.sleep(0.05)
        elapsed = time.monotonic() - stopped_at
        os.kill(ranks[stopped_rank], signal.SIGKILL)  # instead of torchrun's 30 s wait for it to obey SIGTERM
        assert proc.wait(timeout=60) != 0
        lines = [ln for ln in log.read_text().splitlines() if ln.startswith("moetrain-train: error:")]
        assert len(lines) == 1, log.read_text()[-3000:]
        assert lines[0].startswith(f"moetrain-train: error: rank {stopped_rank} stopped answering (no heartbeat for ")
        assert (f"the collective on rank {1 - stopped_rank} timed out after parallel.timeout_s=5; "
                "exiting so the launcher can restart") in lines[0]
        assert f"exitcode  : 1 (pid: {other})" in log.read_text()
        assert elapsed < 5 + 2 * heartbeat_interval(5) + 1 + 10  # the timeout, the staleness wait, and slack
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        stop(proc, pids)

