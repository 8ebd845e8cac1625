"""`moetrain-bench`: the fixed benchmark suite, one command; writes docs/benchmarks.md and its JSON.

    moetrain-bench                          # full CPU suite (~15 min on 2 cores): docs/benchmarks.md + .json
    moetrain-bench --quick                  # a 1-2 minute subset: runs/bench/benchmarks-cpu-quick.md
    moetrain-bench --device cuda --quick    # the same commands on GPUs (NCCL, bf16 autocast, compiled Triton)
    moetrain-bench --before docs/benchmarks_before.json   # add a before/after table of the key ratios
    moetrain-bench --from-json docs/benchmarks.json --out docs/benchmarks.md   # re-write the report, run nothing

Suite: the MoE layer at (E, K, F) = (8, 2, 1024), (32, 4, 512), (64, 6, 256), (128, 8, 128) with D=512 and T=4096
tokens per rank, and (8, 2, 1024) at T=512 (moe_layer.py); the pipelined all-to-all at E=32 K=4 F=512 on plain
loopback and, as root with `ip`/`tc`, at 2gbit and 500mbit, plus E=8 K=2 F=1024 T=512 at 2gbit (pipeline.py); FSSDP
vs EP under skew from bench/fssdp_bench.py's run_fssdp_suite when that checkout has it (CPU only). What cannot run
here is listed under "Skipped" in the output, with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from . import machine, report
from .interleave import Plan
from .moe_layer import MoEBenchConfig
from .moe_layer import format_result as format_moe
from .moe_layer import run as run_moe
from .netns import unavailable_reason
from .pipeline import PipelineBenchConfig
from .pipeline import format_result as format_pipeline
from .pipeline import run as run_pipeline
from .pipeline import run_rate_limited


@dataclass
class Suite:
    moe: list[MoEBenchConfig]
    pipeline: list[tuple[PipelineBenchConfig, str | None]]  # (config, netns rate or None for plain loopback)
    fssdp_quick: bool | None  # None: no FSSDP rows


def build_suite(quick: bool, device: str, world: int, malloc: str) -> Suite:
    if quick:
        moe_plan, pipe_plan = Plan(reps=2, iters=2, warmup=1), Plan(reps=1, iters=3, warmup=1)
        shapes = [(8, 2, 1024, 1024), (64, 6, 256, 1024)]
        pipes = [(32, 4, 512, 1024, None)]
    else:
        moe_plan, pipe_plan = Plan(reps=3, iters=3, warmup=1), Plan(reps=2, iters=3, warmup=1)
        shapes = [(8, 2, 1024, 4096), (32, 4, 512, 4096), (64, 6, 256, 4096), (128, 8, 128, 4096),
                  (8, 2, 1024, 512)]
        pipes = [(32, 4, 512, 4096, None), (32, 4, 512, 4096, "2gbit"), (32, 4, 512, 4096, "500mbit"),
                 (8, 2, 1024, 512, "2gbit")]
    if device == "cuda":
        moe_plan, pipe_plan = Plan(reps=3, iters=5, warmup=2), Plan(reps=3, iters=5, warmup=2)
    moe = [MoEBenchConfig(E, K, Fh, 512, T, world, moe_plan, device, malloc) for E, K, Fh, T in shapes]
    pipeline = [(PipelineBenchConfig(E, K, Fh, 512, T, world, pipe_plan, device, rate or "plain loopback"), rate)
                for E, K, Fh, T, rate in pipes]
    return Suite(moe, pipeline, None if device == "cuda" else quick)


def _fssdp_suite():
    """run_fssdp_suite from bench/fssdp_bench.py of the checkout whose moetrain is imported, or None."""
    import moetrain

    root = Path(moetrain.__file__).resolve().parent.parent
    if not (root / "bench" / "fssdp_bench.py").exists():
        return None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the spawned ranks inherit sys.path
    try:
        from bench.fssdp_bench import run_fssdp_suite
    except ImportError:
        return None
    return run_fssdp_suite


def run_suite(suite: Suite, log=print) -> tuple[list[dict], list[str]]:
    results, skipped = [], []
    t0 = time.perf_counter()

    def done(r, text):
        results.append(r)
        log(text)
        log(f"[{(time.perf_counter() - t0) / 60:.1f} min]\n")

    for cfg in suite.moe:
        r = run_moe(cfg)
        done(r, format_moe(r))
    for cfg, rate in suite.pipeline:
        if cfg.world < 2:
            skipped.append(f"pipelining {cfg.label}: needs 2 or more ranks (one GPU has no all-to-all)")
            continue
        if rate is not None and unavailable_reason():
            skipped.append(f"pipelining {cfg.label}: a rate-limited network namespace {unavailable_reason()}")
            continue
        r = run_rate_limited(cfg, rate) if rate else run_pipeline(cfg)
        done(r, format_pipeline(r))
    if suite.fssdp_quick is None:
        skipped.append("FSSDP vs EP: CPU only in this suite")
    else:
        fn = _fssdp_suite()
        if fn is None:
            skipped.append("FSSDP vs EP: this checkout's bench/fssdp_bench.py has no run_fssdp_suite")
        else:
            r = {"kind": "fssdp", "label": "FSSDP vs EP", "quick": True, **fn(quick=True)}
            done(r, r.get("markdown", ""))
    return results, skipped


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="moetrain-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 1-2 minute subset (smaller T, fewer iterations)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--world", type=int, default=None, help="ranks (default: 2 on CPU, the GPU count on CUDA)")
    p.add_argument("--malloc", choices=("default", "tuned"), default="default",
                   help="tuned: glibc mallopt keeps freed large blocks in every rank (all variants alike)")
    p.add_argument("--only", default="moe,pipeline,fssdp", help="comma list out of moe, pipeline, fssdp")
    p.add_argument("--out", default=None, help="the markdown report (default: docs/benchmarks.md for the full CPU "
                                               "suite, runs/bench/benchmarks-<device>[-quick].md otherwise)")
    p.add_argument("--json", default=None, help="the JSON (default: the report's path with .json)")
    p.add_argument("--before", default=None, help="JSON of an earlier run: adds a before/after table")
    p.add_argument("--from-json", default=None, help="run nothing: write the report (--out) from this run's JSON")
    a = p.parse_args(argv)
    if a.from_json:
        if not a.out:
            p.error("--from-json needs --out (the markdown file to write)")
        with open(a.from_json) as fh:
            run = json.load(fh)
        before = None
        if a.before:
            with open(a.before) as fh:
                before = json.load(fh)
        with open(a.out, "w") as fh:
            fh.write(report.markdown(run, before))
        print(f"wrote {a.out} from {a.from_json}")
        return 0
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    if only - {"moe", "pipeline", "fssdp"}:
        p.error(f"--only: unknown part(s) {sorted(only - {'moe', 'pipeline', 'fssdp'})}; choose moe, pipeline, fssdp")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible; run on CPU (the default)")
        world = a.world or min(torch.cuda.device_count(), 8)
    else:
        world = a.world or 2
    if world < 1:
        p.error("--world must be >= 1")
    before = None
    if a.before:
        if not os.path.exists(a.before):
            p.error(f"--before {a.before}: no such file (a JSON written by an earlier moetrain-bench)")
        with open(a.before) as fh:
            before = json.load(fh)
    out = a.out or ("docs/benchmarks.md" if not a.quick and a.device == "cpu"
                    else f"runs/bench/benchmarks-{a.device}{'-quick' if a.quick else ''}.md")
    json_path = a.json or str(Path(out).with_suffix(".json"))

    suite = build_suite(a.quick, a.device, world, a.malloc)
    if "moe" not in only:
        suite.moe = []
    if "pipeline" not in only:
        suite.pipeline = []
    if "fssdp" not in only:
        suite = replace(suite, fssdp_quick=None)
    import moetrain

    start = datetime.datetime.now(datetime.timezone.utc)
    load_start, t0 = machine.load_average(), time.perf_counter()
    results, skipped = run_suite(suite)
    if "fssdp" not in only:
        skipped = [s for s in skipped if not s.startswith("FSSDP")]
    run = {"command": "moetrain-bench" + "".join(" " + shlex.quote(x) for x in argv),
           "date": start.strftime("%Y-%m-%d %H:%M UTC"), "commit": machine.git_commit(os.path.dirname(moetrain.__file__)),
           "device": a.device, "world": world, "malloc": a.malloc, "quick": a.quick,
           "machine": machine.describe(a.device), "load_start": load_start, "load_end": machine.load_average(),
           "wall_s": time.perf_counter() - t0, "json_name": os.path.basename(json_path), "skipped": skipped,
           "results": results}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as fh:
        json.dump(run, fh, indent=1)
    with open(out, "w") as fh:
        fh.write(report.markdown(run, before))
    print(f"wrote {out} and {json_path} in {run['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
