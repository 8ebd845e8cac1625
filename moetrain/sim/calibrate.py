"""`moetrain-sim calibrate`: measure this machine's figures for the simulator's CPU cluster.

    moetrain-sim calibrate [--world 2] [--iters 5] [--netns-rate 2gbit] [--out FILE.json]

`--world` gloo ranks (one thread each, as the benchmarks and tests run) repeat a set of probes, rotated in order
every iteration so that the machine's load hits them alike; each probe's time is the slowest rank's, the figure its
median. bench/sim_validate.py runs the same probes interleaved with the benchmarks it predicts.
  * matmul: fp32 (T*K x D) @ (D x F) with every rank busy -> `matmul_flops` (one core's rate: x W/C when W ranks share
    C = os.cpu_count() cores); `matmul_alone` (rank 0 only) is kept for reference;
  * grouped: moetrain's grouped SwiGLU (kernels/grouped_gemm.py), forward + backward -> `grouped_efficiency`;
  * copy: a 32 MiB tensor copy (read + write) -> `memory_bandwidth`;
  * permute: the all-to-all dispatcher's permutation path without its all-to-all (permute, regroup, restore,
    unpermute; forward + backward) -> `permute_passes`, in units of R*D*4 bytes at the copy rate;
  * a2a_small / a2a_large: gloo all_to_all_single of 256 KiB and 8 MiB per rank -> the intra link (alpha per peer,
    bandwidth shared by all ranks: loopback) and the rate at which the cores copy all-to-all payload;
  * with `--netns-rate R` (root only) the all-to-all probes are measured again inside a network namespace whose
    loopback is rate-limited (tc tbf, burst 256 KiB: above the 64 KiB loopback MTU, as bench/pipeline.py does),
    written as a second cluster `cpu-R` (FILE-R.json): the wire is that link, the cores still copy at the plain rate.
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
import torch.distributed as dist

from moetrain.sim.cluster import CPU_CALIBRATED, Link

NETNS = "moetrain-sim-calibrate"
E, K, D, F = 8, 2, 512, 1024  # probe shapes: bench/fssdp_bench.py's and bench/pipeline.py's layer
A2A_SMALL, A2A_LARGE = 1 << 18, 1 << 23  # bytes each rank sends in the two all-to-all probes
COPY_NUMEL = 1 << 23


class Probes:
    """The calibration micro-benchmarks of one rank (module docstring); `run(name)` times one, slowest rank."""

    NAMES = ("matmul", "matmul_alone", "grouped", "copy", "permute", "a2a_small", "a2a_large")

    def __init__(self, rank: int, world: int, tokens: int):
        from moetrain.moe.plan import build_plan

        self.rank, self.world, self.tokens = rank, world, tokens
        R = tokens * K
        L = E // world
        g = torch.Generator().manual_seed(rank)
        self.a, self.w = torch.randn(R, D, generator=g), torch.randn(D, F, generator=g)
        self.x_R = torch.randn(R, D, generator=g)
        self.w1, self.w3 = torch.randn(L, D, F, generator=g) * 0.02, torch.randn(L, D, F, generator=g) * 0.02
        self.w2 = torch.randn(L, F, D, generator=g) * 0.02
        for t in (self.w1, self.w3, self.w2):
            t.requires_grad_()
        self.counts_L = torch.full((L,), R // L)
        self.copy_src, self.copy_dst = torch.randn(COPY_NUMEL), torch.empty(COPY_NUMEL)
        self.x_T = torch.randn(tokens, D, generator=g)
        topk = torch.stack([(torch.arange(tokens) * K + k) % E for k in range(K)], 1)
        self.plan = build_plan(topk, torch.full((tokens, K), 1.0 / K), E)
        self.perm = torch.randperm(R, generator=g)
        self.inv = torch.argsort(self.perm)
        self.names = list(self.NAMES)

    def run(self, name: str) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        getattr(self, "_" + name)()
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    def _matmul(self):
        self.a @ self.w

    def _matmul_alone(self):
        if self.rank == 0:
            self.a @ self.w

    def _grouped(self):
        from moetrain.kernels.grouped_gemm import grouped_swiglu

        x = self.x_R.requires_grad_()
        grouped_swiglu(x, self.w1, self.w3, self.w2, self.counts_L).backward(self.x_R)
        x.grad = None
        for t in (self.w1, self.w3, self.w2):
            t.grad = None
        self.x_R = self.x_R.detach()

    def _copy(self):
        self.copy_dst.copy_(self.copy_src)

    def _permute(self):
        from moetrain.moe.plan import permute, permute_rows, unpermute

        x = self.x_T.clone().requires_grad_()
        rows = permute(x, self.plan)
        rows = permute_rows(permute_rows(rows, self.perm, self.inv), self.inv, self.perm)
        unpermute(rows, self.plan).backward(self.x_T)

    def _a2a(self, nbytes: int):
        n = nbytes // 4 - (nbytes // 4) % self.world
        dist.all_to_all_single(torch.empty(n), torch.ones(n))

    def _a2a_small(self):
        self._a2a(A2A_SMALL)

    def _a2a_large(self):
        self._a2a(A2A_LARGE)


def cluster_from_probes(med: dict, world: int, tokens: int, host_copy_bandwidth=None):
    """The CPU cluster the medians of one run imply. The probes run on all ranks at once, so they give the rate a
    rank gets while every rank computes; with more ranks than cores (`os.cpu_count()`) that is C/W of a core, and a
    rank's one-core rate (what `Cluster.matmul_flops` means) is the probe's rate times W/C."""
    R = tokens * K
    cores = float(os.cpu_count() or 1)
    share = max(1.0, world / cores)
    together = 2 * R * D * F / med["matmul"]
    grouped = 3 * 6 * R * D * F / med["grouped"]
    copy = 2 * 4 * COPY_NUMEL / med["copy"]
    passes = med["permute"] * copy / (R * D * 4)  # time = passes * R*D*4 / copy rate, with every rank busy
    sizes = [A2A_SMALL, A2A_LARGE]
    moved = [s * (world - 1) / world * world for s in sizes]  # bytes all ranks send off-rank
    slope = (med["a2a_large"] - med["a2a_small"]) / (moved[1] - moved[0])
    alpha = max(1e-6, med["a2a_small"] - slope * moved[0]) / (world - 1)
    link = Link(alpha, 1.0 / max(slope, 1e-12), shared=True)
    return dataclasses.replace(
        CPU_CALIBRATED, matmul_flops=together * share, matmul_efficiency=1.0, grouped_efficiency=grouped / together,
        memory_bandwidth=copy * share, memory_efficiency=1.0, cores=cores, permute_passes=passes, intra=link,
        inter=link, host_copy_bandwidth=host_copy_bandwidth or link.bandwidth,
        notes=f"probes of {world} ranks x {tokens} tokens, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def _probe_worker(rank, world, tokens, names, iters, warmup):
    probes = Probes(rank, world, tokens)
    names = list(names)
    times = {n: [] for n in names}
    for i in range(warmup + iters):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t = probes.run(name)
            if i >= warmup:
                times[name].append(t)
    return times


def measure(world: int, tokens: int, names, iters: int = 5, warmup: int = 1) -> dict:
    """Per-iteration times of the probes `names` on `world` gloo ranks (module docstring)."""
    from moetrain.utils.local_ranks import run_distributed

    return run_distributed(_probe_worker, world, tokens, list(names), iters, warmup, timeout=1800)[0]


def _rate_limited_a2a(world: int, tokens: int, rate: str, iters: int) -> dict:
    cmds = [["ip", "netns", "add", NETNS], ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
             "burst", "256kb", "latency", "50ms"]]
    code = ("import json; from moetrain.sim.calibrate import measure; "
            f"print(json.dumps(measure({world}, {tokens}, ['a2a_small', 'a2a_large'], {iters})))")
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        out = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, "-c", code], check=True,
                             capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False, capture_output=True)
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None, prog: str = "moetrain-sim calibrate") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks (one thread each) the figures are measured with")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank of the probe shapes")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--netns-rate", default=None, help="also measure a loopback rate-limited to this rate (root)")
    p.add_argument("--out", default=None, help="write the cluster as JSON (use it with --cluster FILE.json)")
    args = p.parse_args(argv)
    if args.world < 2:
        print(f"{prog}: error: --world {args.world}: the all-to-all needs at least 2 ranks", file=sys.stderr)
        return 2
    if args.netns_rate and os.geteuid() != 0:
        print(f"{prog}: error: --netns-rate needs root (ip netns, tc); run without it", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    times = measure(args.world, args.tokens, Probes.NAMES, args.iters)
    med = {k: statistics.median(v) for k, v in times.items()}
    clusters = [cluster_from_probes(med, args.world, args.tokens)]
    if args.netns_rate:
        limited = {**med, **{k: statistics.median(v) for k, v in
                             _rate_limited_a2a(args.world, args.tokens, args.netns_rate, args.iters).items()}}
        c = cluster_from_probes(limited, args.world, args.tokens, clusters[0].intra.bandwidth)
        clusters.append(dataclasses.replace(c, name=f"cpu-{args.netns_rate}"))
    for c in clusters:
        print(f"{c.name}: matmul {c.matmul_flops / 1e9:.1f} GFLOP/s per core, "
              f"grouped SwiGLU x{c.grouped_efficiency:.2f}, "
              f"copy {c.memory_bandwidth / 1e9:.2f} GB/s, {c.cores:g} cores, permute passes {c.permute_passes:.1f}, "
              f"all-to-all alpha {c.intra.alpha * 1e6:.0f} us per peer, {c.intra.bandwidth / 1e9:.3f} GB/s shared")
    print(f"load average (1 min) before / after: {load:.2f} / {os.getloadavg()[0]:.2f}")
    if args.out:
        stem = args.out[:-5] if args.out.endswith(".json") else args.out
        for c, path in zip(clusters, [args.out, f"{stem}-{args.netns_rate}.json"]):
            with open(path, "w") as f:
                json.dump(c.to_json(), f, indent=1)
            print(f"wrote {path}")
    return 0
