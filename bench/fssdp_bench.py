"""FSSDP vs expert parallelism under realistic routing skew, side by side in the same processes.

    python bench/fssdp_bench.py                       # the suite (every scenario below), 2 ranks
    python bench/fssdp_bench.py --quick               # smaller shape, fewer iterations (a few minutes here)
    python bench/fssdp_bench.py --scenarios zipf1.2-shuffled,drift-step --budget 2 --iters 9 [--out FILE.json]

W gloo ranks (one thread each) hold the same MoE layer twice: expert parallel (ep = W, experts contiguous) and FSSDP
(experts sharded over the W ranks, hot ones replicated per step from the predicted load, under the cost model and
the fallback of parallel/fssdp/placement.py). Both see exactly the same routing: a synthetic router draws each
token's K distinct experts from a popularity p_e given by the scenario (seeded by scenario, step and rank); gates come
from the layer's real router scores so that gradients flow as in training. Scenarios:

    zipf{S}-colocated   p_j ∝ 1/(j+1)^S at expert id j: the hot experts sit together on rank 0 (EP's worst case)
    zipf{S}-shuffled    the same popularity at a fixed random permutation of the ids (hot experts anywhere)
    drift-step          Zipf 1.2 at a new random permutation every step (popularity changes completely each step)
    drift-{N}           ... a new permutation every N steps
    drift-walk          log-popularity random walk: log p_e += N(0, 0.3^2) every step, from Zipf 1.2 shuffled
    trace               per-expert counts replayed step by step from a real run (bench/fssdp_trace_tiny.json: the
                        tiny model's `moe/layer{L}/tokens_per_expert` metrics, see its "command"; from its step 31)
    uniform             p_e = 1/E (balanced routing)
    NAME+cal            NAME with FSSDP's prediction blended with the step's own routing (`calibrate`)

Each step: both modes run forward+backward, interleaved (order flipped every step), after a barrier; the step time
is the slowest rank's; after the step every rank all-reduces the counts and FSSDP's `after_step` observes the load
and places the next step, as the trainer does (its time is not counted: it is the same small CPU work for any
placement). The first --warmup steps are untimed (they also fill FSSDP's load window).

Reported per scenario: median step time of each mode and the speed ratio EP/FSSDP as the median of per-step ratios
(min..max over steps: the spread); rows computed per rank, max over ranks / mean, per step (median over steps);
FSSDP's replicas per step and its fallback budget; spAG + spRS MB per rank per step (mean over ranks).
`run_fssdp_suite(quick)` returns the same as a dict with a markdown table (moetrain-bench calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moetrain.config.schema import FSSDPConfig, RouterConfig  # noqa: E402
from moetrain.moe.layer import MoELayer  # noqa: E402
from moetrain.moe.routers import RouterOutput  # noqa: E402
from moetrain.parallel.moe_layer import build_moe_layer  # noqa: E402
from moetrain.utils.local_ranks import run_distributed  # noqa: E402

TRACE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fssdp_trace_tiny.json")
TRACE_START = 30  # replay from the trace's step 31 (layer 1): past the first steps' extreme swings
SUITE = ("zipf0.8-colocated", "zipf1.2-colocated", "zipf1.6-colocated", "zipf0.8-shuffled", "zipf1.2-shuffled",
         "zipf1.6-shuffled", "drift-step", "drift-step+cal", "drift-10", "drift-walk", "trace", "trace+cal", "uniform")
DESCRIPTIONS = {
    "colocated": "Zipf {s}, hot experts together on rank 0",
    "shuffled": "Zipf {s}, hot experts at random ids (fixed)",
    "drift-step": "Zipf 1.2, new random ids every step",
    "drift-N": "Zipf 1.2, new random ids every {n} steps",
    "drift-walk": "log-popularity random walk (sigma 0.3 per step)",
    "trace": "replayed per-expert counts of a real run (tiny model)",
    "uniform": "uniform popularity (balanced)",
}


# --------------------------------------------------------------------------------------------------- routing
def zipf(E: int, s: float) -> torch.Tensor:
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** s
    return p / p.sum()


def permutation(E: int, seed: int) -> torch.Tensor:
    return torch.randperm(E, generator=torch.Generator().manual_seed(seed))


def load_trace(path: str = TRACE) -> list[list[float]]:
    """Per-step per-expert counts of the trace (all its layers, one after another)."""
    with open(path) as f:
        data = json.load(f)
    return [step for layer in data["layers"] for step in layer["tokens_per_expert"]]


class Popularity:
    """p_E of a scenario at a step (the same on every rank and in both modes)."""

    def __init__(self, name: str, E: int):
        self.name, self.E = name, E
        self.trace = load_trace() if name == "trace" else None
        if self.trace is not None and len(self.trace[0]) != E:
            raise ValueError(f"the trace has {len(self.trace[0])} experts; run with --experts {len(self.trace[0])}")
        self._walk: dict[int, torch.Tensor] = {}

    def __call__(self, step: int) -> torch.Tensor:
        name, E = self.name, self.E
        if name == "uniform":
            return torch.full((E,), 1.0 / E, dtype=torch.float64)
        if name.startswith("zipf"):
            s, layout = name[4:].split("-")
            p = zipf(E, float(s))
            return p if layout == "colocated" else p[torch.argsort(permutation(E, 0))]
        if name == "drift-walk":
            if not self._walk:
                self._walk[0] = zipf(E, 1.2)[torch.argsort(permutation(E, 0))].log()
            for t in range(len(self._walk), step + 1):
                g = torch.Generator().manual_seed(10_000 + t)
                self._walk[t] = self._walk[t - 1] + 0.3 * torch.randn(E, generator=g, dtype=torch.float64)
            return torch.softmax(self._walk[step], 0)
        if name.startswith("drift-"):
            every = 1 if name == "drift-step" else int(name.split("-")[1])
            return zipf(E, 1.2)[torch.argsort(permutation(E, 1 + step // every))]
        if name == "trace":
            c = torch.tensor(self.trace[(TRACE_START + step) % len(self.trace)], dtype=torch.float64) + 1e-3
            return c / c.sum()
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SUITE)} (zipf{{S}}-colocated|shuffled, "
                         "drift-{N})")


def draw_topk(p_E: torch.Tensor, T: int, K: int, seed: int) -> torch.Tensor:
    """K distinct experts per token, drawn without replacement from p."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(p_E.expand(T, -1), K, replacement=False, generator=g)


def synthetic_router(layer: MoELayer, topk_source) -> None:
    router = layer.router

    def forward(x_TD, ctx=None):  # the MoE layer passes its RouteContext; this router needs none of it
        logits = torch.nn.functional.linear(x_TD.float(), router.gate.weight.float())
        scores = torch.softmax(logits, -1)
        topk = topk_source()
        gates = scores.gather(1, topk)
        gates = gates / gates.sum(-1, keepdim=True)
        counts = torch.bincount(topk.flatten(), minlength=scores.shape[1]).float()
        return RouterOutput(topk, gates, scores, logits, counts)

    router.forward = forward


# ------------------------------------------------------------------------------------------------- one scenario
def build(args, mode: str, calibrate: bool = False) -> MoELayer:
    """mode: ep | fssdp (the configured cost model and fallback) | fssdp_rows (flops_per_byte=0, no fallback: the
    placement before the cost model, balancing rows only)."""
    torch.manual_seed(0)
    cfg = None
    if mode == "fssdp":
        cfg = FSSDPConfig(budget=args.budget, rematerialize=args.rematerialize, window=args.window,
                          flops_per_byte=args.flops_per_byte, fallback=not args.no_fallback, calibrate=calibrate)
    elif mode == "fssdp_rows":
        cfg = FSSDPConfig(budget=args.budget, rematerialize=args.rematerialize, window=args.window,
                          flops_per_byte=0.0, fallback=False, calibrate=calibrate)
    layer = build_moe_layer(args.dim, args.hidden, args.experts, 0, RouterConfig(top_k=args.top_k), layer_id=1,
                            ep_group=dist.group.WORLD, fssdp=cfg)
    torch.manual_seed(1)
    layer.reset_parameters(0.02, 0.02, seed=0)
    return layer


def run_scenario(rank: int, world: int, args, scenario: str) -> dict:
    """Both modes on one scenario, interleaved step by step; per-step records (slowest rank, all ranks' rows)."""
    calibrate = scenario.endswith("+cal")
    popularity = Popularity(scenario.removesuffix("+cal"), args.experts)
    current = {"topk": None}
    modes = ("ep", "fssdp", "fssdp_rows") if args.compare_rows_only else ("ep", "fssdp")
    layers = {m: build(args, m, calibrate) for m in modes}
    for layer in layers.values():
        synthetic_router(layer, lambda: current["topk"])
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.dim, generator=g)
    dy = torch.randn(args.tokens, args.dim, generator=g)
    rec = {m: {"time": [], "rows_max_over_mean": []} for m in layers}
    for m in modes[1:]:
        rec[m].update(replicas=[], budget=[], sparse_MB=[])
    for i in range(args.warmup + args.iters):
        current["topk"] = draw_topk(popularity(i), args.tokens, args.top_k, seed=1_000_003 * i + rank)
        for name in modes[i % len(modes):] + modes[:i % len(modes)]:  # interleaved, rotating: load hits all alike
            layer = layers[name]
            state = getattr(layer.experts, "state", None)
            layer.zero_grad(set_to_none=True)
            if state is not None:
                state.bytes_gathered = 0
            xi = x.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            y, record = layer(xi[None], return_record=True)
            y.backward(dy[None])
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step waits for the slowest rank
            rows = [torch.zeros(1) for _ in range(world)]
            dist.all_gather(rows, record.tokens_per_local_expert_L.sum().float().reshape(1))
            counts = record.tokens_per_expert_E.double()
            dist.all_reduce(counts)
            if state is not None:  # what the trainer does after every step: observe the load, place the next step
                sent_t = torch.tensor([float(state.bytes_gathered)])
                dist.all_reduce(sent_t)
                sent = sent_t.item() / world  # spAG bytes sent, mean over ranks
                replicas = sum(state.placement.num_replicas()) - args.experts  # the placement this step used
                budget = state.controller.budget
                state.after_step(i + 1, counts, list(layer.experts.parameters()), None)
            if i < args.warmup:
                continue
            r = rec[name]
            r["time"].append(elapsed.item())
            rows_W = [float(t) for t in rows]
            r["rows_max_over_mean"].append(max(rows_W) / max(1e-9, statistics.mean(rows_W)))
            if state is not None:
                r["replicas"].append(replicas)
                r["budget"].append(budget)
                r["sparse_MB"].append((sent + (sent / 2 if args.rematerialize else sent)) / 2**20)  # + spRS
    return rec


def worker(rank: int, world: int, args, scenarios: list[str]) -> dict:
    return {s: run_scenario(rank, world, args, s) for s in scenarios}


# --------------------------------------------------------------------------------------------------- summary
def describe(scenario: str) -> str:
    if scenario.endswith("+cal"):
        return describe(scenario.removesuffix("+cal")) + "; FSSDP calibrated (`parallel.fssdp.calibrate=true`)"
    if scenario.startswith("zipf"):
        s, layout = scenario[4:].split("-")
        return DESCRIPTIONS[layout].format(s=s)
    if scenario.startswith("drift-") and scenario not in DESCRIPTIONS:
        return DESCRIPTIONS["drift-N"].format(n=scenario.split("-")[1])
    return DESCRIPTIONS[scenario]


def summarize(scenario: str, rec: dict) -> dict:
    """rec: rank 0's records (times are already the slowest rank's, rows already every rank's)."""
    ep, fs = rec["ep"], rec["fssdp"]
    ratios = [a / b for a, b in zip(ep["time"], fs["time"])]
    extra = {}
    if "fssdp_rows" in rec:
        fr = rec["fssdp_rows"]
        rows_ratios = [a / b for a, b in zip(ep["time"], fr["time"])]
        extra = {"fssdp_rows_s": statistics.median(fr["time"]), "speedup_rows_only": statistics.median(rows_ratios),
                 "speedup_rows_only_lo": min(rows_ratios), "speedup_rows_only_hi": max(rows_ratios),
                 "rows_max_over_mean_fssdp_rows": statistics.median(fr["rows_max_over_mean"]),
                 "replicas_mean_rows_only": statistics.mean(fr["replicas"])}
    return {**extra, "scenario": scenario, "description": describe(scenario),
            "ep_s": statistics.median(ep["time"]), "fssdp_s": statistics.median(fs["time"]),
            "speedup": statistics.median(ratios), "speedup_lo": min(ratios), "speedup_hi": max(ratios),
            "rows_max_over_mean_ep": statistics.median(ep["rows_max_over_mean"]),
            "rows_max_over_mean_fssdp": statistics.median(fs["rows_max_over_mean"]),
            "replicas_mean": statistics.mean(fs["replicas"]), "budget_mean": statistics.mean(fs["budget"]),
            "sparse_MB": statistics.mean(fs["sparse_MB"]), "steps": len(ratios)}


def markdown(rows: list[dict]) -> str:
    old = "speedup_rows_only" in rows[0]
    head = ("| routing | EP s | FSSDP s | EP/FSSDP (min..max) | rows max/mean EP | FSSDP | replicas/step | "
            "budget (mean) | spAG+spRS MB |")
    if old:
        head += " EP/FSSDP rows-only placement (min..max) | its rows max/mean | its replicas/step |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['description']} (`{r['scenario']}`) | {r['ep_s']:.3f} | {r['fssdp_s']:.3f} | "
                f"**{r['speedup']:.2f}x** ({r['speedup_lo']:.2f}..{r['speedup_hi']:.2f}) | "
                f"{r['rows_max_over_mean_ep']:.2f} | {r['rows_max_over_mean_fssdp']:.2f} | "
                f"{r['replicas_mean']:.1f} | {r['budget_mean']:.1f} | {r['sparse_MB']:.1f} |")
        if old:
            line += (f" {r['speedup_rows_only']:.2f}x ({r['speedup_rows_only_lo']:.2f}..{r['speedup_rows_only_hi']:.2f})"
                     f" | {r['rows_max_over_mean_fssdp_rows']:.2f} | {r['replicas_mean_rows_only']:.1f} |")
        out.append(line)
    return "\n".join(out)


def busy_warning(rows: list[dict]) -> Optional[str]:
    """The per-step ratio of two modes doing the same work (uniform routing) should be ~1; a wide spread anywhere
    means other processes loaded the machine unevenly during the run."""
    wide = [r["scenario"] for r in rows if r["speedup_hi"] / r["speedup_lo"] > 1.5]
    if wide:
        return (f"per-step EP/FSSDP ratios spread more than 1.5x in {', '.join(wide)}: the machine was busy; "
                "trust the medians only roughly")
    return None


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--scenarios", default=",".join(SUITE), help="comma-separated (module doc)")
    p.add_argument("--budget", type=int, default=2, help="FSSDP: extra experts a rank may materialize")
    p.add_argument("--window", type=int, default=FSSDPConfig.window, help="FSSDP: steps of load history")
    p.add_argument("--flops-per-byte", type=float, default=FSSDPConfig.flops_per_byte,
                   help="FSSDP cost model (0: copies free, the placement before the cost model)")
    p.add_argument("--no-fallback", action="store_true", help="FSSDP: keep the full budget whatever the regret")
    p.add_argument("--rematerialize", action="store_true")
    p.add_argument("--compare-rows-only", action="store_true",
                   help="a third mode, interleaved too: FSSDP placing by rows only (flops_per_byte=0, no fallback)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--iters", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="D=256 F=512 T=2048/rank, 7 timed steps")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.dim, args.hidden, args.tokens, args.iters = 256, 512, 2048, 7
    if args.experts % args.world:
        p.error(f"--experts {args.experts} must be a multiple of --world {args.world}")
    return args


def run(args) -> dict:
    scenarios = [s for s in args.scenarios.split(",") if s]
    for s in scenarios:
        Popularity(s.removesuffix("+cal"), args.experts)(0)  # unknown names and a trace of another expert count fail here, before spawning
    results = run_distributed(worker, args.world, args, scenarios, timeout=3600)  # one thread per rank, gloo
    rows = [summarize(s, results[0][s]) for s in scenarios]
    config = {k: getattr(args, k) for k in ("world", "experts", "top_k", "dim", "hidden", "tokens", "budget", "window",
                                            "flops_per_byte", "warmup", "iters", "rematerialize",
                                            "compare_rows_only")}
    config.update(fallback=not args.no_fallback, device="cpu", backend="gloo", threads_per_rank=1)
    return {"config": config, "rows": rows, "markdown": markdown(rows), "busy_warning": busy_warning(rows)}


def run_fssdp_suite(quick: bool) -> dict:
    """The whole suite on 2 gloo ranks (quick: smaller shape, fewer steps); returns config, rows (one dict per
    scenario: ep_s, fssdp_s, speedup with speedup_lo..speedup_hi, rows max/mean per mode, replicas_mean,
    budget_mean, sparse_MB), a markdown table and a busy-machine warning (None when the spread looked clean)."""
    return run(parse(["--quick"] if quick else []))


def main(argv=None) -> int:
    args = parse(argv)
    out = run(args)
    c = out["config"]
    print(f"W={c['world']} E={c['experts']} K={c['top_k']} D={c['dim']} F={c['hidden']} T={c['tokens']}/rank "
          f"budget={c['budget']} window={c['window']} flops_per_byte={c['flops_per_byte']} fallback={c['fallback']} "
          f"remat={c['rematerialize']}; warm-up {c['warmup']}, {c['iters']} timed steps, fp32, 1 thread/rank, gloo")
    print(out["markdown"])
    if out["busy_warning"]:
        print("WARNING:", out["busy_warning"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
