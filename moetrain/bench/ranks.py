"""One benchmark process per rank: its device, the group its layers communicate over, autocast and device sync.

    results = spawn(body, world, cfg)                 # body(rank, world, cfg) on W gloo processes, one thread each
    env = RankEnv.setup(rank, world, "cuda", "default")  # inside body

Processes come from moetrain.utils.local_ranks.run_distributed (gloo default group, free loopback port, one intra-op
thread per rank). The default gloo group carries the harness's barriers and its all-reduce(MAX) of CPU times on
every device. On "cpu" the layers communicate over it too; on "cuda" rank r uses GPU r and the layers get an NCCL
group over all ranks (none with one rank: a single GPU runs the local layer), and steps run under bf16 autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import machine


@dataclass
class RankEnv:
    rank: int
    world: int
    device: torch.device
    group: Optional[dist.ProcessGroup]  # what the layers communicate over (None: a single rank)

    @staticmethod
    def setup(rank: int, world: int, device: str, malloc: str = "default") -> "RankEnv":
        if malloc == "tuned" and not machine.tune_glibc_malloc():
            raise RuntimeError("--malloc tuned needs glibc's mallopt; run with --malloc default")
        if device == "cuda":
            if torch.cuda.device_count() < world:
                raise RuntimeError(f"--device cuda with {world} ranks needs {world} GPUs, "
                                   f"found {torch.cuda.device_count()}; pass --world {torch.cuda.device_count()}")
            torch.cuda.set_device(rank)
            group = dist.new_group(list(range(world)), backend="nccl") if world > 1 else None
            return RankEnv(rank, world, torch.device("cuda", rank), group)
        return RankEnv(rank, world, torch.device("cpu"), dist.group.WORLD if world > 1 else None)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self):
        """bf16 autocast on CUDA; fp32 on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

    def barrier(self) -> None:
        dist.barrier()


def spawn(body, world: int, *args, timeout: float = 1800.0):
    """body(rank, world, *args) on `world` local gloo processes; the per-rank results in rank order."""
    from moetrain.utils.local_ranks import run_distributed

    return run_distributed(body, world, *args, timeout=timeout)
