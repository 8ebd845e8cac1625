"""The benchmark harness (moetrain/bench/): interleaving, statistics and warnings on fake timers; a tiny 2-rank run of
the MoE-layer benchmark and the pipelining analysis producing the report's tables. No timing thresholds."""

import pytest

from moetrain.bench import report, stats
from moetrain.bench.interleave import Plan, analyse, iteration_order, run_interleaved


class FakeClock:
    """A clock that only moves when a fake variant 'runs'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_variants(clock, costs, busy=None):
    """Variants that advance the clock by costs[name] (times busy[(name, call)] when given)."""
    calls = {n: 0 for n in costs}

    def make(name):
        def step():
            calls[name] += 1
            clock.now += costs[name] * (busy or {}).get(calls[name], 1.0)
        return step

    return {n: make(n) for n in costs}, calls


def test_quantile_and_summary():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert stats.quantile(xs, 0.5) == 2.5
    assert stats.quantile(xs, 0.25) == 1.75
    assert stats.quantile(xs, 0.0) == 1.0 and stats.quantile(xs, 1.0) == 4.0
    s = stats.summary(xs)
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 4.0, 4)


def test_order_rotation_puts_every_variant_in_every_position():
    names = ["a", "b", "c", "d"]
    for rep in range(3):
        orders = [iteration_order(names, rep, it, seed=7) for it in range(len(names))]
        for pos in range(len(names)):
            assert sorted(o[pos] for o in orders) == names  # each variant once in each position
        assert all(sorted(o) == names for o in orders)
    assert iteration_order(names, 0, 1, seed=7) == iteration_order(names, 0, 1, seed=7)  # same on every rank


def test_interleaved_runner_times_and_per_iteration_ratios():
    clock = FakeClock()
    # Iterations 3 and 4 of every variant are 'busy' (2x): absolute times spread, the per-iteration ratios do not.
    busy = {1 + 3: 2.0, 1 + 4: 2.0}  # call index (1 warm-up call first)
    variants, calls = fake_variants(clock, {"dense": 1.0, "ours": 1.25, "other": 2.0}, busy)
    barriers, reduced = [], []

    def reduce_max(xs):
        reduced.append(list(xs))
        return xs

    res = run_interleaved(variants, Plan(reps=2, iters=3, warmup=1), barrier=lambda: barriers.append(1),
                          reduce_max=reduce_max, clock=clock)
    assert calls == {"dense": 7, "ours": 7, "other": 7}  # 1 warm-up + 2 x 3
    assert len(barriers) == 3 * 7 and len(reduced) == 6  # a barrier per variant run, one all-reduce per iteration
    assert res["times"]["dense"] == [[1.0, 1.0, 2.0], [2.0, 1.0, 1.0]]
    assert [len(o) for o in res["orders"]] == [3, 3]
    a = analyse(res["times"], [("ours", "dense"), ("dense", "other")])
    assert a["ratios"]["ours / dense"]["median"] == pytest.approx(0.8)  # time_dense / time_ours, per iteration
    assert a["ratios"]["ours / dense"]["max"] == pytest.approx(0.8)  # busy iterations hit both sides
    assert a["ratios"]["dense / other"]["median"] == pytest.approx(2.0)
    assert a["variants"]["ours"]["median"] == pytest.approx(1.25)
    assert a["variants"]["ours"]["rep_medians"] == [pytest.approx(1.25), pytest.approx(1.25)]
    # max/min = 2 > 1.3 for every variant: the machine was busy; the ratios are tight: no ratio warning.
    assert len(a["warnings"]) == 1 and all(f"{n} 2.00x" in a["warnings"][0] for n in ("dense", "ours", "other"))


def test_busy_warning_on_a_wide_ratio_and_none_when_quiet():
    quiet = analyse({"a": [[1.0, 1.01, 0.99]], "b": [[2.0, 2.0, 2.02]]}, [("a", "b")])
    assert quiet["warnings"] == []
    noisy = analyse({"a": [[1.0, 1.0, 1.0, 1.0]], "b": [[1.0, 1.25, 1.0, 1.25]]}, [("a", "b")])
    assert len(noisy["warnings"]) == 1 and "for a / b 22%" in noisy["warnings"][0]  # b's 1.25x < 1.3: no busy line


def test_per_iteration_ratios_need_matching_iterations():
    with pytest.raises(ValueError, match="same repetitions x iterations"):
        stats.per_iteration_ratios([[1.0, 2.0]], [[1.0]])


def test_bad_configs_are_refused_before_spawning():
    from moetrain.bench.moe_layer import MoEBenchConfig
    from moetrain.bench.pipeline import PipelineBenchConfig

    with pytest.raises(ValueError, match="multiple of world"):
        MoEBenchConfig(experts=3, world=2).validate()
    with pytest.raises(ValueError, match="unknown variant"):
        MoEBenchConfig(variants=("ours", "tutel")).validate()
    with pytest.raises(ValueError, match="world >= 2"):
        PipelineBenchConfig(world=1).validate()


def test_two_rank_smoke_run_produces_the_report_tables():
    from moetrain.bench import machine
    from moetrain.bench.moe_layer import MoEBenchConfig
    from moetrain.bench.moe_layer import format_result as format_moe
    from moetrain.bench.moe_layer import run as run_moe
    from moetrain.bench.pipeline import analyse_pipeline

    tiny = Plan(reps=1, iters=1, warmup=0)
    moe = run_moe(MoEBenchConfig(experts=4, top_k=2, hidden=8, dim=8, tokens=16, world=2, plan=tiny,
                                 variants=("dense", "ours", "ours/balanced")))
    assert set(moe["variants"]) == {"dense", "ours", "ours/balanced"}
    assert {"ours / dense", "ours/balanced / dense"} <= set(moe["ratios"])
    assert all(len(t) == 1 and len(t[0]) == 1 for t in moe["times"].values())
    assert "ours / dense" in format_moe(moe)
    # The pipelining tables from fake interleaved times (its own 2-rank run is the same runner).
    t = {"degree 1": [[3.0, 3.2]], "degree 2": [[2.0, 2.2]], "auto": [[2.1, 2.2]], "compute alone": [[1.8, 1.9]],
         "comm alone": [[1.0, 2.0]]}
    pipe = {"kind": "pipeline", "label": "E=4 K=2 tiny, plain loopback", "load_before": [0.0], "load_after": [0.0],
            **analyse_pipeline(t, auto_degree=2)}
    assert pipe["best_fixed"] == "degree 2"
    assert pipe["ratios"]["auto time / best fixed time"]["median"] == pytest.approx((2.1 / 2.0 + 1.0) / 2)
    assert pipe["ratios"]["best fixed time / max(compute alone, comm alone)"]["max"] == pytest.approx(2.0 / 1.8)
    # degree 2's floor max(C, M) + min(C, M) / 2 per iteration: 1.8 + 1.0 / 2, then 2.0 + 1.9 / 2
    assert pipe["ratios"]["best fixed time / its n-chunk floor"]["median"] == \
        pytest.approx((2.0 / 2.3 + 2.2 / 2.95) / 2)
    assert "best time / n-chunk floor" in "\n".join(report.pipeline_tables([pipe]))
    run = {"command": "moetrain-bench --test", "date": "today", "commit": "abc", "device": "cpu", "world": 2,
           "malloc": "default", "machine": machine.describe("cpu"), "load_start": [0.0], "load_end": [0.0],
           "wall_s": 1.0, "json_name": "x.json", "skipped": ["FSSDP vs EP: not in this test"], "results": [moe, pipe]}
    md = report.markdown(run, before=run)
    for heading in ("## MoE layer", "## Pipelined all-to-all", "## Skipped", "## Before / after"):
        assert heading in md
    assert "| E, K, F (D, T per rank) | ours / dense limit |" in md
    assert "| 4, 2, 8 (8, 16) |" in md


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_cuda_smoke_run_one_rank():
    from moetrain.bench.moe_layer import MoEBenchConfig
    from moetrain.bench.moe_layer import run as run_moe

    r = run_moe(MoEBenchConfig(experts=4, top_k=2, hidden=64, dim=64, tokens=128, world=1, device="cuda",
                               plan=Plan(reps=1, iters=2, warmup=1)))
    assert {"dense", "ours", "ours/balanced"} <= set(r["variants"])
    assert "skipped" in r["notes"]["ds/dropping"]  # DeepSpeed rows are CPU only
