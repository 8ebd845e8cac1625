"""Pipelined all-to-all: forward+backward time of one expert-parallel MoE layer at pipeline degrees 1, 2, 4, 8,
side by side in one run, and the degree `parallel.pipeline_degree=auto` picks.

    python bench/pipeline.py [--world 2] [--experts 8] [--top-k 2] [--dim 512] [--hidden 1024] [--tokens 4096]
                             [--netns-rate 2gbit]

On plain loopback the all-to-all is a memcpy that competes with the experts for the same 2 cores, so there is little
to hide. `--netns-rate R` (root only) runs the ranks in a fresh network namespace whose loopback is rate-limited
with `tc ... tbf` (burst above the 64 KiB loopback MTU), so that the wire, not the CPU, bounds communication - the
situation pipelining is for. The namespace is deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moetrain.config.schema import RouterConfig  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402
from moetrain.parallel.moe_layer import build_moe_layer  # noqa: E402
from moetrain.utils.local_ranks import run_distributed  # noqa: E402

NETNS = "moetrain-bench"


def fwd_bwd_seconds(layer: MoELayer, x, dy) -> float:
    """One forward + backward of `layer` on x (gradient dy), after a barrier: the slowest rank's seconds."""
    xi = x.clone().requires_grad_()
    dist.barrier()
    t0 = time.perf_counter()
    layer(xi[None]).backward(dy[None])
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    layer.zero_grad(set_to_none=True)
    return elapsed.item()


def time_degree(layer: MoELayer, x, dy, iters: int, warmup: int) -> float:
    times = [fwd_bwd_seconds(layer, x, dy) for _ in range(warmup + iters)]
    return statistics.median(times[warmup:])


def worker(rank, world, args):
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.dim, generator=g)
    dy = torch.randn(args.tokens, args.dim, generator=g)
    results = {}
    L = args.experts // world
    for degree in [d for d in (1, 2, 4, 8) if d <= L]:
        torch.manual_seed(0)
        layer = build_moe_layer(args.dim, args.hidden, args.experts, 0,
                                RouterConfig(top_k=args.top_k, force_balanced=True), layer_id=1,
                                ep_group=dist.group.WORLD, pipeline_degree=str(degree))
        layer.reset_parameters(0.02, 0.02, seed=0)
        results[degree] = time_degree(layer, x, dy, args.iters, args.warmup)
    # What auto picks: the trial phase run as training would (one forward+backward per step).
    torch.manual_seed(0)
    layer = build_moe_layer(args.dim, args.hidden, args.experts, 0, RouterConfig(top_k=args.top_k, force_balanced=True),
                            layer_id=1, ep_group=dist.group.WORLD, pipeline_degree="auto")
    layer.reset_parameters(0.02, 0.02, seed=0)
    tuner = layer.dispatcher.tuner
    while tuner.chosen is None:
        layer(x.clone().requires_grad_()[None]).backward(dy[None])
        layer.zero_grad(set_to_none=True)
        layer.dispatcher.after_step(0, None)
    return {"times": results, "auto": tuner.chosen}


def run(args) -> dict:
    return run_distributed(worker, args.world, args, timeout=1800)[0]  # one thread per rank, gloo


def in_rate_limited_netns(args, argv) -> int:
    if os.geteuid() != 0:
        sys.exit("bench/pipeline.py: error: --netns-rate needs root (ip netns, tc); run without it for plain loopback")
    cmds = [["ip", "netns", "add", NETNS], ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate",
             args.netns_rate, "burst", "256kb", "latency", "50ms"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True)
        inner = [a for a in argv if not a.startswith("--netns-rate")]
        if "--netns-rate" in argv:  # "--netns-rate R" as two words
            i = argv.index("--netns-rate")
            inner = argv[:i] + argv[i + 2:]
        return subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, os.path.abspath(__file__), *inner,
                               "--label", f"loopback limited to {args.netns_rate}"]).returncode
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--netns-rate", default=None, help="e.g. 2gbit: run inside a rate-limited network namespace")
    p.add_argument("--label", default="plain loopback")
    args = p.parse_args(argv)
    if args.netns_rate:
        return in_rate_limited_netns(args, argv)
    res = run(args)
    base = res["times"][1]
    print(f"W={args.world} E={args.experts} K={args.top_k} D={args.dim} F={args.hidden} T={args.tokens}/rank, "
          f"forced-balanced routing, {args.label}")
    for degree, t in res["times"].items():
        print(f"  degree {degree}: fwd+bwd {t:.3f} s   speed-up vs degree 1: {base / t:.2f}x")
    print(f"  auto picked degree {res['auto']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
