"""docs/benchmarks.md from the suite's JSON: tables of medians, spreads and per-iteration ratio medians.

A cell "1.23 [1.20-1.26]" is the median over all timed iterations with its inter-quartile range; "{min-max}" where
shown is the full range. Times are the slowest rank's forward+backward of one iteration, in milliseconds.
"""

from __future__ import annotations

from typing import Optional

from . import stats

MOE_RATIOS = [("ours / dense", "ours / dense limit"), ("ours/balanced / dense", "ours/balanced / dense limit"),
              ("ours / ds/dropping", "ours / DeepSpeed dropping (capacity 1.0)"),
              ("ours / ds/dropless", "ours / DeepSpeed dropless-padded")]


def _iqr(s: dict, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(s['median'] * scale)} [{fmt.format(s['q25'] * scale)}-{fmt.format(s['q75'] * scale)}]"


def _ms(s: Optional[dict]) -> str:
    return "-" if s is None else _iqr(s, 1e3, "{:.0f}")


def _ratio(s: Optional[dict]) -> str:
    return "-" if s is None else f"{_iqr(s)} {{{s['min']:.2f}-{s['max']:.2f}}}"


def _load(r: dict) -> str:
    """1-minute load average before / after the row."""
    return " / ".join(f"{x[0]:.1f}" if x else "-" for x in (r["load_before"], r["load_after"]))


def moe_tables(results: list[dict]) -> list[str]:
    variants = []
    for r in results:
        variants += [v for v in r["variants"] if v not in variants]
    out = ["Per-iteration speed ratios (a / b = time of b / time of a in the same iteration, > 1: a is faster; equal "
           "useful FLOPs, so this is the ratio of useful throughput): median [IQR] {min-max}.", "",
           "| E, K, F (D, T per rank) | " + " | ".join(label for _, label in MOE_RATIOS) + " |",
           "|---|" + "---|" * len(MOE_RATIOS)]
    for r in results:
        c = r["config"]
        out.append(f"| {c['experts']}, {c['top_k']}, {c['hidden']} ({c['dim']}, {c['tokens']}) | "
                   + " | ".join(_ratio(r["ratios"].get(k)) for k, _ in MOE_RATIOS) + " |")
    out += ["", "Forward+backward milliseconds (slowest rank): median [IQR]; useful GFLOP/s per rank of the median "
            "in parentheses.", "",
            "| E, K, F (D, T) | " + " | ".join(variants) + " | 1-min load before / after |",
            "|---|" + "---|" * (len(variants) + 1)]
    for r in results:
        c = r["config"]
        cells = []
        for v in variants:
            s = r["variants"].get(v)
            cells.append(_ms(s) + (f" ({s['gflops_per_rank']:.0f})" if s else ""))
        out.append(f"| {c['experts']}, {c['top_k']}, {c['hidden']} ({c['dim']}, {c['tokens']}) | " + " | ".join(cells)
                   + f" | {_load(r)} |")
    notes = [f"- {r['label']}: {k}: {v}" for r in results for k, v in r["notes"].items()]
    if notes:
        out += ["", "What each layer did with its rows (last timed step):", ""] + notes
    return out


def pipeline_tables(results: list[dict]) -> list[str]:
    out = ["| shape, network | degree 1 ms | best fixed | best ms | best vs degree 1 | auto (chosen) | "
           "auto time / best time | compute alone ms | comm alone ms | best time / max(compute, comm) | "
           "best time / n-chunk floor | best token-split degree: time / best time |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v, q, best = r["variants"], r["ratios"], r["best_fixed"]
        speed = "1.00" if best == "degree 1" else _ratio(q.get(f"{best} / degree 1"))
        best_t = r.get("best_token_split")
        by_tokens = "-" if best_t is None else \
            f"{best_t.split()[-1]}: {_ratio(q.get('best token-split time / best fixed time'))}"
        out.append(f"| {r['label']} | {_ms(v['degree 1'])} | {best.split()[-1]} | {_ms(v[best])} | {speed} | "
                   f"{r['auto_degree']} | {_ratio(q.get('auto time / best fixed time'))} | "
                   f"{_ms(v.get('compute alone'))} | {_ms(v.get('comm alone'))} | "
                   f"{_ratio(q.get('best fixed time / max(compute alone, comm alone)'))} | "
                   f"{_ratio(q.get('best fixed time / its n-chunk floor'))} | {by_tokens} |")
    out += ["", "Every degree, ms (median [IQR]); `degree n`: chunks split by experts (the default), `tokens n`: by "
            "tokens:", "",
            "| shape, network | " + " | ".join(f"degree {d}" for d in (1, 2, 4, 8))
            + " | " + " | ".join(f"tokens {d}" for d in (2, 4, 8)) + " | auto | 1-min load before / after |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        v = r["variants"]
        out.append(f"| {r['label']} | " + " | ".join(_ms(v.get(f"degree {d}")) for d in (1, 2, 4, 8))
                   + " | " + " | ".join(_ms(v.get(f"tokens {d}")) for d in (2, 4, 8))
                   + f" | {_ms(v['auto'])} | {_load(r)} |")
    return out


def before_after(before: dict, after: dict) -> list[str]:
    """Key ratio medians of an earlier suite run (same harness) next to this one's."""
    def moe_index(run):
        return {r["label"]: r for r in run["results"] if r.get("kind") == "moe_layer"}

    b, a = moe_index(before), moe_index(after)
    out = [f"Before: commit {before['commit']} ({before['date']}, load {before['load_start']} -> "
           f"{before['load_end']}); after: commit {after['commit']} ({after['date']}, load {after['load_start']} -> "
           f"{after['load_end']}). Per-iteration ratio medians [IQR], each from its own interleaved run; compare "
           "them with their spreads.", "",
           "| shape | " + " | ".join(f"{label} before | after" for _, label in MOE_RATIOS) + " |",
           "|---|" + "---|---|" * len(MOE_RATIOS)]
    for label in a:
        if label not in b:
            continue
        cells = []
        for k, _ in MOE_RATIOS:
            for run in (b, a):
                s = run[label]["ratios"].get(k)
                cells.append("-" if s is None else _iqr(s))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    pb = {r["label"]: r for r in before["results"] if r.get("kind") == "pipeline"}
    pa = [r for r in after["results"] if r.get("kind") == "pipeline" and r["label"] in pb]
    if pa:
        keys = [("auto time / best fixed time", "auto / best"),
                ("best fixed time / max(compute alone, comm alone)", "best / max(compute, comm)")]
        out += ["", "| pipelining | best degree before | after | " + " | ".join(f"{t} before | after" for _, t in keys)
                + " |", "|---|---|---|" + "---|---|" * len(keys)]
        for r in pa:
            cells = [pb[r["label"]]["best_fixed"].split()[-1], r["best_fixed"].split()[-1]]
            for k, _ in keys:
                cells += ["-" if run["ratios"].get(k) is None else _iqr(run["ratios"][k]) for run in (pb[r["label"]], r)]
            out.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return out


def markdown(run: dict, before: Optional[dict] = None) -> str:
    m = run["machine"]
    lines = ["# Benchmarks", "",
             f"Generated by `{run['command']}` in {run['wall_s'] / 60:.1f} min on {run['date']}, commit "
             f"`{run['commit']}`.", ""] + ([run["note"], ""] if run.get("note") else []) + [
             f"Machine: {m.get('gpu') or m['cpu']}, {m['cpu_count']} CPU cores, torch {m['torch']}, DeepSpeed "
             f"{m.get('deepspeed')}, device {run['device']}, {run['world']} ranks (one thread each on CPU), "
             f"malloc {run['malloc']}. Load average (1, 5, 15 min) at start {run['load_start']}, at end "
             f"{run['load_end']}.", "",
             "How these figures are made (`moetrain/bench/`): every variant of a table row runs in the same "
             "processes, alternated iteration by iteration in a rotated order, a barrier before each; an "
             "iteration's time is the slowest rank's. Ratios are computed per iteration (both variants timed in "
             "the same iteration) and then summarised, so load from other jobs on a shared machine lands on both "
             "sides of a ratio. A warning is printed when a variant's slowest iteration is over 1.3x its fastest "
             "or a ratio's inter-quartile range is over 15% of its median: quote such figures with their spread "
             "or rerun them.", ""]
    moe = [r for r in run["results"] if r.get("kind") == "moe_layer"]
    pipe = [r for r in run["results"] if r.get("kind") == "pipeline"]
    if moe:
        lines += ["## MoE layer: ours vs the dense-matmul limit vs DeepSpeed-MoE", "",
                  "Variants (see `moetrain/bench/moe_layer.py`): `dense` one SwiGLU with plain matmuls on T*K rows "
                  "(the same useful FLOPs); `ours` build_moe_layer, expert parallel over the ranks, dropless, "
                  "learned router; `ours/balanced` with router.force_balanced; `ds/dropping` DeepSpeed-MoE with "
                  "capacity_factor 1.0 and drop_tokens=True (it drops rows, see the notes); `ds/dropless` "
                  "drop_tokens=False (every expert padded to the busiest). DeepSpeed gets our gate and expert "
                  "weights, SwiGLU experts.", ""] + moe_tables(moe) + [""]
    if pipe:
        lines += ["## Pipelined all-to-all: degrees 1, 2, 4, 8 and auto", "",
                  "Forced-balanced routing. `compute alone`: a local layer with the E/W experts of a rank and the "
                  "same rows per expert, no communication; `comm alone`: degree 1 with expert hidden size 1. "
                  "Targets: best time / max(compute, comm) <= 1.15, auto time / best time <= 1.05.", ""]
        lines += pipeline_tables(pipe) + [""]
    for r in run["results"]:
        if r.get("kind") == "fssdp":
            lines += ["## FSSDP vs expert parallelism under skew", "", r.get("markdown", ""), ""]
    if run["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s}" for s in run["skipped"]] + [""]
    warnings = [f"- {r['label']}: {w}" for r in run["results"] if "variants" in r
                for w in stats.busy_warnings(r["variants"], r["ratios"])]
    warnings += [f"- FSSDP: {r['busy_warning']}" for r in run["results"] if r.get("busy_warning")]
    if warnings:
        lines += ["## Busy-machine warnings", ""] + warnings + [""]
    if before is not None:
        lines += ["## Before / after", ""] + before_after(before, run) + [""]
    lines += [f"Raw per-iteration times: `{run['json_name']}`.", ""]
    return "\n".join(lines)
