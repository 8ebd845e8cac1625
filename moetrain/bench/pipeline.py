"""Pipelined all-to-all: one expert-parallel MoE layer's forward+backward at pipeline degrees 1, 2, 4, 8 and `auto`,
with compute alone and communication alone, every variant alternated iteration by iteration in the same processes.

    python -m moetrain.bench.pipeline [--experts 8 --top-k 2 --hidden 1024 --tokens 4096] [--netns-rate 2gbit]

Variants (forced-balanced routing, so every degree and both estimates see the same loads):

  degree n       build_moe_layer(pipeline_degree=n), n in 1, 2, 4, 8 up to the local experts L = E/W (chunks split
                 by experts, the default)
  tokens n       the same with pipeline_split=tokens, n in 2, 4, 8 (degree 1 is the same layer either way)
  auto           pipeline_degree=auto, warmed through its trial phase first exactly as training does it (one
                 forward+backward per step, then layer.after_step), then timed like the fixed degrees
  compute alone  the layer's expert work without communication: a local layer (no group) with L experts, same T and
                 K, so each expert gets the same T*K*W/E rows as under expert parallelism
  comm alone     the same dispatch and combine (degree 1) with no expert work worth the name: an expert hidden size
                 F=1 (routing, permutation and the all-to-alls remain)

Perfect overlap would take max(compute alone, comm alone); the target is the best degree within 1.15x of it and auto
within 1.05x of the best fixed degree. An n-chunk schedule cannot reach it: nothing computes before the first chunk
has arrived and the last chunk's combine leaves after the compute, which leaves max(C, M) + min(C, M) / n (C compute
alone, M comm alone); "best fixed time / its n-chunk floor" says how close the best degree gets to that. Ratios are
per iteration: "degree n / degree 1" = time_1 / time_n (speed-up), "auto time / best fixed time" and "best fixed
time / max(compute alone, comm alone)" (slow-downs, lower is better).
`--netns-rate R` (root) runs the ranks in a network namespace whose loopback is limited to R (see netns.py).

Legend: E experts, K experts per token, D model dim, F expert hidden dim, T tokens per rank, W ranks, L = E/W.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

from . import machine, stats
from .interleave import Plan, analyse, reduce_max_fn, run_interleaved
from .netns import run_in_rate_limited_netns
from .ranks import RankEnv, spawn

DEGREES = (1, 2, 4, 8)


@dataclass
class PipelineBenchConfig:
    experts: int = 8
    top_k: int = 2
    hidden: int = 1024
    dim: int = 512
    tokens: int = 4096
    world: int = 2
    plan: Plan = field(default_factory=lambda: Plan(reps=2, iters=3, warmup=1))
    device: str = "cpu"
    network: str = "plain loopback"  # or the netns rate, e.g. "2gbit"
    estimates: bool = True  # compute alone and comm alone
    token_split: bool = True  # also time chunks split by tokens ("tokens n")

    def validate(self) -> None:
        if self.world < 2:
            raise ValueError("the pipelining benchmark needs world >= 2 (it times the all-to-all)")
        if self.experts % self.world:
            raise ValueError(f"experts={self.experts} must be a multiple of world={self.world}")
        if self.estimates and self.top_k > self.experts // self.world:
            raise ValueError(f"compute alone needs top_k={self.top_k} <= local experts {self.experts // self.world}")

    @property
    def degrees(self) -> list[int]:
        return [d for d in DEGREES if d <= self.experts // self.world]

    @property
    def token_split_degrees(self) -> list[int]:
        return [d for d in DEGREES if d > 1] if self.token_split else []

    @property
    def label(self) -> str:
        return f"E={self.experts} K={self.top_k} F={self.hidden} D={self.dim} T={self.tokens}, {self.network}"


def _layer(cfg: PipelineBenchConfig, env: RankEnv, degree: str, experts: int = 0, hidden: int = 0, local=False,
           split: str = "experts"):
    from moetrain.config.schema import RouterConfig
    from moetrain.parallel.moe_layer import build_moe_layer

    torch.manual_seed(0)
    layer = build_moe_layer(cfg.dim, hidden or cfg.hidden, experts or cfg.experts, 0,
                            RouterConfig(top_k=cfg.top_k, force_balanced=True), layer_id=1,
                            ep_group=None if local else env.group, pipeline_degree=degree, pipeline_split=split)
    layer.reset_parameters(0.02, 0.02, seed=0)
    return layer.to(env.device)


def rank_body(rank: int, world: int, cfg: PipelineBenchConfig) -> dict:
    env = RankEnv.setup(rank, world, cfg.device)
    g = torch.Generator().manual_seed(rank)
    x_TD = torch.randn(cfg.tokens, cfg.dim, generator=g).to(env.device)
    dy_TD = torch.randn(cfg.tokens, cfg.dim, generator=g).to(env.device)

    def fwd_bwd(layer):
        def step():
            layer.zero_grad(set_to_none=True)
            xg = x_TD.detach().requires_grad_()
            with env.autocast():
                y = layer(xg[None])
            y.float().backward(dy_TD[None])
        return step

    steps = {f"degree {d}": fwd_bwd(_layer(cfg, env, str(d))) for d in cfg.degrees}
    steps.update({f"tokens {d}": fwd_bwd(_layer(cfg, env, str(d), split="tokens")) for d in cfg.token_split_degrees})
    auto = _layer(cfg, env, "auto")
    tuner = auto.dispatcher.tuner
    trial_steps = 0
    while tuner.chosen is None:  # the trial phase, as the trainer runs it
        fwd_bwd(auto)()
        auto.after_step(trial_steps, None, None)
        trial_steps += 1
        if trial_steps > 100:
            raise RuntimeError("the pipeline degree tuner did not decide within 100 steps")
    steps["auto"] = fwd_bwd(auto)
    if cfg.estimates:
        steps["compute alone"] = fwd_bwd(_layer(cfg, env, "1", experts=cfg.experts // world, local=True))
        steps["comm alone"] = fwd_bwd(_layer(cfg, env, "1", hidden=1))
    load_before = machine.load_average()
    result = run_interleaved(steps, cfg.plan, barrier=env.barrier, reduce_max=reduce_max_fn(), sync=env.sync)
    return {"times": result["times"], "auto_degree": tuner.chosen, "auto_trial_steps": trial_steps,
            "load_before": load_before, "load_after": machine.load_average()}


def analyse_pipeline(times: dict, auto_degree: int) -> dict:
    fixed = [n for n in times if n.startswith("degree ")]
    by_tokens = [n for n in times if n.startswith("tokens ")]
    out = analyse(times, [(n, "degree 1") for n in fixed[1:] + by_tokens] + [("auto", "degree 1")])
    best = min(fixed, key=lambda n: out["variants"][n]["median"])
    out["best_fixed"] = best
    out["auto_degree"] = auto_degree
    # Slow-downs (time ratios, lower is better), per iteration.
    out["ratios"]["auto time / best fixed time"] = stats.ratio_summary(times["auto"], times[best])
    if by_tokens:
        best_t = min(by_tokens, key=lambda n: out["variants"][n]["median"])
        out["best_token_split"] = best_t
        out["ratios"]["best token-split time / best fixed time"] = stats.ratio_summary(times[best_t], times[best])
    if "compute alone" in times:
        bound = [[max(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(times["compute alone"], times["comm alone"])]
        out["ratios"]["best fixed time / max(compute alone, comm alone)"] = stats.ratio_summary(times[best], bound)
        out["ratios"]["degree 1 time / max(compute alone, comm alone)"] = stats.ratio_summary(times["degree 1"], bound)
        out["bound"] = stats.variant_summary(bound)
        # The floor of an n-chunk schedule: nothing computes before the first chunk's dispatch has arrived, and the
        # last chunk's combine leaves after the compute, so about max(C, M) + min(C, M) / n (C compute alone, M
        # comm alone at degree 1's rows). Close to 1: the chunks overlap as well as their number allows.
        n = int(best.split()[-1])
        floor = [[max(a, b) + min(a, b) / n for a, b in zip(ra, rb)]
                 for ra, rb in zip(times["compute alone"], times["comm alone"])]
        out["ratios"]["best fixed time / its n-chunk floor"] = stats.ratio_summary(times[best], floor)
    out["warnings"] = stats.busy_warnings(out["variants"], out["ratios"])
    return out


def run(cfg: PipelineBenchConfig) -> dict:
    cfg.validate()
    res = spawn(rank_body, cfg.world, cfg)[0]
    return {"kind": "pipeline", "config": asdict(cfg), "label": cfg.label, **analyse_pipeline(res["times"],
            res["auto_degree"]), "auto_trial_steps": res["auto_trial_steps"], "load_before": res["load_before"],
            "load_after": res["load_after"], "times": res["times"]}


def to_argv(cfg: PipelineBenchConfig) -> list[str]:
    p = cfg.plan
    return ["--experts", str(cfg.experts), "--top-k", str(cfg.top_k), "--hidden", str(cfg.hidden), "--dim",
            str(cfg.dim), "--tokens", str(cfg.tokens), "--world", str(cfg.world), "--reps", str(p.reps), "--iters",
            str(p.iters), "--warmup", str(p.warmup), "--device", cfg.device] + ([] if cfg.estimates else
                                                                                   ["--no-estimates"]) \
        + ([] if cfg.token_split else ["--no-token-split"])


def run_rate_limited(cfg: PipelineBenchConfig, rate: str) -> dict:
    """`run` inside a network namespace whose loopback is limited to `rate`; the result read back as JSON."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        cmd = [sys.executable, "-m", f"{__package__}.pipeline", *to_argv(cfg), "--network", rate, "--out", out]
        # The child imports this harness and the library from where this process does.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([p or os.getcwd() for p in sys.path]))
        proc = run_in_rate_limited_netns(rate, cmd, env)
        if proc.returncode != 0:
            raise RuntimeError(f"the pipelining benchmark at {rate} failed (exit code {proc.returncode})")
        with open(out) as fh:
            return json.load(fh)


def format_result(r: dict) -> str:
    p = r["config"]["plan"]
    lines = [f"Pipelined MoE layer fwd+bwd {r['label']}, W={r['config']['world']}, {p['reps']} reps x {p['iters']} "
             f"iterations (+{p['warmup']} warm-up), interleaved; auto chose degree {r['auto_degree']} after "
             f"{r['auto_trial_steps']} trial steps",
             f"{'variant':<15}{'median ms':>10}{'IQR ms':>18}{'min..max ms':>20}"]
    for name, s in r["variants"].items():
        lines.append(f"{name:<15}{s['median'] * 1e3:>10.1f}{s['q25'] * 1e3:>9.1f}..{s['q75'] * 1e3:<7.1f}"
                     f"{s['min'] * 1e3:>11.1f}..{s['max'] * 1e3:<7.1f}")
    lines.append(f"best fixed: {r['best_fixed']}; per-iteration ratios: median [IQR] {{min..max}}")
    for name, s in r["ratios"].items():
        lines.append(f"  {name:<50}{s['median']:>6.2f} [{s['q25']:.2f}..{s['q75']:.2f}] {{{s['min']:.2f}..{s['max']:.2f}}}")
    lines.append(f"  load average before {r['load_before']} after {r['load_after']}")
    lines += [f"  WARNING {w}" for w in r["warnings"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-estimates", action="store_true", help="skip compute alone and comm alone")
    p.add_argument("--no-token-split", action="store_true", help="skip the chunks split by tokens")
    p.add_argument("--netns-rate", default=None, help="e.g. 2gbit: run inside a rate-limited network namespace (root)")
    p.add_argument("--network", default="plain loopback", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    cfg = PipelineBenchConfig(a.experts, a.top_k, a.hidden, a.dim, a.tokens, a.world,
                              Plan(a.reps, a.iters, a.warmup), a.device, a.network, not a.no_estimates,
                              not a.no_token_split)
    try:
        cfg.validate()
    except ValueError as e:
        p.error(str(e))
    r = run_rate_limited(cfg, a.netns_rate) if a.netns_rate else run(cfg)
    print(format_result(r))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(r, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
