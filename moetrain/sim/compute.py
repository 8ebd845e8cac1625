"""Roofline compute model with efficiency factors, and the sharing of CPU cores between ranks.

A kernel doing `flops` floating-point operations and moving `nbytes` to and from memory takes
    t = max(flops / (peak_flops * efficiency), nbytes / (memory_bandwidth * memory_efficiency))
(the roofline: whichever of arithmetic or memory traffic bounds it). Efficiencies come from `moetrain-sim calibrate`
on the CPU machine (measured fp32 matmul and grouped-GEMM rates against the nominal peak) and are assumptions for the
GPU presets (moetrain/sim/cluster.py).

SwiGLU expert of hidden F on R rows of width D (three D x F matmuls), forward:
    flops = 6 * R * D * F;   bytes = b * (3*D*F + R*(2*D + 3*F))    (weights; rows in and out; h1, h3, product)
backward = 2 x the forward flops (gradients of the input and of the weights), 2 x the bytes.

CPU ranks share cores (`Cluster.cores`): when k ranks compute at once on C cores each runs at min(1, C/k) of a
core. `shared_makespan` gives the wall time of per-rank single-core works under that processor sharing: a rank that
finishes early hands its core to the others (why four ranks on two cores suffer less from imbalance than the row
counts suggest).
"""

from __future__ import annotations

from typing import Sequence

from moetrain.sim.cluster import Cluster


def roofline(flops: float, nbytes: float, flop_rate: float, byte_rate: float) -> float:
    return max(flops / flop_rate, nbytes / byte_rate)


def swiglu_flops(rows: float, dim: int, hidden: int) -> float:
    """Forward FLOPs of a SwiGLU on `rows` rows: three D x F matmuls, 2 FLOPs per multiply-add."""
    return 6.0 * rows * dim * hidden


def experts_time(rows: float, num_experts: int, dim: int, hidden: int, cluster: Cluster) -> float:
    """Forward seconds of the grouped SwiGLU over `rows` rows spread over `num_experts` local experts."""
    if rows <= 0:
        return 0.0
    b = cluster.dtype_bytes
    nbytes = b * (3 * dim * hidden * num_experts + rows * (2 * dim + 3 * hidden))
    return roofline(swiglu_flops(rows, dim, hidden), nbytes, cluster.grouped_flops, cluster.stream_bandwidth)


def matmul_time(m: float, k: int, n: int, cluster: Cluster) -> float:
    """Forward seconds of an (m x k) @ (k x n) matmul."""
    b = cluster.dtype_bytes
    return roofline(2.0 * m * k * n, b * (m * k + k * n + m * n), cluster.dense_flops, cluster.stream_bandwidth)


def stream_time(nbytes: float, cluster: Cluster) -> float:
    return nbytes / cluster.stream_bandwidth


def shared_makespan(works: Sequence[float], cores: float | None) -> float:
    """Wall seconds for ranks with single-core works `works` on `cores` shared cores (None: one device each)."""
    works = sorted(float(w) for w in works)
    if cores is None or not works:
        return max(works, default=0.0)
    t, done, n = 0.0, 0.0, len(works)
    for i, w in enumerate(works):
        busy = n - i
        speed = min(1.0, cores / busy)
        t += (w - done) / speed
        done = w
    return t


def sharing_factor(ranks: int, cores: float | None) -> float:
    """Slow-down of equal work on every rank: max(1, ranks / cores)."""
    return 1.0 if cores is None else max(1.0, ranks / cores)
