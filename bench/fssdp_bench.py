"""FSSDP vs expert parallelism under skewed and balanced routing, side by side in one run.

    python bench/fssdp_bench.py --world 2 --experts 8 --top-k 2 --dim 512 --hidden 1024 --tokens 4096 \\
        --zipf 1.2 --budget 2 [--rematerialize] [--iters 5] [--out FILE.json]

W gloo ranks (one thread each) run the same MoE layer twice: expert parallel (ep = W, experts contiguous) and FSSDP
(experts sharded over the W ranks, hot ones replicated per step from the predicted load). A synthetic router draws each
token's K distinct experts from a Zipf popularity p_e ∝ 1/(e+1)^s (s = --zipf; 0 = uniform), the same draw for both
modes; gates come from the layer's real router scores so that gradients flow as in training. Expert 0 is the hottest:
under EP the hot experts sit together on rank 0, EP's worst and common case (experts are numbered, not shuffled).
Before timing, FSSDP's load predictor sees `--warmup` steps of global counts, as in training. The two modes run\ninterleaved, iteration by iteration, so that machine noise hits both alike.

Reported per mode: forward+backward time (median over --iters of the slowest rank), rows computed per rank max/mean,
bytes each rank sends per step by collective (token all-to-all: dispatch + combine, forward + backward; spAG forward,
spRS backward, and the re-gather when re-materializing), and expert weight memory per rank (owned + replicas).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moetrain.config.schema import FSSDPConfig, RouterConfig  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402
from moetrain.parallel.moe_layer import build_moe_layer  # noqa: E402
from moetrain.moe.routers import RouterOutput  # noqa: E402
from moetrain.utils.local_ranks import run_distributed  # noqa: E402


def zipf_topk(T: int, E: int, K: int, s: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return torch.multinomial(p.expand(T, E), K, replacement=False, generator=g)


def synthetic_router(layer: MoELayer, topk_source):
    router = layer.router

    def forward(x_TD, ctx=None):  # the MoE layer passes its RouteContext; this router needs none of it
        logits = torch.nn.functional.linear(x_TD.float(), router.gate.weight.float())
        scores = torch.softmax(logits, -1)
        topk = topk_source(x_TD.shape[0])
        gates = scores.gather(1, topk)
        gates = gates / gates.sum(-1, keepdim=True)
        return RouterOutput(topk, gates, scores, logits, torch.bincount(topk.flatten(), minlength=scores.shape[1]).float())

    router.forward = forward


def capture_plans(layer: MoELayer, sink: list):
    inner = layer.dispatcher.plan

    def plan(*a, **k):
        p = inner(*a, **k)
        sink.append(p)
        return p

    layer.dispatcher.plan = plan


def build(args, fssdp: bool) -> MoELayer:
    torch.manual_seed(0)
    cfg = FSSDPConfig(budget=args.budget, rematerialize=args.rematerialize, window=4) if fssdp else None
    layer = build_moe_layer(args.dim, args.hidden, args.experts, 0, RouterConfig(top_k=args.top_k), layer_id=1,
                            ep_group=dist.group.WORLD, fssdp=cfg)
    torch.manual_seed(1)
    layer.reset_parameters(0.02, 0.02, seed=0)
    return layer


class Mode:
    """One layer (EP or FSSDP) with its synthetic router, stepped and measured iteration by iteration."""

    def __init__(self, rank, world, args, fssdp: bool):
        self.rank, self.world, self.args = rank, world, args
        self.layer = build(args, fssdp)
        self.iteration = 0
        synthetic_router(self.layer, lambda T: zipf_topk(T, args.experts, args.top_k, args.zipf,
                                                         seed=1000 * self.iteration + rank))
        self.plans: list = []
        capture_plans(self.layer, self.plans)
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(args.tokens, args.dim, generator=g)
        self.dy = torch.randn(args.tokens, args.dim, generator=g)
        self.times, self.rows, self.bytes_a2a, self.bytes_sparse = [], [], [], []

    def step(self, i: int, measure: bool) -> None:
        layer, args = self.layer, self.args
        self.iteration = i
        layer.zero_grad(set_to_none=True)
        state = getattr(layer.experts, "state", None)
        if state is not None:
            state.bytes_gathered = 0
        x = self.x.clone().requires_grad_()
        dist.barrier()
        t0 = time.perf_counter()
        y, record = layer(x[None], return_record=True)
        y.squeeze(0).backward(self.dy)
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
        counts = record.tokens_per_expert_E.double()
        dist.all_reduce(counts)
        if state is not None:  # what the trainer does after every step: observe the load, place the next step
            state.after_step(i + 1, counts, list(layer.experts.parameters()), None)
        if not measure:
            return
        self.times.append(elapsed.item())
        self.rows.append(record.tokens_per_local_expert_L.sum().item())
        plan = self.plans[-1]
        sent_rows = sum(n for w, n in enumerate(plan.send_splits) if w != self.rank)
        self.bytes_a2a.append(4 * sent_rows * args.dim * 4)  # dispatch + combine, forward + backward, fp32
        if state is not None:
            gathered = state.bytes_gathered  # forward spAG (+ the backward re-gather when re-materializing)
            forward = gathered // 2 if args.rematerialize else gathered
            self.bytes_sparse.append(gathered + forward)  # + spRS in backward: the forward gather's volume

    def summary(self) -> dict:
        args, state = self.args, getattr(self.layer.experts, "state", None)
        per_expert = 3 * args.dim * args.hidden * 4
        if state is not None:
            mem = len(state.placement.materialized(self.rank)) * per_expert  # owned + replicas, resident in forward
            replicas = state.placement.num_replicas()
        else:
            mem, replicas = args.experts // self.world * per_expert, [1] * args.experts
        return {"time_s": statistics.median(self.times), "rows": statistics.mean(self.rows),
                "bytes_a2a": statistics.mean(self.bytes_a2a),
                "bytes_sparse": statistics.mean(self.bytes_sparse) if self.bytes_sparse else 0,
                "expert_mem_bytes": mem, "replicas": replicas}


def worker(rank, world, args):
    modes = {"ep": Mode(rank, world, args, fssdp=False), "fssdp": Mode(rank, world, args, fssdp=True)}
    for i in range(args.warmup + args.iters):
        order = ("ep", "fssdp") if i % 2 == 0 else ("fssdp", "ep")  # interleaved: drift hits both alike
        for name in order:
            modes[name].step(i, measure=i >= args.warmup)
    return {name: m.summary() for name, m in modes.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent of expert popularity; 0 = uniform")
    p.add_argument("--budget", type=int, default=2, help="FSSDP: extra experts a rank may materialize")
    p.add_argument("--rematerialize", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.experts % args.world:
        p.error(f"--experts {args.experts} must be a multiple of --world {args.world}")

    results = run_distributed(worker, args.world, args, timeout=1800)  # one thread per rank, gloo

    summary = {"args": vars(args)}
    print(f"W={args.world} E={args.experts} K={args.top_k} D={args.dim} F={args.hidden} T={args.tokens}/rank "
          f"zipf={args.zipf} budget={args.budget} remat={args.rematerialize}")
    print(f"{'mode':<6} {'fwd+bwd s':>10} {'rows max/mean':>14} {'a2a MB/rank':>12} {'spAG+spRS MB':>13} "
          f"{'expert MB max':>14}")
    for mode in ("ep", "fssdp"):
        per_rank = [results[r][mode] for r in range(args.world)]
        rows = [r["rows"] for r in per_rank]
        s = {"time_s": per_rank[0]["time_s"], "rows_max_over_mean": max(rows) / (sum(rows) / len(rows)),
             "a2a_MB_mean": statistics.mean(r["bytes_a2a"] for r in per_rank) / 2**20,
             "sparse_MB_mean": statistics.mean(r["bytes_sparse"] for r in per_rank) / 2**20,
             "expert_MB_max": max(r["expert_mem_bytes"] for r in per_rank) / 2**20,
             "replicas": per_rank[0]["replicas"]}
        summary[mode] = s
        print(f"{mode:<6} {s['time_s']:>10.3f} {s['rows_max_over_mean']:>14.3f} {s['a2a_MB_mean']:>12.1f} "
              f"{s['sparse_MB_mean']:>13.1f} {s['expert_MB_max']:>14.1f}")
    speedup = summary["ep"]["time_s"] / summary["fssdp"]["time_s"]
    summary["fssdp_speedup"] = speedup
    print(f"FSSDP speed-up over EP (time ratio EP / FSSDP): {speedup:.2f}x; replicas per expert: "
          f"{summary['fssdp']['replicas']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
