"""Scaling simulator: predict a training step's time, its breakdown and per-rank memory for a model config, a
parallel layout and a cluster, from the code that plans the real run (placement, chunking, memory plan) and an
alpha-beta / roofline cost model calibrated on this machine. Command: `moetrain-sim` (moetrain/sim/cli.py);
docs/scaling.md describes the model, its validation and what it leaves out."""

from moetrain.sim.cluster import PRESETS, Cluster, Link, load_cluster
from moetrain.sim.layer import LayerPrediction, moe_layer
from moetrain.sim.routing import RoutingLoad, balanced, parse_routing, read_trace, zipf
from moetrain.sim.step import BREAKDOWN, StepPrediction, simulate

__all__ = ["PRESETS", "Cluster", "Link", "load_cluster", "LayerPrediction", "moe_layer", "RoutingLoad", "balanced",
           "parse_routing", "read_trace", "zipf", "BREAKDOWN", "StepPrediction", "simulate"]
