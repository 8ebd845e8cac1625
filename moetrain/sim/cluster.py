"""Cluster descriptions: what one device computes and how fast devices talk, inside a node and across nodes.

A `Cluster` holds per-device peaks (matmul FLOP/s in the training dtype, memory bandwidth), the efficiency factors
that turn peaks into achieved rates (measured by `moetrain-sim calibrate` for the CPU preset; for GPUs they are
stated assumptions, see docs/scaling.md), and one alpha-beta `Link` per link type:

    time of one message of n bytes on a link = alpha + n / bandwidth        (beta = 1 / bandwidth)

`intra` joins the devices of one node (NVLink, or loopback on the CPU machine); `inter` is one device's share of
the node's network (the node's NICs divided by its devices: a DGX H100 has one 400 Gbit/s NIC per GPU).

Preset peaks are vendor datasheet figures (dense, no sparsity): H100 SXM and H200 SXM 989 TFLOP/s bf16, 3.35 and
4.8 TB/s HBM, NVLink 4 at 450 GB/s per direction, one 400 Gbit/s InfiniBand NIC per GPU; A100 SXM 80 GB 312
TFLOP/s bf16, 2.04 TB/s, NVLink 3 at 300 GB/s per direction, one 200 Gbit/s NIC per GPU; V100 SXM2 125 TFLOP/s fp16
(tensor cores; V100 has no bf16), 0.9 TB/s, NVLink 2 at 150 GB/s per direction, and the node's network as a
parameter (100 Gbit/s per node in Hecate's set-up). Link latencies and all GPU efficiency factors are assumptions.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

GB = 1e9


@dataclass(frozen=True)
class Link:
    """alpha: seconds per message (latency and per-call overhead); bandwidth: bytes/s one device sends (and
    receives) at once on this link type, or all devices of the node together when `shared`."""

    alpha: float
    bandwidth: float
    shared: bool = False  # one path for all devices of the node (loopback): the sum of their bytes crosses it

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth

    def time(self, nbytes: float, messages: float = 1.0) -> float:
        return messages * self.alpha + nbytes / self.bandwidth


@dataclass(frozen=True)
class Cluster:
    name: str
    devices_per_node: int
    matmul_flops: float  # peak FLOP/s of a dense matmul in the compute dtype, one device
    memory_bandwidth: float  # bytes/s, one device
    memory_bytes: float  # device memory capacity
    intra: Link
    inter: Link  # one device's share of the node's network
    dtype_bytes: int = 2  # the compute dtype the peaks are for (2: bf16/fp16, 4: fp32)
    matmul_efficiency: float = 0.7  # achieved / peak for the model's dense matmuls
    grouped_efficiency: float = 0.6  # achieved / peak for the experts' grouped GEMMs
    memory_efficiency: float = 0.8  # achieved / peak for memory-bound passes (permutation, optimizer)
    optimizer_bytes_per_element: float = 28.0  # AdamW: reads param, grad, 2 moments (16 B), writes 3 (12 B), fp32
    permute_passes: float = 16.0  # read+write passes over the routed rows per layer, forward + backward
    cores: Optional[float] = None  # CPU only: cores the ranks share (None: one device per rank)
    host_copy_bandwidth: Optional[float] = None  # CPU only: bytes/s of all-to-all payload the cores copy (loopback)
    notes: str = ""

    @property
    def grouped_flops(self) -> float:
        return self.matmul_flops * self.grouped_efficiency

    @property
    def dense_flops(self) -> float:
        return self.matmul_flops * self.matmul_efficiency

    @property
    def stream_bandwidth(self) -> float:
        return self.memory_bandwidth * self.memory_efficiency

    def nodes(self, world: int) -> int:
        return -(-world // self.devices_per_node)

    def with_(self, **changes) -> "Cluster":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Cluster":
        d = dict(d)
        d["intra"], d["inter"] = Link(**d["intra"]), Link(**d["inter"])
        return Cluster(**d)


def _gpu(name, gpus, flops, hbm, mem, nvlink, nic, notes="") -> Cluster:
    # alpha per peer message (NCCL's all-to-all posts one send/receive per peer): assumptions, not measurements
    return Cluster(name, gpus, flops, hbm, mem, intra=Link(3e-6, nvlink), inter=Link(5e-6, nic), notes=notes)


# The CPU machine these tests and benchmarks run on (2 cores): the calibration probes of bench/sim_validate.py's
# 2-rank run (fp32, one thread per rank, gloo over loopback); docs/scaling.md has the run and its load.
CPU_CALIBRATED = Cluster(
    name="cpu", devices_per_node=64, matmul_flops=78.7e9, memory_bandwidth=23.0e9, memory_bytes=64e9,
    intra=Link(6.7e-4, 2.19e9, shared=True), inter=Link(6.7e-4, 2.19e9, shared=True), dtype_bytes=4,
    matmul_efficiency=1.0, grouped_efficiency=0.95, memory_efficiency=1.0, permute_passes=56.0, cores=2.0,
    host_copy_bandwidth=2.19e9,
    notes="bench/sim_validate.py probes, 2 ranks, load average 1.7-2.1 (docs/scaling.md)")

PRESETS: dict[str, Cluster] = {
    "h100": _gpu("h100", 8, 989e12, 3.35e12, 80e9, 450 * GB, 50 * GB, "DGX H100: 8x H100 SXM, NVLink 4, 8x 400G IB"),
    "h200": _gpu("h200", 8, 989e12, 4.8e12, 141e9, 450 * GB, 50 * GB, "8x H200 SXM, NVLink 4, 8x 400G IB"),
    "a100": _gpu("a100", 8, 312e12, 2.039e12, 80e9, 300 * GB, 25 * GB, "DGX A100 80GB: NVLink 3, 8x 200G IB"),
    "v100": _gpu("v100", 8, 125e12, 0.9e12, 32e9, 150 * GB, 12.5 * GB / 8,
                 "8x V100 SXM2, NVLink 2, one 100 Gbit/s NIC per node"),
    "cpu": CPU_CALIBRATED,
}

def load_cluster(name_or_path: str) -> Cluster:
    """A preset name, or a JSON file written by `moetrain-sim calibrate --out FILE`. ValueError (one line) else."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        try:
            return Cluster.from_json(json.loads(path.read_text()))
        except (TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"--cluster {name_or_path}: not a cluster file written by `moetrain-sim calibrate` "
                             f"({type(e).__name__}: {e})") from None
    raise ValueError(f"unknown cluster preset {name_or_path!r}; choose one of {', '.join(PRESETS)} or a JSON file "
                     f"written by `moetrain-sim calibrate --out FILE.json`")

