#!/usr/bin/env python
"""MoE hot-path kernels, before/after: one MoE layer forward+backward vs the dense-matmul limit, interleaved.

    python bench/kernels_profile.py --world 1 --experts 64 --top-k 6 --hidden 256 --tokens 4096
    python bench/kernels_profile.py --world 2 --experts 64 --top-k 6 --hidden 256 --tokens 4096 --baseline HEAD~1

Every iteration times, in a rotating order inside the same process(es) (W gloo ranks, expert parallel over all of
them, one intra-op thread each, a barrier before each row, the slowest rank's time):

  dense     one SwiGLU with plain matmuls on the same T*K rows: x[T*K, D] -> [D, F] x2 -> [F, D], fwd + bwd
  ours      MoELayer (router.force_balanced=true unless --learned), y.backward(dy) with the input gradient
  baseline  (with --baseline REV) the same layer with kernels/grouped_gemm.py, kernels/permute.py and
            moe/experts.py's compute loaded from git revision REV, so the old and new kernels share the process,
            the allocator state and the machine's load

Reported per row: median seconds with [min, max] over iterations, and the per-iteration ratio dense/row (median
[min, max]) - the fraction of the dense limit reached. Default glibc malloc (no tuning). --profile also writes a
torch.profiler table (self CPU time by op) of each MoE row on rank 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=1, help="gloo processes, expert parallel over all of them")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=4096, help="T per rank")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--learned", action="store_true", help="the learned router instead of force_balanced")
    p.add_argument("--baseline", default=None, help="git revision whose kernels form the 'baseline' row")
    p.add_argument("--repo", default=ROOT, help="the git checkout --baseline is read from")
    p.add_argument("--profile", default=None, help="write torch.profiler tables to this path prefix (rank 0)")
    return p.parse_args(argv)


def load_baseline(rev: str, tmp: str, repo: str) -> dict:
    """The old kernel modules of git revision `rev`, importable side by side with the current ones."""
    mods = {}
    for name, path in (("grouped_gemm", "moetrain/kernels/grouped_gemm.py"), ("permute", "moetrain/kernels/permute.py"),
                       ("experts", "moetrain/moe/experts.py")):
        src = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], check=True, capture_output=True,
                             text=True).stdout
        src = src.replace("from moetrain.kernels.grouped_gemm import", "from baseline_grouped_gemm import")
        file = os.path.join(tmp, f"baseline_{name}.py")
        with open(file, "w") as fh:
            fh.write(src)
    sys.path.insert(0, tmp)
    for name in ("grouped_gemm", "permute", "experts"):
        spec = importlib.util.spec_from_file_location(f"baseline_{name}", os.path.join(tmp, f"baseline_{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"baseline_{name}"] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods


class Swap:
    """Inside the context, the layer runs the baseline kernels (plan.py's permutation module and the experts'
    compute); outside, the current ones."""

    def __init__(self, layer, mods):
        import moetrain.moe.plan as plan

        self.plan, self.layer, self.mods = plan, layer, mods
        self.current_kernels = plan.kernels

    def __enter__(self):
        self.plan.kernels = self.mods["permute"]
        self.layer.experts.compute = self.mods["experts"].GroupedExperts.compute.__get__(self.layer.experts)
        return self

    def __exit__(self, *exc):
        self.plan.kernels = self.current_kernels
        del self.layer.experts.compute


def rank_body(rank: int, world: int, args) -> dict:
    from contextlib import nullcontext

    from moetrain.config.schema import RouterConfig
    from moetrain.parallel.mesh import ParallelContext, build_groups
    from moetrain.parallel.moe_layer import build_moe_layer

    torch.set_num_threads(1)
    ctx = build_groups(ParallelContext(ep=world)) if world > 1 else None
    T, K, E, D, Fh = args.tokens, args.top_k, args.experts, args.dim, args.hidden
    torch.manual_seed(0)
    layer = build_moe_layer(D, Fh, E, 0, RouterConfig(top_k=K, force_balanced=not args.learned), layer_id=0,
                            ep_group=ctx.ep_group if ctx else None)
    layer.reset_parameters(0.02, 0.02 / 2 ** 0.5, seed=0)
    g = torch.Generator().manual_seed(1000 + rank)
    x_TD, dy_TD = torch.randn(1, T, D, generator=g), torch.randn(1, T, D, generator=g)
    R = T * K
    w = [(torch.randn(*s, generator=g) * 0.02).requires_grad_() for s in ((D, Fh), (D, Fh), (Fh, D))]
    x_RD, dy_RD = torch.randn(R, D, generator=g).requires_grad_(), torch.randn(R, D, generator=g)
    tmp = tempfile.mkdtemp()
    mods = load_baseline(args.baseline, tmp, args.repo) if args.baseline else None

    def dense():
        for t in (*w, x_RD):
            t.grad = None
        ((F.silu(x_RD @ w[0]) * (x_RD @ w[1])) @ w[2]).backward(dy_RD)

    def moe(swap):
        def step():
            with Swap(layer, mods) if swap else nullcontext():
                layer.zero_grad(set_to_none=True)
                xg = x_TD.detach().requires_grad_()
                layer(xg).backward(dy_TD)
        return step

    rows = {"dense": dense, "ours": moe(False)}
    if mods:
        rows["baseline"] = moe(True)
    names = list(rows)
    barrier = (lambda: dist.barrier()) if world > 1 else (lambda: None)
    for _ in range(args.warmup):
        for n in names:
            barrier()
            rows[n]()
    times = {n: [] for n in names}
    for it in range(args.iters):
        for n in names[it % len(names):] + names[:it % len(names)]:  # rotate the order every iteration
            barrier()
            t0 = time.perf_counter()
            rows[n]()
            times[n].append(time.perf_counter() - t0)
    if world > 1:
        for n in names:
            t = torch.tensor(times[n], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            times[n] = t.tolist()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for n in names[1:]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                barrier()
                rows[n]()
            if rank == 0:
                with open(f"{args.profile}.{n}.txt", "w") as fh:
                    fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    return times


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = rank_body(rank, world, args)
        if rank == 0:
            queue.put(out)
    finally:
        dist.destroy_process_group()


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.world == 1:
        times = rank_body(0, 1, args)
    else:
        q = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_worker, args=(args.world, _free_port(), args, q), nprocs=args.world, start_method="spawn")
        times = q.get()
    print(f"E={args.experts} K={args.top_k} F={args.hidden} D={args.dim} T={args.tokens}/rank W={args.world} "
          f"1 thread/rank, {args.iters} interleaved iterations, default malloc")
    for n, ts in times.items():
        ratio = [d / t for d, t in zip(times["dense"], ts)]
        print(f"  {n:9s} {spread(ts)} s   dense/{n} {spread(ratio)}")
    if "baseline" in times:
        print(f"  baseline/ours speed-up {spread([b / o for b, o in zip(times['baseline'], times['ours'])])}")
    return times


if __name__ == "__main__":
    main()
