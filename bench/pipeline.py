"""Pipelined all-to-all: forward+backward of one expert-parallel MoE layer at pipeline degrees 1, 2, 4, 8 and auto,
with compute alone and communication alone, alternated iteration by iteration in the same processes. The harness
lives in moetrain/bench/pipeline.py; this script runs it from a checkout:

    python bench/pipeline.py [--world 2] [--experts 8] [--top-k 2] [--dim 512] [--hidden 1024] [--tokens 4096]
                             [--netns-rate 2gbit]

`--netns-rate R` (root only) runs the ranks in a fresh network namespace whose loopback is rate-limited with
`tc ... tbf`, so that the wire, not the CPU, bounds communication (moetrain/bench/netns.py).
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moetrain.bench.pipeline import main  # noqa: E402


def fwd_bwd_seconds(layer, x, dy) -> float:
    """One forward + backward of `layer` on x (gradient dy), after a barrier: the slowest rank's seconds
    (bench/sim_validate.py's timer)."""
    xi = x.clone().requires_grad_()
    dist.barrier()
    t0 = time.perf_counter()
    layer(xi[None]).backward(dy[None])
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    layer.zero_grad(set_to_none=True)
    return elapsed.item()


if __name__ == "__main__":
    sys.exit(main())
