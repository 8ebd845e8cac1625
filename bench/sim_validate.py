"""The scaling simulator against our own CPU benchmarks: predicted vs measured, one script.

    python bench/sim_validate.py [--iters 7] [--warmup 2] [--netns-rate 2gbit ...] [--out FILE.json]
    python bench/sim_validate.py --from-json docs/figures/scaling/validation.json    # re-predict, no measuring
    python bench/sim_validate.py --published                                        # predicted vs published

Rows (fp32, one thread per rank, gloo over loopback; E=8, K=2, D=512, F=1024):
  * EP vs FSSDP (budget 2) under Zipf 1.2 routing with the hot experts on rank 0, 2 ranks x 4096 tokens and 4 ranks
    x 2048 tokens: bench/fssdp_bench.py's `zipf1.2-colocated` scenario, stepped here by `FSSDPBenchMode`;
  * pipelining degrees 1, 2, 4 with forced-balanced routing, 2 ranks x 4096 tokens (bench/pipeline.py's set-up) on
    plain loopback and, as root, on a loopback rate-limited with tc (`--netns-rate`, may be repeated).

Every measurement of a run happens in the same W processes, interleaved iteration by iteration and rotated in order
so that the machine's load hits all alike: the benchmark rows and the calibration probes the prediction is made
from (moetrain/sim/calibrate.py: fp32 matmul, moetrain's grouped SwiGLU, a tensor copy, the permutation path of the
all-to-all dispatcher without its all-to-all, and gloo all_to_all_single at two sizes).
An iteration's time is the slowest rank's; reported: median and [min, max] over the timed iterations. The prediction
is `moetrain.sim.layer.moe_layer` on a `Cluster` built from the probes' medians of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from moetrain.sim.calibrate import Probes, cluster_from_probes  # noqa: E402
from moetrain.sim.layer import moe_layer  # noqa: E402
from moetrain.sim.routing import topk_distinct_share, zipf  # noqa: E402

E, K, D, F = 8, 2, 512, 1024  # the probes' shapes too (moetrain/sim/calibrate.py)
NETNS = "moetrain-sim-validate"


# ---------------------------------------------------------------------------------------------- benches
def _pipeline_layers(world: int):
    from moetrain.config.schema import RouterConfig
    from moetrain.parallel.moe_layer import build_moe_layer

    layers = {}
    for degree in [n for n in (1, 2, 4, 8) if n <= E // world]:
        torch.manual_seed(0)
        layer = build_moe_layer(D, F, E, 0, RouterConfig(top_k=K, force_balanced=True), layer_id=1,
                                ep_group=dist.group.WORLD, pipeline_degree=str(degree))
        layer.reset_parameters(0.02, 0.02, seed=0)
        layers[f"degree {degree}"] = layer
    return layers


class FSSDPBenchMode:
    """One mode (EP or FSSDP) of bench/fssdp_bench.py's `zipf{S}-colocated` scenario (its `build`, `Popularity`,
    `draw_topk` and synthetic router), stepped as its `run_scenario` steps it: forward + backward timed on the slowest
    rank, then the global counts and FSSDP's `after_step` (untimed)."""

    def __init__(self, rank: int, world: int, tokens: int, zipf_s: float, fssdp: bool):
        from fssdp_bench import Popularity, build, draw_topk, synthetic_router
        from moetrain.config.schema import FSSDPConfig

        args = argparse.Namespace(experts=E, top_k=K, dim=D, hidden=F, tokens=tokens, budget=2, rematerialize=False,
                                  window=FSSDPConfig.window, flops_per_byte=FSSDPConfig.flops_per_byte,
                                  no_fallback=False)
        self.rank, self.tokens, self.draw_topk = rank, tokens, draw_topk
        self.layer = build(args, "fssdp" if fssdp else "ep")
        self.popularity = Popularity(f"zipf{zipf_s:g}-colocated", E)
        self.topk = None
        synthetic_router(self.layer, lambda: self.topk)
        g = torch.Generator().manual_seed(rank)
        self.x, self.dy = torch.randn(tokens, D, generator=g), torch.randn(tokens, D, generator=g)

    def step(self, i: int) -> float:
        import time

        self.topk = self.draw_topk(self.popularity(i), self.tokens, K, seed=1_000_003 * i + self.rank)
        self.layer.zero_grad(set_to_none=True)
        x = self.x.clone().requires_grad_()
        dist.barrier()
        t0 = time.perf_counter()
        y, record = self.layer(x[None], return_record=True)
        y.backward(self.dy[None])
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        counts = record.tokens_per_expert_E.double()
        dist.all_reduce(counts)
        state = getattr(self.layer.experts, "state", None)
        if state is not None:
            state.after_step(i + 1, counts, list(self.layer.experts.parameters()), None)
        return elapsed.item()


def worker(rank, world, args):
    torch.manual_seed(rank)
    probes = Probes(rank, world, args.tokens)
    if args.bench == "fssdp":
        modes = {"EP": FSSDPBenchMode(rank, world, args.tokens, args.zipf, fssdp=False),
                 "FSSDP": FSSDPBenchMode(rank, world, args.tokens, args.zipf, fssdp=True)}

        def step(name, i):
            return modes[name].step(i)
    else:
        layers = _pipeline_layers(world)
        g = torch.Generator().manual_seed(rank)
        x, dy = torch.randn(args.tokens, D, generator=g), torch.randn(args.tokens, D, generator=g)

        from pipeline import fwd_bwd_seconds

        def step(name, i):
            return fwd_bwd_seconds(layers[name], x, dy)

        modes = layers
    names = list(modes) + probes.names
    times = {n: [] for n in names}
    for i in range(args.warmup + args.iters):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:  # rotated: every item sees every position
            t = step(name, i) if name in modes else probes.run(name)
            if i >= args.warmup:
                times[name].append(t)
    return times


def run_bench(bench: str, world: int, tokens: int, args) -> dict:
    from moetrain.utils.local_ranks import run_distributed

    inner = argparse.Namespace(bench=bench, tokens=tokens, zipf=args.zipf, warmup=args.warmup, iters=args.iters)
    load_before = os.getloadavg()[0]
    times = run_distributed(worker, world, inner, timeout=3600)[0]
    return {"bench": bench, "world": world, "tokens": tokens, "times": times,
            "loadavg": [load_before, os.getloadavg()[0]]}


def in_netns(rate: str, argv: list[str]) -> dict:
    """Run the pipeline bench inside a network namespace whose loopback is limited to `rate` (tc tbf)."""
    cmds = [["ip", "netns", "add", NETNS], ["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"],
            ["ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
             "burst", "256kb", "latency", "50ms"]]
    try:
        for c in cmds:
            subprocess.run(c, check=True, capture_output=True)
        out = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, os.path.abspath(__file__), "--inner",
                              *argv], check=True, capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], check=False, capture_output=True)
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- predictions
def predict(result: dict, zipf_s: float, host_copy_bandwidth=None) -> dict:
    world, tokens, times = result["world"], result["tokens"], result["times"]
    med = {k: statistics.median(v) for k, v in times.items()}
    cluster = cluster_from_probes(med, world, tokens, host_copy_bandwidth)
    result["cluster"] = cluster.to_json()
    rows = []
    if result["bench"] == "fssdp":
        load = topk_distinct_share(zipf(E, zipf_s).steps[0][0], K)
        for name, mode in (("EP", "ep"), ("FSSDP", "fssdp")):
            p = moe_layer(cluster, world, E, K, D, F, tokens, load, mode=mode, budget=2)
            rows.append((name, p.total))
    else:
        load = torch.full((E,), 1.0 / E, dtype=torch.float64)
        for name in times:
            if name.startswith("degree"):
                p = moe_layer(cluster, world, E, K, D, F, tokens, load, degree=int(name.split()[1]))
                rows.append((name, p.total))
    out = []
    for name, predicted in rows:
        t = times[name]
        out.append({"row": name, "measured": med[name], "min": min(t), "max": max(t), "predicted": predicted,
                    "error": predicted / med[name] - 1})
    result["rows"] = out
    return result


def ratio_rows(result: dict, base: str) -> list[dict]:
    """Speed-ups over `base` (EP, degree 1): measured (ratio of medians) vs predicted."""
    by = {r["row"]: r for r in result["rows"]}
    out = []
    for r in result["rows"]:
        if r["row"] == base:
            continue
        m, p = by[base]["measured"] / r["measured"], by[base]["predicted"] / r["predicted"]
        out.append({"row": f"{r['row']} vs {base}", "measured": m, "predicted": p, "error": p / m - 1})
    return out


# ------------------------------------------------------------------------------ published set-ups
HECATE = ["model.name=gpt_moe_64", "model.vocab_size=50304", "model.dim=1024", "model.n_layers=12",
          "model.n_heads=16", "model.n_kv_heads=16", "model.ffn_hidden=4096", "model.num_experts=64",
          "model.moe_hidden=4096", "model.first_k_dense=0", "model.moe_every=2", "router.top_k=2",
          "data.seq_len=1024", "data.micro_batch_size=8", "data.global_batch_size=128", "model.max_seq_len=1024"]


def published() -> str:
    """Predicted vs published directions, each in its paper's set-up (docs/scaling.md states what is assumed)."""
    from moetrain.config.compose import compose_config
    from moetrain.sim.cluster import PRESETS
    from moetrain.sim.step import simulate
    from moetrain.sim.sweep import with_layout

    lines = ["| paper, published | set-up simulated | routing | predicted |", "|---|---|---|---|"]
    v100 = PRESETS["v100"]
    cfg = compose_config(HECATE)
    setup = ("GPT-style MoE (D=1024, 12 layers, MoE every 2nd, E=64 of F=4096, top-2, 8 x 1024 tokens per GPU, "
             "fp16) on 16 V100 = 2 nodes x 8, 100 Gbit/s per node; EP ep=16 vs FSSDP (best budget of 1, 2, 4)")
    for s_, shuffle in ((0.8, True), (1.2, True), (1.6, True), (1.2, False)):
        load = zipf(64, s_, shuffle=shuffle)
        ep = simulate(with_layout(cfg, 16, "ep", 16), 16, v100, load)
        cells = []
        for prefetch in (False, True):
            best = min((simulate(with_layout(cfg, 16, "fssdp", budget=b), 16, v100, load,
                                 prefetch_gather=prefetch).step, b) for b in (1, 2, 4))
            cells.append(f"{ep.step / best[0]:.2f}x (budget {best[1]})")
        where = "hot experts at random ids" if shuffle else "hot experts on the first GPU"
        lines.append(f"| Hecate: FSSDP 1.4-1.6x over EP | {setup} | Zipf {s_:g}, {where}; EP rows max/mean "
                     f"{ep.moe[0].rows_max_over_mean:.2f} | moetrain's FSSDP {cells[0]}; with spAG/spRS hidden "
                     f"behind compute as Hecate does {cells[1]} |")
    a100 = PRESETS["a100"]
    E_ = 128
    for D_, F_, T_ in ((1024, 1024, 16384), (2048, 2048, 16384), (4096, 4096, 8192)):
        load = torch.full((E_,), 1 / E_, dtype=torch.float64)

        def layer(n, both=True):
            return moe_layer(a100, 16, E_, 2, D_, F_, T_, load, degree=n, payload_bytes=2, backward_overlap=both)

        base, base_f = layer(1), layer(1, False)
        ours = max((base.total / layer(n).total, n) for n in (1, 2, 4, 8))
        fwd_only = max((base_f.total / layer(n, False).total, n) for n in (1, 2, 4, 8))
        fwd = max((base.forward / layer(n).forward, n) for n in (1, 2, 4, 8))
        bound = base.total / max(base.compute, base.all_to_all)
        lines.append(f"| Tutel: adaptive pipelining up to ~2x in communication-bound layers | one MoE layer, 16 A100 "
                     f"= 2 nodes x 8 (NVLink 3, 200 Gbit/s per GPU), E={E_} (8 per GPU), top-2, D={D_}, F={F_}, "
                     f"{T_} tokens per GPU, bf16; all-to-all {100 * base.all_to_all / base.total:.0f}% of degree "
                     f"1's time (perfect overlap: {bound:.2f}x) | balanced | forward {fwd[0]:.2f}x (degree "
                     f"{fwd[1]}); forward+backward {ours[0]:.2f}x (degree {ours[1]}); if the backward did not "
                     f"overlap: {fwd_only[0]:.2f}x (degree {fwd_only[1]}) |")
    return "\n".join(lines)


def markdown(results: list[dict]) -> str:
    lines = ["| set-up | row | measured s: median [min, max] | predicted s | error | load avg (start, end) |",
             "|---|---|---|---|---|---|"]
    for res in results:
        setup = res["label"]
        for r in res["rows"]:
            lines.append(f"| {setup} | {r['row']} | {r['measured']:.3f} [{r['min']:.3f}, {r['max']:.3f}] | "
                         f"{r['predicted']:.3f} | {100 * r['error']:+.0f}% | {res['loadavg'][0]:.1f}, "
                         f"{res['loadavg'][1]:.1f} |")
    lines += ["", "| set-up | speed-up | measured | predicted | error |", "|---|---|---|---|---|"]
    for res in results:
        base = "EP" if res["bench"] == "fssdp" else "degree 1"
        for r in ratio_rows(res, base):
            lines.append(f"| {res['label']} | {r['row']} | {r['measured']:.2f}x | {r['predicted']:.2f}x | "
                         f"{100 * r['error']:+.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--zipf", type=float, default=1.2)
    p.add_argument("--netns-rate", action="append", default=[], help="e.g. 2gbit (root); may be repeated")
    p.add_argument("--only", default=None, help="fssdp | pipeline: run one family")
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "figures", "scaling", "validation.json"))
    p.add_argument("--from-json", default=None, help="re-predict the measurements saved in this --out file")
    p.add_argument("--published", action="store_true", help="only the predicted-vs-published table (no measuring)")
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:  # inside the rate-limited namespace: the pipeline bench only, JSON on stdout
        print(json.dumps(run_bench("pipeline", 2, 4096, args)))
        return 0
    if args.netns_rate and os.geteuid() != 0:
        p.error("--netns-rate needs root (ip netns, tc)")
    if args.published:
        print(published())
        return 0
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        results = []
        for res in saved:
            host = None if "limited" not in res["label"] else next(
                r["cluster"]["intra"]["bandwidth"] for r in results if "plain" in r["label"])
            results.append(predict(res, args.zipf if res["bench"] == "fssdp" else 0, host_copy_bandwidth=host))
        print(markdown(results))
        return 0
    results = []
    if args.only in (None, "fssdp"):
        for world, tokens in ((2, 4096), (4, 2048)):
            res = predict(run_bench("fssdp", world, tokens, args), args.zipf)
            res["label"] = f"{world} ranks x {tokens} tokens, Zipf {args.zipf:g}, EP vs FSSDP budget 2"
            results.append(res)
            print(markdown([res]), flush=True)
    if args.only in (None, "pipeline"):
        res = predict(run_bench("pipeline", 2, 4096, args), 0)
        res["label"] = "2 ranks x 4096 tokens, balanced, plain loopback"
        results.append(res)
        print(markdown([res]), flush=True)
        host = res["cluster"]["intra"]["bandwidth"]
        inner = ["--iters", str(args.iters), "--warmup", str(args.warmup)]
        for rate in args.netns_rate:
            r = predict(in_netns(rate, inner), 0, host_copy_bandwidth=host)
            r["label"] = f"2 ranks x 4096 tokens, balanced, loopback limited to {rate}"
            results.append(r)
            print(markdown([r]), flush=True)
    print("\n" + markdown(results))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
