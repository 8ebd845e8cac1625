"""`moetrain-sim`: predict a training step's time, breakdown and per-rank memory on a cluster.

    moetrain-sim [--cluster h100|h200|a100|v100|cpu|FILE.json] [--gpus N] [--routing SOURCE] [--compare]
                 [--hierarchical] [OVERRIDE ...]
    moetrain-sim calibrate [--world 2] [--netns-rate 2gbit] [--out FILE.json]
    moetrain-sim sweep [--cluster h100] [--routing SOURCE] [--sizes 8,16,...,2048] [--out DIR] [OVERRIDE ...]

OVERRIDEs are moetrain-train's (`model=olmoe_like parallel.ep=8 parallel.pipeline_degree=4 data.seq_len=4096`):
the layout is the config's parallel.* keys at world size N, checked by the same validator as a launch. SOURCE:
balanced | zipf:S[:shuffle] | trace:RUN_DIR_OR_METRICS_JSONL[:LAYER]. `--compare` adds expert parallelism at
each pipeline degree and FSSDP at the same size; `sweep` writes the step time and breakdown per mode and the best
layout for each world size as JSON and figures. Bad input prints `moetrain-sim: error: ...` and exits with 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Optional, Sequence

PROG = "moetrain-sim"


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    return 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every moetrain console tool
        raise SystemExit(_fail(message))


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--cluster", default="h100", help="preset (h100, h200, a100, v100, cpu) or a calibration JSON")
    p.add_argument("--gpus", type=int, default=8, help="world size (devices)")
    p.add_argument("--routing", default="balanced", help="balanced | zipf:S[:shuffle] | trace:PATH[:LAYER]")
    p.add_argument("--step", type=int, default=0, help="with a trace: which logged step to replay")
    p.add_argument("--compare", action="store_true", help="also EP at each pipeline degree and FSSDP at this size")
    p.add_argument("--hierarchical", action="store_true",
                   help="two-level all-to-all across nodes (what 2DH would give; moetrain runs the flat one)")
    p.add_argument("overrides", nargs="*", help="moetrain-train overrides (model=..., parallel.ep=..., ...)")
    return p


def _setup(args):
    from moetrain.config.compose import compose_config
    from moetrain.sim.cluster import load_cluster
    from moetrain.sim.routing import parse_routing

    if args.gpus < 1:
        raise ValueError(f"--gpus {args.gpus}: the world size must be >= 1")
    cluster = load_cluster(args.cluster)
    cfg = compose_config(args.overrides)
    routing = parse_routing(args.routing, cfg.model.num_experts) if cfg.model.num_experts else None
    return cfg, cluster, routing


def format_prediction(p) -> str:
    from moetrain.sim.step import BREAKDOWN
    from moetrain.train.memory_plan import format_plan

    lines = [f"{p.layout} on {p.world} x {p.cluster}: {p.step * 1e3:.1f} ms per step "
             f"({p.micro_batches} micro-batch{'es' if p.micro_batches > 1 else ''} per rank, "
             f"{p.tokens_per_s:,.0f} tokens/s)"]
    lines.append("  breakdown (ms per step; communication as if alone on the wire, exposed_comm is what the step "
                 "waits for):")
    for k in BREAKDOWN:
        lines.append(f"    {k:<16}{p.parts[k] * 1e3:>12.2f}")
    if p.moe:
        x = p.moe[0]
        extra = sum(r - 1 for r in x.replicas)
        lines.append(f"  first MoE layer: expert rows per rank max/mean {x.rows_max_over_mean:.3f}, "
                     f"{extra} replica{'s' if extra != 1 else ''} placed (most per expert: {max(x.replicas)})")
    lines.append(format_plan(p.memory))
    lines.append(f"  fits {p.memory.total.total / 2**30:.1f} GiB into the device's memory: {'yes' if p.fits else 'NO'}")
    return "\n".join(lines)


def predict_main(argv: Sequence[str]) -> int:
    from moetrain.config.validate import ConfigError
    from moetrain.sim.step import simulate
    from moetrain.sim.sweep import with_layout

    args = _parser().parse_args(argv)
    try:
        cfg, cluster, routing = _setup(args)
        if routing is None:
            raise ValueError("the model has no MoE layers (model.num_experts=0): nothing to simulate")
        p = simulate(cfg, args.gpus, cluster, routing, step=args.step, hierarchical=args.hierarchical)
        print(format_prediction(p))
        if args.compare:
            E, W = cfg.model.num_experts, args.gpus
            ep = cfg.parallel.ep if cfg.parallel.mode == "ep" else max(e for e in range(1, E + 1)
                                                                         if E % e == 0 and W % e == 0)
            rows = [(f"ep={ep} degree={n}", with_layout(cfg, W, "ep", ep, n)) for n in (1, 2, 4, 8) if n <= E // ep]
            if E % W == 0 and W > 1:
                rows.append((f"fssdp budget={cfg.parallel.fssdp.budget}",
                             with_layout(cfg, W, "fssdp", budget=cfg.parallel.fssdp.budget)))
            print(f"\n{'layout':<24}{'ms/step':>10}{'exposed comm':>14}{'GiB/rank':>10}")
            for name, c in rows:
                c = dataclasses.replace(c, data=cfg.data)
                q = simulate(c, W, cluster, routing, step=args.step, hierarchical=args.hierarchical)
                print(f"{name:<24}{q.step * 1e3:>10.1f}{q.parts['exposed_comm'] * 1e3:>14.1f}"
                      f"{q.memory.total.total / 2**30:>10.1f}")
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    return 0


def sweep_main(argv: Sequence[str]) -> int:
    from moetrain.config.validate import ConfigError
    from moetrain.sim.plots import run_sweep

    p = _Parser(prog=f"{PROG} sweep", description="step time per mode and the best layout, 8 to 2048 devices")
    p.add_argument("--cluster", default="h100")
    p.add_argument("--routing", default="zipf:1.0:shuffle")
    p.add_argument("--sizes", default="8,16,32,64,128,256,512,1024,2048")
    p.add_argument("--out", default="docs/figures/scaling")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        return _fail(f"--sizes {args.sizes}: write comma-separated integers, e.g. 8,64,512")
    try:
        ns = argparse.Namespace(gpus=max(sizes), cluster=args.cluster, routing=args.routing,
                                overrides=args.overrides)
        cfg, cluster, routing = _setup(ns)
        if routing is None:
            raise ValueError("the model has no MoE layers (model.num_experts=0): nothing to simulate")
        run_sweep(cfg, cluster, routing, sizes, args.out)
    except (ConfigError, ValueError) as e:
        return _fail(str(e))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "calibrate":
        from moetrain.sim.calibrate import main as calibrate_main

        return calibrate_main(argv[1:], prog=f"{PROG} calibrate")
    if argv and argv[0] == "sweep":
        return sweep_main(argv[1:])
    try:
        return predict_main(argv)
    except SystemExit as e:
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
