"""Pipelined all-to-all, before and after the scheduled backward: forward+backward of one expert-parallel MoE layer
at every pipeline degree under both schedules, against compute alone and communication alone, and what `auto` picks.

    python bench/overlap.py [--experts 8] [--top-k 2] [--dim 512] [--hidden 1024] [--tokens 4096]
                            [--iters 5] [--netns-rate 2gbit]

Every variant runs once per iteration, in turn, inside the same 2 gloo processes (one thread each), so load from
other work on the machine lands on all of them alike; each figure is the median over iterations of the slowest rank's
seconds, with the spread (min-max). Variants:
  * `autograd n`: the schedule before moetrain/moe/overlap.py (the layer's chunk loop with torch's autograd
    all-to-all, whose backward waits inside each node: re-created here for the comparison);
  * `scheduled n`: the layer as it is (moetrain/moe/overlap.py);
  * `compute`: the same expert work without communication (each rank a one-process layer with its E/W experts and
    T tokens: the same rows per expert under forced-balanced routing);
  * `comm`: the four token all-to-alls of a step (dispatch, combine and their gradients), one after another;
  * `auto`: a layer with pipeline_degree=auto, run as training runs it until the tuner decides (its trial steps
    interleaved with the iterations), then timed like the others.
`--netns-rate R` (root) runs everything in a network namespace whose loopback is limited to R with tc tbf.
"""

from __future__ import annotations

import argparse
import json
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
from moetrain.moe.routers import RouteContext  # noqa: E402
from moetrain.parallel.moe_layer import build_moe_layer  # noqa: E402
from moetrain.utils.local_ranks import run_distributed  # noqa: E402


def autograd_schedule(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """The layer's chunk loop as it was before the scheduled exchange (routed experts only: the benchmark layer has
    no shared experts): torch's autograd all-to-all in both directions."""
    B, S, D = x_BSD.shape
    x_TD = x_BSD.reshape(B * S, D)
    d = layer.dispatcher
    routed = layer.router(x_TD, RouteContext((B, S), None, None, d.expert_location_E()))
    plan = d.plan(routed.topk_idx_TK, routed.gates_TK, keep_TK=routed.keep_TK)
    x_RD = d.dispatch_preprocess(x_TD, plan)
    in_flight = [d.dispatch_comm(x_RD, plan, c) for c in range(plan.num_chunks)]
    outs = []
    with layer.experts.materialize() as weights:
        for c in range(plan.num_chunks):
            x_c, tokens_c, experts_c = d.dispatch_postprocess(in_flight[c], plan, c)
            y_c = layer.experts.compute(x_c, tokens_c, weights, experts_c)
            outs.append(d.combine_comm(d.combine_preprocess(y_c, plan, c), plan, c))
    y_RD = outs[0] if len(outs) == 1 else torch.cat(outs)
    return d.combine_postprocess(y_RD, plan).view(B, S, D)


def timed(fn) -> float:
    """fn() after a barrier; the slowest rank's seconds."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - t0])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def worker(rank, world, args):
    g = torch.Generator().manual_seed(rank)
    T, D = args.tokens, args.dim
    x = torch.randn(1, T, D, generator=g)
    dy = torch.randn(1, T, D, generator=g)
    L = args.experts // world
    degrees = [n for n in (1, 2, 4, 8) if n <= L]

    def make(degree, ep_group=dist.group.WORLD, experts=args.experts):
        torch.manual_seed(0)
        layer = build_moe_layer(D, args.hidden, experts, 0, RouterConfig(top_k=args.top_k, force_balanced=True),
                                layer_id=1, ep_group=ep_group, pipeline_degree=degree)
        layer.reset_parameters(0.02, 0.02, seed=0)
        return layer

    layers = {n: make(str(n)) for n in degrees}
    compute_layer = make("1", ep_group=None, experts=L)  # one-process layer: E/W experts, no communication
    auto = make("auto")

    def fwd_bwd(layer, forward):
        xi = x.clone().requires_grad_()
        forward(layer, xi).backward(dy)
        layer.zero_grad(set_to_none=True)

    def as_layer(layer, xi):
        return layer(xi)

    rows_moved = T * args.top_k  # rows leaving a rank per direction (forced-balanced: (W-1)/W of them cross)
    send = torch.randn(rows_moved, D)
    recv = torch.empty_like(send)

    def comm_alone():
        for _ in range(4):  # dispatch, combine, combine's gradient, dispatch's gradient
            dist.all_to_all_single(recv, send)

    variants = {}
    for n in degrees:
        variants[f"autograd {n}"] = lambda n=n: fwd_bwd(layers[n], autograd_schedule)
        variants[f"scheduled {n}"] = lambda n=n: fwd_bwd(layers[n], as_layer)
    variants["compute"] = lambda: fwd_bwd(compute_layer, as_layer)
    variants["comm"] = comm_alone
    times = {name: [] for name in [*variants, "auto"]}
    tuner, auto_steps = auto.dispatcher.tuner, 0
    for it in range(args.warmup + args.iters):
        for name, fn in variants.items():
            t = timed(fn)
            if it >= args.warmup:
                times[name].append(t)
        if tuner.chosen is None:  # the trial phase, as training runs it (forward + backward, then after_step)
            for _ in range(args.tuner_steps_per_iter):
                fwd_bwd(auto, as_layer)
                auto.after_step(auto_steps, None, None)
                auto_steps += 1
                if tuner.chosen is not None:
                    break
        elif it >= args.warmup:
            times["auto"].append(timed(lambda: fwd_bwd(auto, as_layer)))
    while tuner.chosen is None and auto_steps < 200:  # finish the trial phase if the iterations did not
        fwd_bwd(auto, as_layer)
        auto.after_step(auto_steps, None, None)
        auto_steps += 1
    return {"times": times, "auto": tuner.chosen, "auto_trial_steps": auto_steps,
            "auto_medians": {n: m for n, m in zip(tuner.candidates, tuner.medians().tolist())}}


def summarise(res: dict, args) -> dict:
    med = {k: statistics.median(v) for k, v in res["times"].items() if v}
    spread = {k: (min(v), max(v)) for k, v in res["times"].items() if v}
    bound = max(med["compute"], med["comm"])
    sched = {k: v for k, v in med.items() if k.startswith("scheduled")}
    best = min(sched, key=sched.get)
    auto_fixed = med[f"scheduled {res['auto']}"]
    return {"config": vars(args), "median_s": med, "spread_s": spread, "bound_s": bound,
            "best": best, "best_over_bound": med[best] / bound, "auto": res["auto"],
            "auto_trial_steps": res["auto_trial_steps"], "auto_medians": res["auto_medians"],
            "auto_pick_over_best": auto_fixed / med[best]}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--tuner-steps-per-iter", type=int, default=3)
    p.add_argument("--netns-rate", default=None, help="e.g. 2gbit (root): a rate-limited network namespace")
    p.add_argument("--label", default="plain loopback")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    if args.netns_rate:
        ns = f"moetrain-overlap-{os.getpid()}"
        setup = [["ip", "netns", "add", ns], ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
                 ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate",
                  args.netns_rate, "burst", "256kb", "latency", "50ms"]]
        i = argv.index("--netns-rate") if "--netns-rate" in argv else None
        inner = argv[:i] + argv[i + 2:] if i is not None else [a for a in argv if not a.startswith("--netns-rate")]
        try:
            for c in setup:
                subprocess.run(c, check=True)
            return subprocess.run(["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), *inner,
                                   "--label", args.netns_rate]).returncode
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    res = run_distributed(worker, 2, args, timeout=3600)[0]
    out = summarise(res, args)
    print(f"E={args.experts} K={args.top_k} D={args.dim} F={args.hidden} T={args.tokens}/rank, 2 ranks, "
          f"{args.label}, median of {args.iters} (min-max)")
    for k, v in out["median_s"].items():
        lo, hi = out["spread_s"][k]
        print(f"  {k:<12} {v:7.3f} s  ({lo:.3f}-{hi:.3f})  / max(compute, comm) = {v / out['bound_s']:.2f}")
    print(f"  best scheduled: {out['best']} ({out['best_over_bound']:.2f}x the bound); auto picked "
          f"{out['auto']} after {out['auto_trial_steps']} trial steps: {out['auto_pick_over_best']:.3f}x the best")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
