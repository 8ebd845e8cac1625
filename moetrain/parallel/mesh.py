"""Process groups for data x expert parallelism.

World W = dp * ep, laid out as a DeviceMesh of shape (dp, ep) with dims named ("dp", "ep"): ranks that differ only in
their ep coordinate hold different experts (the expert-parallel group); ranks that differ only in their dp coordinate
hold the same experts (the expert-data-parallel group, over which expert gradients are reduced). Dense parameters are
data parallel over the whole world, and so is the data: every rank reads its own micro-batches.

FSDP2 (`parallel.data_parallel=fsdp`) takes its meshes from the same root mesh (`fsdp_meshes`): the dense parameters
are sharded over the whole world, the (dp, ep) mesh flattened, or, with HSDP (`parallel.dp_replicate=R`), over a 2-D
(R, W/R) unflattening of it (shard within R groups of W/R consecutive ranks, replicate across them); the experts over
their expert-data-parallel ranks ("dp", inside one replica group under HSDP). See docs/parallelism.md, "Which mesh
dimension shards what".

Every group (the world and each mesh dimension) gets the same collective timeout, `parallel.timeout_s`: a collective
that waits longer raises on the waiting ranks (gloo applies it to each operation). torch would otherwise give the
subgroups its 30-minute default whatever the world group has.

Restarts under torchrun: the elastic agent keeps one TCPStore for the whole job and hands the workers of every restart
the same MASTER_PORT, so the keys of the previous attempt (gloo's listening addresses of the dead workers, barrier
counters) are still there when the new workers meet. A new worker can read a dead worker's address and connect to a
port nobody listens on any more ("Connection refused") or wait for a connection that never comes (a hang until the
timeout). `init_parallel` therefore builds the groups under a key prefix that is new for each start of the workers:
rank 0 draws a random token, publishes it with the port of a small socket it listens on, and the other ranks accept a
published token only once that socket answers with it, which a token left by a dead attempt cannot do.
TORCHELASTIC_RESTART_COUNT would not do as the prefix: each agent counts its own restarts, so on several nodes the
counts can differ.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

ATTEMPT_KEY = "moetrain/attempt"  # in the agent's store: "<port> <token>" of the current start of the workers


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ep: int = 1
    device: torch.device = torch.device("cpu")
    mesh: Optional[object] = None  # DeviceMesh (dp, ep) when distributed
    world_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    edp_group: Optional[dist.ProcessGroup] = None
    store: Optional[dist.Store] = None  # the default group's store (heartbeats live there)
    timeout: Optional[timedelta] = None  # the collective timeout every group gets (None: torch's defaults)

    @property
    def dp(self) -> int:
        return self.world_size // self.ep

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun (single process when unset)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_parallel(ep: int, device_request: str = "auto", backend: str = "auto",
                  timeout_s: float = 180.0) -> ParallelContext:
    """Initialise the default process group (if WORLD_SIZE > 1) and the (dp, ep) mesh, every group with a collective
    timeout of `timeout_s` seconds. Under torchrun's shared store the groups meet under a prefix of their own (see the
    module docstring). An already initialised default group is kept; its timeout is set to `timeout_s` too."""
    rank, world_size, local_rank = env_world()
    device = resolve_device(device_request, local_rank)
    ctx = ParallelContext(rank=rank, world_size=world_size, local_rank=local_rank, ep=ep, device=device)
    if world_size == 1 and not dist.is_initialized():
        return ctx
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True):
            store, probe = attempt_store(rank, timeout)
            try:
                dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                                        device_id=device_id)
                dist.barrier()  # every rank has accepted the prefix: rank 0's probe is no longer needed
            finally:
                if probe is not None:
                    probe.close()
        else:
            dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    return build_groups(ctx, timeout)


def build_groups(ctx: ParallelContext, timeout: Optional[timedelta] = None) -> ParallelContext:
    """Fill in ranks, the (dp, ep) mesh and its groups from the initialised default group; with `timeout`, every
    group (world, ep, dp) gets it as its collective timeout."""
    from torch.distributed.device_mesh import init_device_mesh

    ctx.rank, ctx.world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size // ctx.ep, ctx.ep), mesh_dim_names=("dp", "ep"))
    ctx.mesh = mesh
    ctx.world_group = dist.group.WORLD
    ctx.ep_group = mesh["ep"].get_group()
    ctx.edp_group = mesh["dp"].get_group()
    ctx.store = dist.distributed_c10d._get_default_store()
    ctx.timeout = timeout
    if timeout is not None:
        # new_group (used by DeviceMesh) gives subgroups torch's backend default, not the default group's timeout.
        for group in {ctx.world_group, ctx.ep_group, ctx.edp_group}:
            dist.distributed_c10d._set_pg_timeout(timeout, group)
    return ctx


@dataclass
class FSDPMeshes:
    """The meshes FSDP2 shards over, all views of `ctx.mesh` (see the module docstring).

    dense:   1-D (all W ranks), or 2-D ("dp_replicate", "dp_shard") = (R, W/R) under HSDP
    experts: the expert-data-parallel ranks: 1-D "dp" (W/ep ranks), 2-D ("edp_replicate", "edp_shard") =
             (R, W/(ep*R)) under HSDP; None when experts are not sharded by FSDP (their shard group would have one
             rank, or FSSDP owns them): they stay plain tensors whose gradients `sync_gradients` reduces.
    """

    dense: object
    experts: Optional[object]


def fsdp_meshes(ctx: ParallelContext, dp_replicate: int = 1, shard_experts: bool = True) -> FSDPMeshes:
    """Build (collectively: every rank calls it in the same order) the FSDP2 meshes of the layout of `ctx`.

    Ranks are numbered rank = d * ep + e on the (dp, ep) mesh; HSDP replica group r is ranks [r*W/R, (r+1)*W/R).
    With R > 1 and experts held by several dp ranks, R must divide dp (ep divides W/R: an expert-parallel group stays
    inside one replica group), so that the experts' replicate coordinate d // (dp/R) is the dense one, rank // (W/R)."""
    W, R = ctx.world_size, dp_replicate
    if R < 1 or W % R:
        raise ValueError(f"dp_replicate={R} must divide the world size {W}")
    flat = ctx.mesh._flatten("world")
    dense = flat if R == 1 else flat._unflatten(0, (R, W // R), ("dp_replicate", "dp_shard"))
    experts = None
    if shard_experts and ctx.dp > 1:
        edp = ctx.mesh["dp"]
        if ctx.dp % R:
            raise ValueError(f"dp_replicate={R} must divide the {ctx.dp} expert-data-parallel ranks (world {W}, "
                             f"ep {ctx.ep})")
        shard = ctx.dp // R
        if shard > 1:
            experts = edp if R == 1 else edp._unflatten(0, (R, shard), ("edp_replicate", "edp_shard"))
    if ctx.timeout is not None:
        for mesh in (dense, experts):
            if mesh is not None:
                for dim in range(mesh.ndim):
                    dist.distributed_c10d._set_pg_timeout(ctx.timeout, mesh.get_group(dim))
    return FSDPMeshes(dense, experts)


def group_timeout(group: dist.ProcessGroup, device: torch.device = torch.device("cpu")) -> timedelta:
    """The collective timeout `group` runs with on `device`'s backend."""
    return group._get_backend(device).options._timeout


# ---------------------------------------------------------------------------------------- a fresh prefix per attempt


class _Probe:
    """Rank 0's proof of life for its token: a listening socket that answers every connection with the token."""

    def __init__(self, host: str, token: str):
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        try:
            self.sock = socket.create_server((host, 0), family=family)
        except OSError:  # MASTER_ADDR names this host by an address it cannot bind: listen on all of them
            self.sock = socket.create_server(("", 0), family=family)
        self.port = self.sock.getsockname()[1]
        self.token = token.encode()
        threading.Thread(target=self._serve, name="moetrain-attempt-probe", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            with conn:
                try:
                    conn.sendall(self.token)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _ask(host: str, port: int, n: int) -> bytes:
    """Up to `n` bytes from whoever listens on host:port, or b"" when nobody answers."""
    try:
        with socket.create_connection((host, port), timeout=5) as conn:
            data = b""
            while len(data) < n:
                chunk = conn.recv(n - len(data))
                if not chunk:
                    break
                data += chunk
            return data
    except OSError:
        return b""


def attempt_store(rank: int, timeout: timedelta) -> tuple[dist.Store, Optional[_Probe]]:
    """A client of torchrun's shared store (MASTER_ADDR:MASTER_PORT) whose keys live under a prefix that is new for
    this start of the workers, and, on rank 0, the probe that proves the prefix current (close it once every rank
    is in the default group: each has accepted the prefix by then). Raises DistStoreError after `timeout` without one."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    probe = None
    if rank == 0:
        token = secrets.token_hex(8)
        probe = _Probe(host, token)
        store.set(ATTEMPT_KEY, f"{probe.port} {token}")
    else:
        deadline = time.monotonic() + timeout.total_seconds()
        while True:
            probe_port, token = store.get(ATTEMPT_KEY).decode().split()  # waits for the key (store timeout)
            if _ask(host, int(probe_port), len(token)) == token.encode():
                break
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"rank 0 did not publish a live attempt token within {timeout}")
            time.sleep(0.1)  # a token left by a dead attempt: wait for rank 0 of this one
    return dist.PrefixStore(f"moetrain/{token}/", store), probe
