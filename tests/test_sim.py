"""The scaling simulator (moetrain/sim/): its unit formulas, sanity of its predictions, the reuse of the real planning
code (destinations, chunks, memory plan), trace replay from a real run's metrics.jsonl, and the CLI's errors."""

import dataclasses
import json

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.validate import ConfigError
from moetrain.parallel.dispatch import dedup
from moetrain.parallel.dispatch.alltoall import _PlacementTables, assign_destinations
from moetrain.parallel.dispatch.placement import Placement
from moetrain.parallel.fssdp.placement import place_replicas
from moetrain.parallel.pipeline import chunk_of_slot, chunk_slot_range
from moetrain.sim.cli import main as sim_main
from moetrain.sim.cluster import PRESETS, Link
from moetrain.sim.comm import all_gather_time, all_reduce_time, all_to_all_time
from moetrain.sim.compute import experts_time, roofline, shared_makespan
from moetrain.sim.layer import moe_layer, routed_rows, unique_rows
from moetrain.sim.routing import balanced, parse_routing, read_trace, zipf
from moetrain.sim.step import for_cluster, simulate
from moetrain.train.memory_plan import format_plan, plan_memory
from tests.train_utils import SMALL, read_metrics

H100 = PRESETS["h100"]
BENCH = dict(num_experts=8, top_k=2, dim=512, hidden=1024, tokens=4096)  # bench/fssdp_bench.py's shapes


def uniform(W, nbytes):
    m = torch.full((W, W), float(nbytes))
    m.fill_diagonal_(0)
    return m


# ------------------------------------------------------------------------------------------ unit formulas
def test_alpha_beta_formulas():
    link = Link(alpha=1e-5, bandwidth=1e9)
    assert link.time(2e6, messages=3) == pytest.approx(3e-5 + 2e-3)
    c = H100
    # one node: (W-1) messages, max(sent, received) bytes over NVLink
    W, n = 8, 1e6
    assert all_to_all_time(uniform(W, n), c) == pytest.approx((W - 1) * c.intra.alpha + (W - 1) * n / c.intra.bandwidth)
    # two nodes, flat: the inter-node part (8 peers abroad) bounds it
    W = 16
    flat = max(7 * c.intra.alpha + 7 * n / c.intra.bandwidth, 8 * c.inter.alpha + 8 * n / c.inter.bandwidth)
    assert all_to_all_time(uniform(W, n), c) == pytest.approx(flat)
    # hierarchical: phase 1 moves 7 of 8 local columns x 2 nodes within the node, phase 2 the 8 rows per node abroad
    hier = (7 * c.intra.alpha + 7 * 2 * n / c.intra.bandwidth) + (1 * c.inter.alpha + 8 * n / c.inter.bandwidth)
    assert all_to_all_time(uniform(W, n), c, hierarchical=True) == pytest.approx(hier)
    # a shared link (loopback) carries every rank's bytes
    cpu = PRESETS["cpu"].with_(intra=Link(1e-4, 1e9, shared=True), devices_per_node=64)
    assert all_to_all_time(uniform(4, n), cpu) == pytest.approx(3e-4 + 12 * n / 1e9)
    # ring collectives
    S = 8e9
    assert all_gather_time(S, 8, c) == pytest.approx(7 * c.intra.alpha + 7 / 8 * S / c.intra.bandwidth)
    assert all_gather_time(S, 16, c) == pytest.approx(15 * c.inter.alpha + 15 / 16 * S / c.inter.bandwidth)
    assert all_reduce_time(S, 16, c) == pytest.approx(2 * all_gather_time(S, 16, c))
    assert all_to_all_time(torch.zeros(4, 4), c) == 0.0 and all_gather_time(S, 1, c) == 0.0


def test_roofline_formulas():
    c = H100
    assert roofline(10.0, 4.0, 2.0, 1.0) == 5.0 and roofline(1.0, 4.0, 2.0, 1.0) == 4.0
    R, E, D, F = 4096, 4, 512, 1024
    flops, nbytes = 6 * R * D * F, 2 * (3 * D * F * E + R * (2 * D + 3 * F))
    assert experts_time(R, E, D, F, c) == pytest.approx(max(flops / c.grouped_flops, nbytes / c.stream_bandwidth))
    # few rows per expert: the weights' bytes bound it
    assert experts_time(8, 64, D, F, c) == pytest.approx(2 * (3 * D * F * 64 + 8 * (2 * D + 3 * F))
                                                         / c.stream_bandwidth)
    # processor sharing: one device each = the slowest; 2 ranks on 1 core = the sum; 4 on 2 cores: 2+2 then 1 alone
    assert shared_makespan([1.0, 3.0], None) == 3.0
    assert shared_makespan([1.0, 3.0], 1.0) == pytest.approx(4.0)
    assert shared_makespan([1.0, 1.0, 1.0, 2.0], 2.0) == pytest.approx(2.0 + 1.0)


# -------------------------------------------------------------------- the real planning code, reused
@pytest.mark.parametrize("W,budget", [(2, 2), (4, 2), (4, 1)])
def test_routed_rows_follow_the_dispatchers_destination_rule(W, budget):
    """Per-(source, destination) rows from the simulator equal the dispatcher's own `assign_destinations`, for a
    placement with replicas from `place_replicas` and counts every replica count divides."""
    E = 8
    p = zipf(E, 1.2).steps[0][0]
    placement = place_replicas([e // (E // W) for e in range(E)], (p * 1000).tolist(), W, budget)
    assert placement.has_replicas()
    counts_E = torch.tensor([12 * (e + 1) for e in range(E)])  # divisible by every r_e <= 4
    sim_CSD, sim_DEC = routed_rows(counts_E.double()[None].expand(W, E), placement, degree=1)
    for s in range(W):
        tab = _PlacementTables(placement, s, "cpu")
        expert_R = torch.repeat_interleave(torch.arange(E), counts_E)
        dest_R = assign_destinations(expert_R, counts_E, tab, s)
        real_D = torch.bincount(dest_R, minlength=W).double()
        assert torch.equal(sim_CSD[0, s], real_D)
    assert sim_DEC.sum() == W * counts_E.sum()


def _sampled_blocks(E, K, W, n, alpha, T=4096, seed=0, load_E=None):
    """A top-K routing of T tokens drawn without replacement from Zipf(alpha) expert weights (hot experts at random
    ids) or from `load_E`, the contiguous placement's (rank, chunk) block of each expert, and (copies per block, the
    dispatcher's own unique rows per block: dedup.unique_rows)."""
    g = torch.Generator().manual_seed(seed)
    if load_E is None:
        load_E = (1.0 / torch.arange(1, E + 1).double() ** alpha)[torch.randperm(E, generator=g)]
    topk_TK = torch.multinomial(load_E.float().expand(T, E), K, replacement=False, generator=g)
    M = E // W
    block_E = torch.tensor([(e // M) * n + int(chunk_of_slot(torch.tensor(e % M), n, M)) for e in range(E)])
    expert_R = topk_TK.flatten()
    order_R = torch.argsort(block_E[expert_R] * E * T + expert_R * T + torch.arange(T * K) // K)  # (block, e, t)
    copy_R = order_R
    rows = dedup.unique_rows(copy_R, block_E[expert_R[order_R]], expert_R[order_R], T, K, W * n)
    copies_B = torch.bincount(block_E[expert_R], minlength=W * n).double()
    return copies_B, rows.unique_B.double()


@pytest.mark.parametrize("E,K,W,n,alpha,tol", [
    (64, 6, 2, 1, 0.0, 0.02), (32, 4, 4, 2, 0.0, 0.02), (16, 16, 2, 1, 0.0, 0.0), (8, 1, 2, 1, 0.0, 0.0),
    (8, 2, 2, 1, 1.2, 0.08), (128, 8, 4, 1, 1.2, 0.08)])
def test_unique_rows_predict_the_deduplicated_all_to_all(E, K, W, n, alpha, tol):
    """The rows the simulator sends (one per token and (rank, chunk) block) against the dispatcher's unique rows of a
    sampled routing: exact in expectation for equal loads (1.5% here: sampling), an approximation under skew (the
    formula sees a block's share of the copies, not how it splits over the block's experts; 4-6% here, up to 20% for
    8-expert chunks under Zipf 1.2)."""
    copies_B, real_B = _sampled_blocks(E, K, W, n, alpha)
    predicted_B = unique_rows(copies_B, 4096, K, E)
    assert torch.allclose(predicted_B, real_B, rtol=tol, atol=0.5)
    if K == 1:
        assert torch.equal(predicted_B, copies_B)  # one copy per token: nothing to share


@pytest.mark.parametrize("M,n", [(4, 2), (4, 4), (7, 4), (3, 8), (1, 2)])
def test_chunks_are_the_dispatchers(M, n):
    """The simulator splits a rank's experts with the function the dispatcher uses; its ranges invert it."""
    for j in range(n):
        lo, hi = chunk_slot_range(j, n, M)
        assert [s for s in range(M) if chunk_of_slot(s, n, M) == j] == list(range(lo, hi))
    _, rows_DEC = routed_rows(torch.ones(2, 2 * M, dtype=torch.float64) * 3, Placement.contiguous(2 * M, 2), n)
    per_chunk = rows_DEC[0, :M].sum(0)  # rank 0's experts 0..M-1
    expected = torch.tensor([6.0 * (chunk_slot_range(j, n, M)[1] - chunk_slot_range(j, n, M)[0]) for j in range(n)],
                            dtype=torch.float64)
    assert torch.equal(per_chunk, expected)


def test_bench_setup_matches_the_measured_row_balance():
    """bench/fssdp_bench.py's Zipf 1.2 set-up: docs/fssdp.md measured rows max/mean 1.559 (EP) and 1.005 (FSSDP) on 2
    ranks, 2.227 and 1.112 on 4, and spAG+spRS 12.0 MB per rank on 2; EP's token all-to-all bytes are the
    dispatcher's unique rows off-rank of the bench's own routing draw (dispatch + combine, forward + backward)."""
    from moetrain.sim.routing import topk_distinct_share

    cpu = PRESETS["cpu"]
    load = topk_distinct_share(zipf(8, 1.2).steps[0][0], 2)
    ep = moe_layer(cpu, 2, load_E=load, mode="ep", **BENCH)
    fs = moe_layer(cpu, 2, load_E=load, mode="fssdp", budget=2, **BENCH)
    assert ep.rows_max_over_mean == pytest.approx(1.559, abs=0.02)
    assert fs.rows_max_over_mean == pytest.approx(1.005, abs=0.02)
    p = zipf(8, 1.2).steps[0][0]
    _, rows_B = _sampled_blocks(8, 2, 2, 1, None, load_E=p)  # rank r's rows for the other rank: rows_B[1 - r]
    assert ep.a2a_bytes_per_rank == pytest.approx(4 * float(rows_B.mean()) * 512 * 4, rel=0.03)
    assert fs.a2a_bytes_per_rank < ep.a2a_bytes_per_rank  # replicas keep hot copies local
    assert fs.sparse_bytes_per_rank / 2**20 == pytest.approx(12.0, rel=0.01)
    bench4 = dict(BENCH, tokens=2048)
    assert moe_layer(cpu, 4, load_E=load, mode="ep", **bench4).rows_max_over_mean == pytest.approx(2.227, abs=0.03)
    assert moe_layer(cpu, 4, load_E=load, mode="fssdp", budget=2,
                     **bench4).rows_max_over_mean == pytest.approx(1.112, abs=0.02)


# ------------------------------------------------------------------------------------------ sanity
def test_balanced_routing_gives_fssdp_the_expert_compute_of_ep():
    load = balanced(8).steps[0][0]
    for W in (2, 4):
        ep = moe_layer(H100, W, load_E=load, mode="ep", **BENCH)
        fs = moe_layer(H100, W, load_E=load, mode="fssdp", budget=2, **BENCH)
        assert fs.replicas == [1] * 8 and fs.sparse == 0
        assert fs.experts == ep.experts and fs.total == pytest.approx(ep.total)


@pytest.fixture(scope="module")
def olmoe_cfg():
    return compose_config(["model=olmoe_like", "model.n_layers=2", "parallel.ep=8", "data.micro_batch_size=1",
                           "data.seq_len=4096", "data.global_batch_size=32"])


def test_more_bandwidth_is_never_slower(olmoe_cfg):
    load = zipf(64, 1.0, shuffle=True)
    for W in (8, 32):
        base = simulate(olmoe_cfg, W, H100, load).step
        for faster in (H100.with_(inter=Link(H100.inter.alpha, 4 * H100.inter.bandwidth)),
                       H100.with_(intra=Link(H100.intra.alpha, 4 * H100.intra.bandwidth)),
                       H100.with_(inter=Link(H100.inter.alpha / 4, H100.inter.bandwidth))):
            assert simulate(olmoe_cfg, W, faster, load).step <= base + 1e-12
        for d in (2, 4, 8):
            slow = H100.with_(inter=Link(H100.inter.alpha, H100.inter.bandwidth / 8))
            assert (simulate(olmoe_cfg, W, H100, load, degree=d).step
                    <= simulate(olmoe_cfg, W, slow, load, degree=d).step + 1e-12)


@pytest.mark.parametrize("bandwidth", [1e8, 1e9, 1e10, 1e11])
def test_pipelining_stays_between_the_overlap_bound_and_no_overlap(bandwidth):
    """Every degree takes at least max(compute, communication) (perfect overlap cannot be beaten) and the forward
    gains at most the hidden communication: never more than degree 1's serial time plus the extra latencies and the
    extra rows chunking sends (a token travels once per (rank, chunk): copies in two chunks of one rank go twice)."""
    c = H100.with_(intra=Link(1e-5, bandwidth))
    load = balanced(8).steps[0][0]
    serial = moe_layer(c, 2, load_E=load, degree=1, **BENCH)
    assert serial.total == pytest.approx(serial.compute + serial.all_to_all)  # degree 1 overlaps nothing
    for n in (2, 4):  # 4 local experts per rank
        p = moe_layer(c, 2, load_E=load, degree=n, **BENCH)
        assert p.total >= max(p.compute, p.all_to_all) - 1e-12
        assert p.a2a_bytes_per_rank >= serial.a2a_bytes_per_rank
        assert p.total <= serial.total + (p.all_to_all - serial.all_to_all) + 4 * n * c.intra.alpha * 3 + 1e-9
        assert p.exposed_comm <= p.all_to_all + 1e-12


def test_skew_costs_ep_and_fssdp_recovers_it():
    skew = zipf(8, 1.2).steps[0][0]
    ep = moe_layer(H100, 2, load_E=skew, mode="ep", **BENCH)
    fs = moe_layer(H100, 2, load_E=skew, mode="fssdp", budget=2, **BENCH)
    bal = moe_layer(H100, 2, load_E=balanced(8).steps[0][0], mode="ep", **BENCH)
    assert ep.experts > 1.4 * bal.experts and fs.experts < 1.05 * bal.experts


# -------------------------------------------------------------------------- memory = the dry run's plan
def test_memory_is_the_dry_runs_plan(olmoe_cfg, capsys):
    for W, cluster in ((8, H100), (16, PRESETS["a100"])):
        p = simulate(olmoe_cfg, W, cluster, balanced(64))
        plan = plan_memory(for_cluster(olmoe_cfg, cluster), W)
        assert dataclasses.asdict(p.memory) == dataclasses.asdict(plan)
        assert p.memory.precision == "bf16"
    overrides = ["model=olmoe_like", "model.n_layers=2", "parallel.ep=8", "data.micro_batch_size=1",
                 "data.seq_len=4096", "data.global_batch_size=32", "parallel.mixed_precision=bf16"]
    assert sim_main(["--gpus", "8", *overrides]) == 0
    out = capsys.readouterr().out
    assert format_plan(plan_memory(compose_config(overrides), 8)) in out


# ------------------------------------------------------------------------------------- trace replay
def test_trace_replays_a_training_runs_metrics(wandb_offline_run):
    """The per-expert counts a real (tiny) training run logged, read back step by step and simulated."""
    run_dir, _ = wandb_offline_run
    rows = [r for r in read_metrics(run_dir) if "moe/layer0/tokens_per_expert" in r]
    assert rows
    trace = read_trace(str(run_dir))
    assert len(trace.steps) == len(rows) and trace.layer_ids == [0, 1]
    for row, step in zip(rows, trace.steps):
        counts = torch.tensor(row["moe/layer1/tokens_per_expert"], dtype=torch.float64)
        assert torch.allclose(step[1], counts / counts.sum())
    one = parse_routing(f"trace:{run_dir / 'metrics.jsonl'}:1", 4)
    assert one.layer_ids == [1] and torch.equal(one.steps[-1][0], trace.steps[-1][1])
    cfg = compose_config(SMALL + ["parallel.ep=2"])
    p = simulate(cfg, 2, PRESETS["cpu"], trace, step=len(trace.steps) - 1)
    assert len(p.moe) == 2 and p.step > 0
    rows_W = trace.steps[-1][0].view(2, 2).sum(1)  # ep=2: experts 0-1 on rank 0, 2-3 on rank 1
    assert p.moe[0].rows_max_over_mean == pytest.approx(float(rows_W.max() / rows_W.mean()))


# ---------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv,message", [
    (["--cluster", "h1000"], "unknown cluster preset 'h1000'"),
    (["--gpus", "6", "parallel.ep=4"], "world size 6 is not divisible by parallel.ep=4"),
    (["--gpus", "6", "model=olmoe_like", "parallel.mode=fssdp"], "parallel.mode=fssdp"),
    (["--gpus", "0"], "--gpus 0"),
    (["--routing", "zipf:-1"], "--routing zipf:-1"),
    (["--routing", "trace:/nonexistent/run"], "no such metrics.jsonl"),
    (["--routing", "normal"], "unknown routing source"),
    (["model.dim=oops"], "model.dim"),
    (["--bogus"], "unrecognized arguments"),
    (["sweep", "--sizes", "8,x"], "--sizes 8,x"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert sim_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moetrain-sim") and ": error: " in err and message in err


def test_cli_predicts_and_compares(capsys):
    argv = ["--cluster", "h100", "--gpus", "16", "--routing", "zipf:1.2", "--compare", "model=olmoe_like",
            "model.n_layers=2", "parallel.ep=8", "data.micro_batch_size=1", "data.seq_len=2048",
            "data.global_batch_size=16"]
    assert sim_main(argv) == 0
    out = capsys.readouterr().out
    assert "ep=8 degree=1 ddp on 16 x h100" in out and "exposed_comm" in out
    assert "ep=8 degree=8" in out and "fssdp budget=1" in out  # E=64 is a multiple of 16: FSSDP compared too


def test_layout_errors_come_from_the_validator(olmoe_cfg):
    with pytest.raises(ConfigError):
        simulate(olmoe_cfg, 12, H100, balanced(64))


def test_calibration_figures_from_probe_times(tmp_path, capsys):
    """cluster_from_probes turns probe medians into a cluster (formulas in moetrain/sim/calibrate.py), and the
    cluster file round-trips through `--cluster FILE.json`."""
    from moetrain.sim.calibrate import A2A_LARGE, A2A_SMALL, COPY_NUMEL, D, F, K, cluster_from_probes

    W, T = 2, 4096
    R = T * K
    alpha, bw = 5e-4, 2e9
    moved = [s * (W - 1) for s in (A2A_SMALL, A2A_LARGE)]  # bytes all ranks send off-rank (each keeps 1/W)
    med = {"matmul": 2 * R * D * F / 50e9, "matmul_alone": 1.0, "grouped": 3 * 6 * R * D * F / 40e9,
           "copy": 8 * COPY_NUMEL / 20e9, "permute": 16 * R * D * 4 / 20e9,
           "a2a_small": alpha + moved[0] / bw, "a2a_large": alpha + moved[1] / bw}
    c = cluster_from_probes(med, W, T)
    assert c.matmul_flops == pytest.approx(50e9 * max(1.0, W / c.cores))
    assert c.grouped_efficiency == pytest.approx(0.8) and c.permute_passes == pytest.approx(16)
    assert c.intra.alpha == pytest.approx(alpha) and c.intra.bandwidth == pytest.approx(bw) and c.intra.shared
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(c.to_json()))
    assert sim_main(["--cluster", str(path), "--gpus", "2", "--routing", "zipf:1.2", *SMALL, "parallel.ep=2"]) == 0
    assert "on 2 x cpu" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert sim_main(["--cluster", str(bad)]) == 2
    assert "not a cluster file" in capsys.readouterr().err
