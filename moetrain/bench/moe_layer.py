"""MoE layer forward+backward, every variant alternated iteration by iteration in the same processes.

    python -m moetrain.bench.moe_layer --experts 64 --top-k 6 --hidden 256 [--tokens 4096] [--world 2]
                                       [--reps 3 --iters 5 --warmup 2] [--malloc tuned] [--device cuda] [--out F]

Variants (same E, K, D, F, T tokens per rank, SwiGLU experts w2(silu(w1 x) * w3 x) without biases):

  dense          the limit: one SwiGLU with plain matmuls on T*K rows, x_RD @ w1_DF, x_RD @ w3_DF, (.) @ w2_FD: the
                 same useful FLOPs as the MoE layer, no routing, no communication
  ours           build_moe_layer: expert parallel over the W ranks, dropless, learned (randomly initialised) router
  ours/balanced  the same with router.force_balanced (every expert the same number of rows)
  ds/dropping    deepspeed.moe.layer.MoE in its usual configuration: capacity_factor 1.0, drop_tokens=True (each
                 expert keeps at most ceil(K*T/E) rows per rank, the rest are dropped); our router's gate and our
                 expert weights copied in, so it routes like `ours` before dropping
  ds/dropless    the same with drop_tokens=False: nothing dropped, every expert padded to the busiest expert's
                 load over the ep group; its outputs are checked against ours (max |diff| in the notes)

Useful FLOPs per rank = 3 (fwd + bwd) * T*K rows * 3 matmuls * 2*D*F; a ratio "a / b" is time_b / time_a of the
same iteration (equal useful work: the throughput ratio), summarised over all iterations. DeepSpeed runs on CPU only
(DS_ACCELERATOR=cpu, deepspeed.init_distributed on the gloo group, set_deepspeed_parallelism; no engine); its rows
are skipped on CUDA and where it is not importable.

Legend: T tokens per rank, K experts per token, E experts, D model dim, F expert hidden dim, R = T*K routed rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import machine
from .interleave import Plan, analyse, reduce_max_fn, run_interleaved
from .ranks import RankEnv, spawn

ALL_VARIANTS = ("dense", "ours", "ours/balanced", "ds/dropping", "ds/dropless")
SPEED_PAIRS = [("ours", "dense"), ("ours/balanced", "dense"), ("ours", "ds/dropping"), ("ours", "ds/dropless"),
               ("ds/dropping", "dense"), ("ds/dropless", "dense")]


@dataclass
class MoEBenchConfig:
    experts: int = 8  # E
    top_k: int = 2  # K
    hidden: int = 1024  # F
    dim: int = 512  # D
    tokens: int = 4096  # T per rank
    world: int = 2
    plan: Plan = field(default_factory=Plan)
    device: str = "cpu"
    malloc: str = "default"
    variants: tuple = ALL_VARIANTS

    def validate(self) -> None:
        if self.experts % self.world:
            raise ValueError(f"experts={self.experts} must be a multiple of world={self.world} (expert parallelism)")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..experts={self.experts}")
        bad = [v for v in self.variants if v not in ALL_VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}; choose from {ALL_VARIANTS}")
        if self.malloc not in ("default", "tuned") or self.device not in ("cpu", "cuda"):
            raise ValueError("malloc must be default|tuned and device cpu|cuda")

    @property
    def label(self) -> str:
        return f"E={self.experts} K={self.top_k} F={self.hidden} D={self.dim} T={self.tokens}"


def useful_flops(cfg: MoEBenchConfig) -> int:
    return 3 * cfg.tokens * cfg.top_k * 3 * 2 * cfg.dim * cfg.hidden


class SwiGLUExpert(nn.Module):
    """DeepSpeed's expert module: w2(silu(w1 x) * w3 x), no biases (the same math as moetrain's experts)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_ours(cfg: MoEBenchConfig, env: RankEnv, force_balanced: bool):
    from moetrain.config.schema import RouterConfig
    from moetrain.parallel.moe_layer import build_moe_layer

    torch.manual_seed(0)
    layer = build_moe_layer(cfg.dim, cfg.hidden, cfg.experts, 0,
                            RouterConfig(top_k=cfg.top_k, force_balanced=force_balanced), layer_id=0,
                            ep_group=env.group)
    layer.reset_parameters(0.02, 0.02 / 2 ** 0.5, seed=0)
    return layer.to(env.device)


def build_deepspeed(cfg: MoEBenchConfig, ours, drop_tokens: bool):
    """DeepSpeed-MoE with our router's gate and our (local) experts' weights copied in."""
    from deepspeed.moe.layer import MoE

    moe = MoE(cfg.dim, SwiGLUExpert(cfg.dim, cfg.hidden), num_experts=cfg.experts, ep_size=cfg.world, k=cfg.top_k,
              capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=drop_tokens, use_rts=False,
              top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        for l, ex in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            ex.w1.weight.copy_(ours.experts.w1_EDF[l].t())
            ex.w3.weight.copy_(ours.experts.w3_EDF[l].t())
            ex.w2.weight.copy_(ours.experts.w2_EFD[l].t())
    moe.train()
    return moe


def _sum_over_ranks(xs: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(xs, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def rank_body(rank: int, world: int, cfg: MoEBenchConfig) -> dict:
    env = RankEnv.setup(rank, world, cfg.device, cfg.malloc)
    T, K, E, D, Fh = cfg.tokens, cfg.top_k, cfg.experts, cfg.dim, cfg.hidden
    dev = env.device
    g = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(T, D, generator=g).to(dev)
    dy_TD = torch.randn(T, D, generator=g).to(dev)
    notes: dict = {}
    steps: dict = {}
    wanted = list(cfg.variants)

    def layer_step(layer, x, unwrap=lambda out: out):
        def step():
            layer.zero_grad(set_to_none=True)
            xg = x.detach().requires_grad_()
            with env.autocast():
                y = unwrap(layer(xg[None]))
            y.float().backward(dy_TD[None])
        return step

    if "dense" in wanted:
        R = T * K
        w1_DF = (torch.randn(D, Fh, generator=g) * 0.02).to(dev).requires_grad_()
        w3_DF = (torch.randn(D, Fh, generator=g) * 0.02).to(dev).requires_grad_()
        w2_FD = (torch.randn(Fh, D, generator=g) * 0.02).to(dev).requires_grad_()
        x_RD = torch.randn(R, D, generator=g).to(dev).requires_grad_()
        dy_RD = torch.randn(R, D, generator=g).to(dev)

        def dense_step():
            for t in (w1_DF, w3_DF, w2_FD, x_RD):
                t.grad = None
            with env.autocast():
                y_RD = (F.silu(x_RD @ w1_DF) * (x_RD @ w3_DF)) @ w2_FD
            y_RD.float().backward(dy_RD)

        steps["dense"] = dense_step

    ours = build_ours(cfg, env, force_balanced=False)
    if "ours" in wanted:
        steps["ours"] = layer_step(ours, x_TD)
    if "ours/balanced" in wanted:
        steps["ours/balanced"] = layer_step(build_ours(cfg, env, force_balanced=True), x_TD)

    ds_wanted = [v for v in wanted if v.startswith("ds/")]
    ds_layers = {}
    if ds_wanted:
        skip = None
        if env.cuda:
            skip = "skipped: DeepSpeed rows are measured on CPU only"
        else:
            try:
                import deepspeed
            except Exception as e:  # noqa: BLE001 - optional dependency
                skip = f"skipped: deepspeed not importable ({type(e).__name__})"
        if skip:
            for v in ds_wanted:
                notes[v] = skip
        else:
            # Wraps the existing gloo group; the first call ever JIT-compiles DeepSpeed's shm op, untimed.
            deepspeed.init_distributed(dist_backend="gloo")
            for v in ds_wanted:
                ds_layers[v] = build_deepspeed(cfg, ours, drop_tokens=(v == "ds/dropping"))
                steps[v] = layer_step(ds_layers[v], x_TD, unwrap=lambda out: out[0])
            if "ds/dropless" in ds_layers:
                with torch.no_grad():
                    diff = float((ours(x_TD[None]) - ds_layers["ds/dropless"](x_TD[None])[0]).abs().max())
                notes["ds/dropless vs ours: max |output diff|"] = max(reduce_max_fn()([diff]))

    load_before = machine.load_average()
    result = run_interleaved(steps, cfg.plan, barrier=env.barrier, reduce_max=reduce_max_fn(), sync=env.sync)
    load_after = machine.load_average()

    # What each DeepSpeed configuration did with the rows of its last step.
    for v, moe in ds_layers.items():
        counts_E = moe.deepspeed_moe.exp_counts.to(torch.float64)
        if v == "ds/dropping":
            cap = math.ceil(T / E * 1.0 * K)
            dropped, total = _sum_over_ranks([float((counts_E - cap).clamp(min=0).sum()), float(T * K)])
            notes[v] = f"capacity {cap} rows per expert per rank; {dropped / total:.1%} of routed rows dropped"
        else:
            cap = max(reduce_max_fn()([float(counts_E.max())]))
            notes[v] = f"every expert padded to {int(cap)} rows (mean load {T * K // E})"
    if "ours" in steps:
        from moetrain.moe.layer import MoELayer  # noqa: F401 - the record's type

        with torch.no_grad():
            _, rec = ours(x_TD[None], return_record=True)
        counts = getattr(rec, "tokens_per_local_expert_L", None)
        if counts is not None:
            notes["ours"] = f"rank {rank} rows per local expert {int(counts.min())}..{int(counts.max())}"
    return {"times": result["times"], "orders": result["orders"], "notes": notes, "load_before": load_before,
            "load_after": load_after}


def run(cfg: MoEBenchConfig) -> dict:
    """Spawn the ranks, time the variants interleaved, return the analysed result (JSON-able)."""
    cfg.validate()
    if cfg.device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's accelerator for the spawned benchmark ranks
    res = spawn(rank_body, cfg.world, cfg)[0]
    flops = useful_flops(cfg)
    analysis = analyse(res["times"], SPEED_PAIRS)
    for name, s in analysis["variants"].items():
        s["gflops_per_rank"] = flops / s["median"] / 1e9
    return {"kind": "moe_layer", "config": {**asdict(cfg), "variants": list(res["times"])}, "label": cfg.label,
            "useful_flops_per_rank": flops, **analysis, "notes": res["notes"], "load_before": res["load_before"],
            "load_after": res["load_after"], "times": res["times"]}


def format_result(r: dict) -> str:
    c = r["config"]
    p = c["plan"]
    lines = [f"MoE layer fwd+bwd {r['label']}, W={c['world']} {c['device']}, malloc={c['malloc']}, "
             f"{p['reps']} reps x {p['iters']} iterations (+{p['warmup']} warm-up), interleaved",
             f"{'variant':<15}{'median ms':>10}{'IQR ms':>16}{'min..max ms':>18}{'GFLOP/s/rank':>14}"]
    for name, s in r["variants"].items():
        lines.append(f"{name:<15}{s['median'] * 1e3:>10.1f}{s['q25'] * 1e3:>8.1f}..{s['q75'] * 1e3:<6.1f}"
                     f"{s['min'] * 1e3:>10.1f}..{s['max'] * 1e3:<7.1f}{s['gflops_per_rank']:>12.1f}")
    lines.append("per-iteration speed ratios (a / b = time_b / time_a): median [IQR] {min..max}")
    for name, s in r["ratios"].items():
        lines.append(f"  {name:<28}{s['median']:>6.2f} [{s['q25']:.2f}..{s['q75']:.2f}] {{{s['min']:.2f}..{s['max']:.2f}}}")
    for k, v in r["notes"].items():
        lines.append(f"  note {k}: {v}")
    lines.append(f"  load average before {r['load_before']} after {r['load_after']}")
    lines += [f"  WARNING {w}" for w in r["warnings"]]
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[MoEBenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks (W), expert parallel over all of them")
    p.add_argument("--experts", type=int, default=8, help="E")
    p.add_argument("--top-k", type=int, default=2, help="K")
    p.add_argument("--dim", type=int, default=512, help="D")
    p.add_argument("--hidden", type=int, default=1024, help="F")
    p.add_argument("--tokens", type=int, default=4096, help="T, tokens per rank")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="comma list out of " + ",".join(ALL_VARIANTS))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--malloc", choices=("default", "tuned"), default="default",
                   help="tuned: glibc mallopt keeps freed large blocks (every variant alike)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    cfg = MoEBenchConfig(a.experts, a.top_k, a.hidden, a.dim, a.tokens, a.world, Plan(a.reps, a.iters, a.warmup),
                         a.device, a.malloc, tuple(s.strip() for s in a.variants.split(",") if s.strip()))
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    return cfg, a


def main(argv=None) -> int:
    cfg, a = parse_args(argv)
    r = run(cfg)
    print(format_result(r))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
