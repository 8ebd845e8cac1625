"""Statistics of interleaved timings: per-variant median and spread, per-iteration ratios, busy-machine warnings.

Legend: times[name] is a list of R repetitions, each a list of N per-iteration seconds (slowest rank). A ratio is
computed PER ITERATION (variant a's and variant b's times from the same iteration, so load that lands on that
iteration lands on both), then summarised like a time: median, min..max, inter-quartile range.
"""

from __future__ import annotations

import math
import statistics

BUSY_MAX_OVER_MIN = 1.3  # a variant whose slowest iteration is 1.3x its fastest: the machine was busy
BUSY_RATIO_IQR = 0.15  # a ratio whose inter-quartile range is wider than 15% of its median


def quantile(xs: list[float], q: float) -> float:
    """Linear-interpolated q-quantile (numpy's default), 0 <= q <= 1."""
    s = sorted(xs)
    if not s:
        return math.nan
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def flat(reps: list[list[float]]) -> list[float]:
    return [t for rep in reps for t in rep]


def summary(xs: list[float]) -> dict:
    """median, min, max, q25, q75, n of a list of numbers."""
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q25": quantile(xs, 0.25),
            "q75": quantile(xs, 0.75), "n": len(xs)}


def variant_summary(reps: list[list[float]]) -> dict:
    """Summary of all R*N iterations plus the median of each repetition."""
    return {**summary(flat(reps)), "rep_medians": [statistics.median(r) for r in reps]}


def per_iteration_ratios(num: list[list[float]], den: list[list[float]]) -> list[float]:
    """num[r][i] / den[r][i] for every iteration (same repetition, same iteration index)."""
    if [len(r) for r in num] != [len(r) for r in den]:
        raise ValueError("per_iteration_ratios: both variants need the same repetitions x iterations")
    return [a / b for ra, rb in zip(num, den) for a, b in zip(ra, rb)]


def ratio_summary(num: list[list[float]], den: list[list[float]]) -> dict:
    return summary(per_iteration_ratios(num, den))


def busy_warnings(variants: dict[str, dict], ratios: dict[str, dict]) -> list[str]:
    """Warnings when the spread says the machine was busy: a variant's max/min above BUSY_MAX_OVER_MIN, or a
    ratio's inter-quartile range wider than BUSY_RATIO_IQR of its median."""
    out = []
    slow = [f"{name} {s['max'] / s['min']:.2f}x" for name, s in variants.items()
            if s["min"] > 0 and s["max"] / s["min"] > BUSY_MAX_OVER_MIN]
    if slow:
        out.append(f"machine busy: slowest iteration over {BUSY_MAX_OVER_MIN}x the fastest for {', '.join(slow)}; "
                   "trust the per-iteration ratios over the absolute times")
    wide = []
    for name, s in ratios.items():
        width = (s["q75"] - s["q25"]) / s["median"] if s["median"] else math.inf
        if width > BUSY_RATIO_IQR:
            wide.append(f"{name} {width:.0%}")
    if wide:
        out.append(f"ratio inter-quartile range over {BUSY_RATIO_IQR:.0%} of its median for {', '.join(wide)}: "
                   "rerun on a quieter machine before quoting these")
    return out
