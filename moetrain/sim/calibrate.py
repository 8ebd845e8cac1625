"""`moetrain-sim calibrate`: measure this machine's figures for the simulator's CPU cluster.

    moetrain-sim calibrate [--world 2] [--netns-rate 2gbit] [--out FILE.json] [--quick]

Measured, one thread per rank as the benchmarks and tests run (medians of repeated timings):
  * matmul_flops: fp32 (T*K x D) @ (D x F) matmul FLOP/s of one rank, with `--world` ranks computing at once (on
    a shared machine that is the rate a rank gets);
  * cores: world * (rate with world ranks at once) / (rate of one process alone): the cores the ranks really share;
  * grouped_efficiency: moetrain's grouped SwiGLU (kernels/grouped_gemm.py), forward + backward, FLOP/s over the
    matmul rate;
  * memory_bandwidth: bytes/s of a large tensor copy (read + write);
  * permute_passes: the routed-row passes of one MoE layer outside its GEMMs: a one-process layer's forward +
    backward minus its grouped SwiGLU and router, in units of R*D*4 bytes at the copy bandwidth;
  * intra link (alpha, bandwidth, shared): gloo all_to_all_single over loopback between `--world` ranks at 7
    message sizes, least squares t = alpha*(W-1) + (bytes sent by all ranks)/bandwidth; the same bandwidth is the
    rate at which the cores copy all-to-all payload (host_copy_bandwidth);
  * with `--netns-rate R` (root only): the same fit inside a network namespace whose loopback is rate-limited
    (tc tbf, burst 256 KiB: above the 64 KiB loopback MTU, as bench/pipeline.py does), written as a second
    cluster `cpu-R` (to FILE-R.json) (the wire is that link; the cores still copy at the plain loopback rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from moetrain.sim.cluster import CPU_CALIBRATED, Cluster, Link

NETNS = "moetrain-sim-calibrate"
A2A_SIZES = (1 << 16, 1 << 18, 1 << 20, 1 << 21, 1 << 22, 1 << 23, 1 << 24)  # bytes each rank sends in total


def _median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(rows: int = 8192, dim: int = 512, hidden: int = 1024, reps: int = 5) -> float:
    a, w = torch.randn(rows, dim), torch.randn(dim, hidden)
    return 2 * rows * dim * hidden / _median_time(lambda: a @ w, reps)


def grouped_rate(rows: int = 8192, experts: int = 4, dim: int = 512, hidden: int = 1024, reps: int = 3) -> float:
    from moetrain.kernels.grouped_gemm import grouped_swiglu

    x = torch.randn(rows, dim, requires_grad=True)
    w1, w3 = torch.randn(experts, dim, hidden) * 0.02, torch.randn(experts, dim, hidden) * 0.02
    w2 = (torch.randn(experts, hidden, dim) * 0.02)
    for w in (w1, w3, w2):
        w.requires_grad_()
    counts = torch.full((experts,), rows // experts)
    dy = torch.randn(rows, dim)

    def run():
        grouped_swiglu(x, w1, w3, w2, counts).backward(dy)

    return 3 * 6 * rows * dim * hidden / _median_time(run, reps)


def copy_bandwidth(numel: int = 1 << 24, reps: int = 5) -> float:
    a, b = torch.randn(numel), torch.empty(numel)
    return 2 * 4 * numel / _median_time(lambda: b.copy_(a), reps)


def layer_overhead(tokens: int = 4096, dim: int = 512, hidden: int = 1024, experts: int = 8, top_k: int = 2,
                   reps: int = 3) -> float:
    """Seconds of a one-process MoE layer's forward + backward outside its grouped SwiGLU (router, permutations)."""
    from moetrain.config.schema import RouterConfig
    from moetrain.parallel.moe_layer import build_moe_layer

    torch.manual_seed(0)
    layer = build_moe_layer(dim, hidden, experts, 0, RouterConfig(top_k=top_k, force_balanced=True), layer_id=1)
    layer.reset_parameters(0.02, 0.02, seed=0)
    x, dy = torch.randn(1, tokens, dim), torch.randn(1, tokens, dim)

    def run():
        layer(x.clone().requires_grad_()).backward(dy)
        layer.zero_grad(set_to_none=True)

    total = _median_time(run, reps)
    rows = tokens * top_k
    gemm = 3 * 6 * rows * dim * hidden / grouped_rate(rows, experts, dim, hidden, reps)
    return max(0.0, total - gemm)


def _rates_worker(rank, world, reps):
    import torch.distributed as dist

    dist.barrier()
    rate = matmul_rate(reps=reps)
    dist.barrier()
    return rate


def _a2a_worker(rank, world, sizes, reps):
    import torch.distributed as dist

    out = {}
    for size in sizes:
        numel = size // 4
        numel -= numel % world
        x, y = torch.randn(numel), torch.empty(numel)
        times = []
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_to_all_single(y, x)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:
                times.append(elapsed.item())
        out[size] = statistics.median(times)
    return out


def fit_alpha_beta(sizes_bytes, seconds, world: int) -> Link:
    """Least squares t = alpha*(W-1) + total/bandwidth over (bytes sent off-rank by all ranks, seconds)."""
    xs = [s * (world - 1) / world * world for s in sizes_bytes]  # every rank keeps 1/W of its buffer
    n = len(xs)
    mx, my = sum(xs) / n, sum(seconds) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, seconds)) / sum((x - mx) ** 2 for x in xs)
    intercept = max(my - slope * mx, 1e-6)
    return Link(alpha=intercept / (world - 1), bandwidth=1.0 / slope, shared=True)


def measure_a2a(world: int, reps: int = 5, sizes=A2A_SIZES) -> tuple[Link, dict]:
    from moetrain.utils.local_ranks import run_distributed

    times = run_distributed(_a2a_worker, world, list(sizes), reps, timeout=600)[0]
    return fit_alpha_beta(list(times), list(times.values()), world), times


def calibrate(world: int = 2, reps: int = 5) -> tuple[Cluster, dict]:
    """The CPU cluster measured now (module docstring) and the raw figures."""
    from moetrain.utils.local_ranks import run_distributed

    raw = {"loadavg_before": os.getloadavg()}
    torch.set_num_threads(1)
    alone = matmul_rate(reps=reps)
    together = statistics.mean(run_distributed(_rates_worker, world, reps, timeout=600))
    grouped = grouped_rate(reps=max(2, reps // 2))
    copy = copy_bandwidth(reps=reps)
    overhead = layer_overhead(reps=max(2, reps // 2))
    link, a2a = measure_a2a(world, reps)
    raw.update(matmul_alone=alone, matmul_together=together, grouped=grouped, copy=copy,
               layer_overhead_s=overhead, a2a_seconds={str(k): v for k, v in a2a.items()},
               loadavg_after=os.getloadavg())
    cores = min(float(os.cpu_count() or 1), world * together / alone)
    rows, dim = 4096 * 2, 512
    cluster = dataclasses.replace(
        CPU_CALIBRATED, matmul_flops=together, matmul_efficiency=1.0, grouped_efficiency=grouped / alone,
        memory_bandwidth=copy * together / alone, memory_efficiency=1.0, cores=cores,
        permute_passes=overhead * copy / (rows * dim * 4), intra=link, inter=link, host_copy_bandwidth=link.bandwidth,
        notes=f"calibrated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} with {world} ranks, load average "
              f"{raw['loadavg_before'][0]:.1f}")
    return cluster, raw


def rate_limited(cluster: Cluster, world: int, rate: str, reps: int = 5) -> tuple[Cluster, dict]:
    """The cluster with its link measured inside a rate-limited loopback namespace (root only)."""
    if os.geteuid() != 0:
        raise ValueError("--netns-rate needs root (ip netns, tc); run without it for plain loopback")
    cmds = [["ip", "netns", "add", NETNS], ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
             "burst", "256kb", "latency", "50ms"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        code = ("import json,sys; from moetrain.sim.calibrate import measure_a2a; "
                f"link, t = measure_a2a({world}, {reps}); "
                "print(json.dumps({'alpha': link.alpha, 'bandwidth': link.bandwidth, 'times': t}))")
        out = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, "-c", code], check=True,
                             capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False, capture_output=True)
    d = json.loads(out.strip().splitlines()[-1])
    link = Link(d["alpha"], d["bandwidth"], shared=True)
    return dataclasses.replace(cluster, name=f"cpu-{rate}", intra=link, inter=link), d


def main(argv=None, prog: str = "moetrain-sim calibrate") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks (one thread each) the figures are measured with")
    p.add_argument("--netns-rate", default=None, help="also measure a loopback rate-limited to this rate (root)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=None, help="write the cluster as JSON (use it with --cluster FILE.json)")
    args = p.parse_args(argv)
    if args.world < 2:
        print(f"{prog}: error: --world {args.world}: the all-to-all needs at least 2 ranks", file=sys.stderr)
        return 2
    if args.netns_rate and os.geteuid() != 0:
        print(f"{prog}: error: --netns-rate needs root (ip netns, tc); run without it", file=sys.stderr)
        return 2
    cluster, raw = calibrate(args.world, args.reps)
    clusters = [cluster]
    if args.netns_rate:
        clusters.append(rate_limited(cluster, args.world, args.netns_rate, args.reps)[0])
    for c in clusters:
        print(f"{c.name}: matmul {c.matmul_flops / 1e9:.1f} GFLOP/s/rank, grouped SwiGLU x{c.grouped_efficiency:.2f}, "
              f"copy {c.memory_bandwidth / 1e9:.2f} GB/s, cores {c.cores:.2f}, permute passes {c.permute_passes:.1f}, "
              f"all-to-all alpha {c.intra.alpha * 1e6:.0f} us, bandwidth {c.intra.bandwidth / 1e9:.3f} GB/s (shared)")
    print(f"load average before/after: {raw['loadavg_before'][0]:.2f} / {raw['loadavg_after'][0]:.2f}")
    if args.out:
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
        for c, path in zip(clusters, [args.out, f"{stem}-{args.netns_rate}.json"]):
            with open(path, "w") as f:
                json.dump(c.to_json(), f, indent=1)
            print(f"wrote {path}")
    return 0
