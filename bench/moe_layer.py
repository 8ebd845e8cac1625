#!/usr/bin/env python
"""Side-by-side MoE layer benchmark: moetrain's MoELayer vs DeepSpeed-MoE vs a dense-matmul limit.

    python bench/moe_layer.py --world 2 --ep 2 --experts 8 --top-k 2 --dim 512 --hidden 1024 --tokens 4096
    python bench/moe_layer.py --world 2 --ep 2 --experts 64 --top-k 6 --dim 512 --hidden 256 --tokens 4096

One run spawns W gloo processes (one intra-op thread each) and, on the same E, K, D, F and T tokens per rank, times
forward + backward (y.backward(dy), input gradient included) of

  ours/balanced   MoELayer, expert parallel over ep ranks, dropless, router.force_balanced=true
  ours/learned    MoELayer, same, with the normal (randomly initialised) learned softmax top-k router
  ds/balanced     deepspeed.moe.layer.MoE(ep_size=ep, k=K, drop_tokens=False), inputs and gate weights crafted so
                  that its own top-k picks exactly the forced-balanced assignment (t*K + k) mod E
  ds/learned      the same DeepSpeed layer with our router's gate weights and our expert weights copied in: identical
                  routing and identical outputs (checked, max |diff| printed)
  dense           one SwiGLU on one weight set with plain matmuls: x[T*K, D] -> [D, F] x2 -> [F, D], fwd + bwd

Every layer computes the same SwiGLU experts w2(silu(w1 x) * w3 x) without biases, fp32. Each timed iteration starts
with a barrier; its time is the slowest rank's; the figure is the median over --iters after --warmup iterations.
Useful FLOPs per rank = 3 (fwd + bwd) * T*K * 3 matmuls * 2*D*F; padding (DeepSpeed pads every expert to the busiest
expert's load when it does not drop) and routing/permutation work count as overhead, not as useful work.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import queue as queue_mod
import socket
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

ALL_IMPLS = ("dense", "ours/balanced", "ours/learned", "ds/balanced", "ds/learned")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="gloo processes (W)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: W)")
    p.add_argument("--experts", type=int, default=8, help="E, global experts")
    p.add_argument("--top-k", type=int, default=2, help="K")
    p.add_argument("--dim", type=int, default=512, help="D, model dim")
    p.add_argument("--hidden", type=int, default=1024, help="F, expert hidden dim")
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per rank")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--impls", default=",".join(ALL_IMPLS), help="comma list out of " + ",".join(ALL_IMPLS))
    p.add_argument("--malloc", choices=("default", "tuned"), default="default",
                   help="tuned: every rank raises glibc's mmap and trim thresholds (mallopt) before it allocates, so "
                        "large freed blocks are reused instead of being unmapped and page-faulted in again; applies "
                        "to every row alike")
    p.add_argument("--profile", default=None, help="also write a torch.profiler table of ours/<routing> to this file")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.ep = args.ep or args.world
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [s for s in args.impls if s not in ALL_IMPLS]
    if bad:
        p.error(f"unknown impl(s) {bad}; choose from {ALL_IMPLS}")
    if args.world % args.ep or args.experts % args.ep:
        p.error("--ep must divide --world and --experts")
    if args.top_k > args.experts:
        p.error("--top-k must be <= --experts")
    return args


def useful_flops(T: int, K: int, D: int, Fh: int) -> int:
    return 3 * T * K * 3 * 2 * D * Fh


# ----------------------------------------------------------------------------------------------------------- timing
def time_steps(step, warmup: int, iters: int) -> list[float]:
    """Per-iteration seconds (slowest rank) of step(); a barrier before each iteration."""
    for _ in range(warmup):
        dist.barrier()
        step()
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ------------------------------------------------------------------------------------------------------ the layers
class SwiGLUExpert(nn.Module):
    """DeepSpeed's expert module: w2(silu(w1 x) * w3 x), no biases (the same shape as moetrain's experts)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def balanced_ids(T: int, E: int, K: int) -> torch.Tensor:
    return (torch.arange(T * K) % E).view(T, K)


def craft_balanced(x_TD: torch.Tensor, E: int, K: int):
    """Inputs and gate weights whose softmax top-k is exactly (t*K + k) mod E: gate row e reads feature e."""
    x = x_TD.clone()
    x[:, :E] = 0.0
    ids = balanced_ids(x.shape[0], E, K)
    x.scatter_(1, ids, (8.0 - 0.25 * torch.arange(K, dtype=x.dtype)).expand(x.shape[0], K).contiguous())
    gate_ED = torch.zeros(E, x.shape[1])
    gate_ED[torch.arange(E), torch.arange(E)] = 1.0
    return x, gate_ED


def build_ours(args, ctx, force_balanced: bool):
    from moetrain.config.schema import RouterConfig
    from moetrain.parallel.moe_layer import build_moe_layer

    torch.manual_seed(0)
    layer = build_moe_layer(args.dim, args.hidden, args.experts, 0,
                            RouterConfig(top_k=args.top_k, force_balanced=force_balanced), layer_id=0, ep_group=ctx.ep_group)
    layer.reset_parameters(0.02, 0.02 / 2 ** 0.5, seed=0)
    return layer


def build_deepspeed(args, ours_layer, gate_ED=None):
    from deepspeed.moe.layer import MoE

    moe = MoE(args.dim, SwiGLUExpert(args.dim, args.hidden), num_experts=args.experts, ep_size=args.ep, k=args.top_k,
              capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False,
              top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(gate_ED if gate_ED is not None else ours_layer.router.gate.weight)
        for l, ex in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            ex.w1.weight.copy_(ours_layer.experts.w1_EDF[l].t())
            ex.w3.weight.copy_(ours_layer.experts.w3_EDF[l].t())
            ex.w2.weight.copy_(ours_layer.experts.w2_EFD[l].t())
    moe.train()
    return moe


# ------------------------------------------------------------------------------------------------------- the body
def rank_body(rank: int, world: int, args) -> dict:
    import deepspeed  # DS_ACCELERATOR=cpu was set by main() before the processes were spawned

    from moetrain.parallel.mesh import ParallelContext, build_groups

    want_ds = any(s.startswith("ds/") for s in args.impls)
    if want_ds:
        # Wraps the existing gloo group; the first call ever JIT-compiles DeepSpeed's shm op (~50 s), untimed.
        deepspeed.init_distributed(dist_backend="gloo")
    ctx = build_groups(ParallelContext(ep=args.ep))
    T, K, E, D, Fh = args.tokens, args.top_k, args.experts, args.dim, args.hidden
    flops = useful_flops(T, K, D, Fh)
    g = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(T, D, generator=g)
    dy_TD = torch.randn(T, D, generator=g)
    xb_TD, gate_bal_ED = craft_balanced(x_TD, E, K) if D >= E else (None, None)
    res: dict = {"times": {}, "checks": {}, "notes": {}}

    def record(name, step):
        res["times"][name] = time_steps(step, args.warmup, args.iters)

    if "dense" in args.impls:
        R = T * K
        w1 = (torch.randn(D, Fh, generator=g) * 0.02).requires_grad_()
        w3 = (torch.randn(D, Fh, generator=g) * 0.02).requires_grad_()
        w2 = (torch.randn(Fh, D, generator=g) * 0.02).requires_grad_()
        x_RD = torch.randn(R, D, generator=g).requires_grad_()
        dy_RD = torch.randn(R, D, generator=g)

        def dense_step():
            for t in (w1, w2, w3, x_RD):
                t.grad = None
            ((F.silu(x_RD @ w1) * (x_RD @ w3)) @ w2).backward(dy_RD)

        record("dense", dense_step)
        del w1, w2, w3, x_RD, dy_RD

    last_record = {}  # the routing record of the latest step of ours

    def ours_step_fn(layer, x):
        def step():
            layer.zero_grad(set_to_none=True)
            xg = x.detach().requires_grad_()
            y, last_record["ours"] = layer(xg[None], return_record=True)
            y.backward(dy_TD[None])
        return step

    learned_layer = None
    for routing in ("balanced", "learned"):
        name = f"ours/{routing}"
        if name in args.impls or (routing == "learned" and "ds/learned" in args.impls):
            layer = build_ours(args, ctx, force_balanced=(routing == "balanced"))
            if routing == "learned":
                learned_layer = layer
            if name in args.impls:
                record(name, ours_step_fn(layer, x_TD))
                counts = last_record["ours"].tokens_per_local_expert_L
                res["notes"][name] = {"rows_per_local_expert_min_max": [int(counts.min()), int(counts.max())]}
                if args.profile and rank == 0:
                    from torch.profiler import ProfilerActivity, profile
                    step = ours_step_fn(layer, x_TD)
                    with profile(activities=[ProfilerActivity.CPU]) as prof:
                        step()
                    with open(f"{args.profile}.{routing}.txt", "w") as fh:
                        fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
                elif args.profile:
                    ours_step_fn(layer, x_TD)()

    if "ds/balanced" in args.impls:
        if xb_TD is None:
            res["notes"]["ds/balanced"] = "skipped: needs --dim >= --experts to craft the balanced inputs"
        else:
            ref = learned_layer if learned_layer is not None else build_ours(args, ctx, False)
            moe = build_deepspeed(args, ref, gate_bal_ED)

            def ds_bal_step():
                moe.zero_grad(set_to_none=True)
                xg = xb_TD.detach().requires_grad_()
                moe(xg[None])[0].backward(dy_TD[None])

            record("ds/balanced", ds_bal_step)
            counts = moe.deepspeed_moe.exp_counts
            res["checks"]["ds/balanced_counts_equal"] = bool((counts == counts[0]).all()) and int(counts[0]) == T * K // E
            del moe

    if "ds/learned" in args.impls:
        moe = build_deepspeed(args, learned_layer)
        with torch.no_grad():  # same routing, same weights: same outputs
            y_ours = learned_layer(x_TD[None])
            y_ds = moe(x_TD[None])[0]
        res["checks"]["ds_vs_ours_max_abs_diff"] = float((y_ours - y_ds).abs().max())
        # ... and the same gradients (input, and the first local expert's w1), one fwd+bwd each.
        xo, xd = x_TD.clone().requires_grad_(), x_TD.clone().requires_grad_()
        learned_layer.zero_grad(set_to_none=True)
        learned_layer(xo[None]).backward(dy_TD[None])
        moe(xd[None])[0].backward(dy_TD[None])
        gw_ds = moe.deepspeed_moe.experts.deepspeed_experts[0].w1.weight.grad.t()
        res["checks"]["ds_vs_ours_grad_max_abs_diff"] = max(
            float((xo.grad - xd.grad).abs().max()), float((learned_layer.experts.w1_EDF.grad[0] - gw_ds).abs().max()))
        res["checks"]["output_max_abs"] = float(y_ours.abs().max())

        def ds_step():
            moe.zero_grad(set_to_none=True)
            xg = x_TD.detach().requires_grad_()
            moe(xg[None])[0].backward(dy_TD[None])

        record("ds/learned", ds_step)
        cap = int(moe.deepspeed_moe.exp_counts.max())
        c = torch.tensor([cap])
        dist.all_reduce(c, op=dist.ReduceOp.MAX)
        res["notes"]["ds/learned"] = {"capacity_rows_per_expert": int(c), "mean_rows_per_expert": T * K // E}

    for key in ("ds_vs_ours_max_abs_diff", "ds_vs_ours_grad_max_abs_diff"):
        if key in res["checks"]:
            v = torch.tensor([res["checks"][key]])
            dist.all_reduce(v, op=dist.ReduceOp.MAX)
            res["checks"][key] = float(v)
    res["flops_per_rank"] = flops
    return res


# ------------------------------------------------------------------------------------------------------ processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tune_glibc_malloc() -> bool:
    """Keep freed large blocks in the heap (no munmap + page faults on the next allocation). glibc only."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        if args.malloc == "tuned" and not tune_glibc_malloc():
            raise RuntimeError("--malloc tuned needs glibc's mallopt")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, True, pickle.dumps(rank_body(rank, world, args))))
    except BaseException:  # noqa: BLE001
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args) -> dict:
    # Only this benchmark's processes see the CPU accelerator setting (inherited by the spawned ranks).
    os.environ["DS_ACCELERATOR"] = "cpu"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, queue)) for r in range(args.world)]
    for p in procs:
        p.start()
    results, err = {}, None
    try:
        while len(results) < args.world and err is None:
            try:
                rank, ok, payload = queue.get(timeout=5)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    err = f"rank(s) {dead} died (exit codes {[procs[r].exitcode for r in dead]})"
                continue
            if not ok:
                err = f"rank {rank} failed:\n{payload}"
                break
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if err else 120)
            if p.is_alive():
                p.kill()
    if err:
        raise SystemExit(err)
    return results[0]


def summarize(args, res: dict) -> dict:
    flops = res["flops_per_rank"]
    rows = {}
    for name in ALL_IMPLS:
        if name in res["times"]:
            t = statistics.median(res["times"][name])
            rows[name] = {"median_s": t, "gflops_per_rank": flops / t / 1e9, "times_s": res["times"][name]}
    ratios = {}

    def ratio(a, b):
        if a in rows and b in rows:
            ratios[f"{a} / {b}"] = rows[a]["gflops_per_rank"] / rows[b]["gflops_per_rank"]

    for routing in ("balanced", "learned"):
        ratio(f"ours/{routing}", f"ds/{routing}")
    for routing in ("balanced", "learned"):
        ratio(f"ours/{routing}", "dense")
    for routing in ("balanced", "learned"):
        ratio(f"ds/{routing}", "dense")
    shape = dict(world=args.world, ep=args.ep, experts=args.experts, top_k=args.top_k, dim=args.dim,
                 hidden=args.hidden, tokens_per_rank=args.tokens, warmup=args.warmup, iters=args.iters,
                 threads_per_rank=1, dtype="float32", malloc=args.malloc)
    return dict(shape=shape, useful_flops_per_rank=flops, results=rows, ratios=ratios, checks=res["checks"],
                notes=res["notes"],
                ds_config=dict(drop_tokens=False, capacity_factor=1.0, min_capacity=0, use_rts=False,
                               top2_2nd_expert_sampling=False, accelerator="cpu", backend="gloo"),
                torch=torch.__version__)


def print_table(s: dict) -> None:
    sh = s["shape"]
    print(f"\nMoE layer fwd+bwd, W={sh['world']} ep={sh['ep']} E={sh['experts']} K={sh['top_k']} D={sh['dim']} "
          f"F={sh['hidden']} T={sh['tokens_per_rank']}/rank, fp32, 1 thread/rank, median of {sh['iters']} "
          f"(+{sh['warmup']} warm-up), malloc={sh['malloc']}")
    print(f"useful work per rank = 3*T*K*3*2*D*F = {s['useful_flops_per_rank'] / 1e9:.2f} GFLOP (SwiGLU, fwd+bwd); "
          "same expert math, shapes and tokens for every row")
    print(f"{'impl':<16}{'median ms':>11}{'GFLOP/s/rank':>14}   notes")
    for name, r in s["results"].items():
        note = s["notes"].get(name, "")
        if isinstance(note, dict) and "rows_per_local_expert_min_max" in note:
            lo, hi = note["rows_per_local_expert_min_max"]
            note = f"rank 0 rows per local expert {lo}..{hi}"
        elif isinstance(note, dict) and "capacity_rows_per_expert" in note:
            note = (f"padded to {note['capacity_rows_per_expert']} rows per expert "
                    f"(mean load {note['mean_rows_per_expert']})")
        print(f"{name:<16}{r['median_s'] * 1e3:>11.1f}{r['gflops_per_rank']:>14.1f}   {note}")
    print("ratios (useful GFLOP/s):")
    for k, v in s["ratios"].items():
        print(f"  {k:<28}{v:>6.2f}x")
    if s["checks"]:
        print("checks:", ", ".join(f"{k}={v}" for k, v in s["checks"].items()))
    print("like with like: ds/learned uses our router's gate and expert weights (same routing, outputs checked);\n"
          "ds/balanced sees inputs crafted so its top-k is our forced-balanced assignment; DeepSpeed runs dropless "
          "(drop_tokens=False: every expert padded to the busiest expert's load over the ep group).")


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = summarize(args, run(args))
    print_table(summary)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=2)
    return summary


if __name__ == "__main__":
    sys.exit(main() and 0)
