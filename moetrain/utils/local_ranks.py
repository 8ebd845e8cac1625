"""Run a function in W local gloo processes and collect what each rank returns (tests, benchmarks, experiments).

    results = run_distributed(body, world_size=2, arg1, ...)   # body(rank, world_size, *args) -> picklable

Each rank gets MASTER_ADDR/MASTER_PORT on a free loopback port, one intra-op thread (the machine has 2 cores) and an
initialised gloo process group; the group is destroyed when the body returns. An exception on any rank fails the
caller with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, body, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = body(rank, world_size, *args)
        # Plain pickle (not torch's shared-memory reduction): the child may exit before the parent reads.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(body, world_size: int, *args, timeout: float = 300.0):
    """Run `body(rank, world_size, *args)` on `world_size` gloo ranks; return the per-rank results in rank order."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, body, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
