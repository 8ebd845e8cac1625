"""The deduplicated all-to-all against the dispatcher it replaced, interleaved in the same processes.

    python bench/dedup_alltoall.py --before 4fcaa46 [--experts 64 --top-k 6 --tokens 4096 --dim 512 --hidden 256]

The "before" dispatcher is moetrain/parallel/dispatch/alltoall.py at git revision --before (one row per routed copy,
regroup / restore copies at the destination), loaded from `git show` into a temporary module for this measurement
only. Both dispatchers serve the SAME MoE layer (same router, weights, tokens): each iteration runs one forward +
backward with each, in alternating order, after a barrier; a time is the slowest rank's. Reported: rows sent per step
and rank (before: one per routed copy; after: one per (token, destination rank, chunk)), and per variant the median
forward+backward seconds of each repetition, with the median and spread (min-max) over repetitions, and the ratio
before/after per iteration pair (median, min-max).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moetrain.config.schema import RouterConfig  # noqa: E402
from moetrain.parallel.moe_layer import build_moe_layer  # noqa: E402
from moetrain.utils.local_ranks import run_distributed  # noqa: E402


def load_old_module(rev: str, tmpdir: str):
    """The previous dispatcher: `rev` is a git revision, or the path of a saved copy of the module."""
    if Path(rev).is_file():
        src = Path(rev).read_text()
    else:
        src = subprocess.run(["git", "show", f"{rev}:moetrain/parallel/dispatch/alltoall.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    path = Path(tmpdir) / "alltoall_before.py"
    path.write_text(src)
    return import_file(path)


def import_file(path):
    spec = importlib.util.spec_from_file_location("alltoall_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["alltoall_before"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def fwd_bwd(layer, x, dy, bf16: bool) -> float:
    xi = x.clone().requires_grad_()
    dist.barrier()
    t0 = time.perf_counter()
    with torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext():
        y = layer(xi[None])
    y.float().backward(dy[None])
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    layer.zero_grad(set_to_none=True)
    return elapsed.item()


def worker(rank, world, args, old_path):
    old = import_file(old_path)
    torch.manual_seed(0)
    router = RouterConfig(top_k=args.top_k)
    layer = build_moe_layer(args.dim, args.hidden, args.experts, 0, router, layer_id=1, ep_group=dist.group.WORLD,
                            pipeline_degree=str(args.degree))
    layer.reset_parameters(0.02, 0.02, seed=0)
    variants = {"after": layer.dispatcher,
                "before": old.AllToAllDispatcher(args.experts, dist.group.WORLD, pipeline_degree=str(args.degree))}
    g = torch.Generator().manual_seed(rank)
    x, dy = torch.randn(args.tokens, args.dim, generator=g), torch.randn(args.tokens, args.dim, generator=g)
    rows = {}
    for name, d in variants.items():  # rows leaving this rank in one forward
        layer.dispatcher = d
        plans = []
        original = d.plan
        d.plan = lambda *a, _o=original, **kw: plans.append(_o(*a, **kw)) or plans[-1]
        with torch.no_grad():
            layer(x[None])
        d.plan = original
        p = plans[0]
        rows[name] = sum(p.rows_sent) if name == "after" else sum(p.send_splits)
    times = {name: [] for name in variants}
    order = list(variants)
    for it in range(args.warmup + args.reps * args.iters):
        for name in (order if it % 2 == 0 else order[::-1]):
            layer.dispatcher = variants[name]
            t = fwd_bwd(layer, x, dy, args.bf16)
            if it >= args.warmup:
                times[name].append(t)
    return dict(rows=rows, times=times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True,
                   help="git revision of the previous dispatcher (or a saved copy of its alltoall.py)")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--degree", type=int, default=1)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        load_old_module(args.before, tmp)
        results = run_distributed(worker, args.world, args, str(Path(tmp) / "alltoall_before.py"), timeout=3600)
    print(f"E={args.experts} K={args.top_k} T={args.tokens}/rank D={args.dim} F={args.hidden} W={args.world} "
          f"degree={args.degree} bf16={args.bf16}")
    for name in ("before", "after"):
        print(f"rows sent per rank per forward, {name}: {[r['rows'][name] for r in results]}")
    before, after = sum(r["rows"]["before"] for r in results), sum(r["rows"]["after"] for r in results)
    print(f"volume cut: {before / after:.2f}x ({before} -> {after} rows over all ranks)")
    times = results[0]["times"]  # slowest-rank times, identical on every rank
    n = args.iters
    for name in ("before", "after"):
        per_rep = [statistics.median(times[name][i * n:(i + 1) * n]) for i in range(args.reps)]
        print(f"{name:6s} fwd+bwd s: median {statistics.median(per_rep):.4f}  reps {[round(t, 4) for t in per_rep]}")
    ratios = [b / a for b, a in zip(times["before"], times["after"])]
    print(f"before/after per iteration pair: median {statistics.median(ratios):.3f}  "
          f"min {min(ratios):.3f}  max {max(ratios):.3f}  (n={len(ratios)})")


if __name__ == "__main__":
    main()
