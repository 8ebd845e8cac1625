"""Apply a compression method to every MoE layer of a model and write the result as an ordinary run directory.

The compressed model is a plain TransformerLM whose config gives each MoE layer its new expert count
(model.experts_per_layer, or model.num_experts when every layer keeps the same number); every other tensor (attention,
dense FFNs, shared experts, embeddings) is copied unchanged. `write_compressed` writes OUT/config.yaml and a
weights-only checkpoint at step 0 (moetrain/interop/run_dir.py), so the output trains (`moetrain-train -cd OUT -cn
config`, any parallel layout), evaluates, generates and exports like any run, plus OUT/compression.json: the method,
the per-layer counts, which original experts each new expert came from, and the expert-weight memory before and after.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from moetrain.compress.calibration import LayerStats
from moetrain.compress.experts import LayerExperts
from moetrain.compress.methods import METHODS, LayerJob, LayerResult
from moetrain.config.schema import TrainConfig
from moetrain.model.transformer import TransformerLM, layer_num_experts, moe_layer_ids
from moetrain.moe.layer import MoELayer

REPORT_FILE = "compression.json"
EXPERT_KEYS = ("router.gate.weight", "router.expert_bias_E", "experts.w1_EDF", "experts.w3_EDF", "experts.w2_EFD")


@dataclass
class Compressed:
    cfg: TrainConfig
    model: TransformerLM
    report: dict


def layer_experts(layer: MoELayer) -> LayerExperts:
    """The experts of a layer holding all of them (single process), as plain tensors."""
    r, ex = layer.router, layer.experts
    return LayerExperts(*(t.detach().clone() for t in (r.gate.weight, r.expert_bias_E, ex.w1_EDF, ex.w3_EDF,
                                                         ex.w2_EFD)))


def check_compressible(model: TransformerLM) -> None:
    """Every MoE layer holds all its experts (one process) and its router is a gate row and a bias entry per expert
    (no virtual experts, no other router parameters); else a one-line ValueError."""
    for layer in model.moe_layers():
        names = {n for n, _ in layer.router.named_parameters()} | {n for n, _ in layer.router.named_buffers()}
        if layer.router.gate.weight.shape[0] != layer.num_experts or names - {"gate.weight", "expert_bias_E"}:
            raise ValueError(f"router.method={layer.router_cfg.method} scores choices other than the routed experts "
                             f"(or has other router parameters); moetrain-compress handles routers with one gate row "
                             f"per expert (e.g. router=default)")
        if len(layer.experts.expert_ids) != layer.num_experts:
            raise ValueError("compress a model holding every expert in this process (load it with load_run_model)")


def compressed_config(cfg: TrainConfig, counts: list[int]) -> TrainConfig:
    """`cfg` with the MoE layers' new expert counts: model.num_experts when all are equal, else
    model.experts_per_layer (model.num_experts their largest)."""
    new = copy.deepcopy(cfg)
    if len(set(counts)) == 1:
        new.model.num_experts, new.model.experts_per_layer = counts[0], None
    else:
        new.model.num_experts, new.model.experts_per_layer = max(counts), list(counts)
    return new


def expert_bytes(model: torch.nn.Module) -> int:
    """Bytes of the routed experts' weights (the tensors with `expert_ids`) as stored."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if getattr(p, "expert_ids", None) is not None)


@torch.no_grad()
def compress_model(cfg: TrainConfig, model: TransformerLM, stats: list[LayerStats], method: str,
                   keep: list[int], seed: int = 0) -> Compressed:
    """Compress every MoE layer of `model` (every expert on this process) to keep[j] experts (j-th MoE layer) with
    `method`, from the calibration statistics `stats` (compress/calibration.py, same layer order)."""
    check_compressible(model)
    if method not in METHODS:
        raise ValueError(f"--method {method} is unknown; choose one of {', '.join(sorted(METHODS))}")
    layers = list(model.moe_layers())
    results: list[LayerResult] = []
    for layer, s, k in zip(layers, stats, keep):
        job = LayerJob(layer.layer_id, layer_experts(layer), s, k, cfg.router, seed)
        result = METHODS[method](job)
        if result.experts.num_experts != k:
            raise RuntimeError(f"method {method} returned {result.experts.num_experts} experts for layer "
                               f"{layer.layer_id}, not {k}")
        results.append(result)
    new_cfg = compressed_config(cfg, keep)
    new_model = TransformerLM(new_cfg.model, new_cfg.router)
    state = model.state_dict()
    new_state = new_model.state_dict()
    for name in new_state:
        new_state[name] = state[name]
    for layer, result in zip(layers, results):
        prefix = f"layers.{layer.layer_id}.ffn."
        ex = result.experts
        for key, t in zip(EXPERT_KEYS, (ex.gate_ED, ex.bias_E, ex.w1_EDF, ex.w3_EDF, ex.w2_EFD)):
            new_state[prefix + key] = t.to(state[prefix + key].dtype)
    new_model.load_state_dict(new_state)
    new_model.eval()
    report = {
        "method": method, "seed": seed, "calibration_tokens": stats[0].num_tokens if stats else 0,
        "layers": [{"layer": layer.layer_id, "experts_before": layer.num_experts, "experts_after": k,
                    "sources": r.sources} for layer, k, r in zip(layers, keep, results)],
        "expert_bytes_before": expert_bytes(model), "expert_bytes_after": expert_bytes(new_model),
    }
    return Compressed(new_cfg, new_model, report)


def write_compressed(out: Path, compressed: Compressed, source: str) -> Path:
    """OUT/config.yaml, OUT/checkpoints/step_00000000 (weights only) and OUT/compression.json; returns the
    checkpoint directory."""
    from moetrain.interop.run_dir import write_run_dir

    out = Path(out)
    cfg = copy.deepcopy(compressed.cfg)
    cfg.trainer.resume = "auto"
    checkpoint = write_run_dir(out, cfg, compressed.model)
    (out / REPORT_FILE).write_text(json.dumps({"source": source, **compressed.report}, indent=1) + "\n")
    return checkpoint


def experts_per_moe_layer(cfg: TrainConfig) -> list[int]:
    """E of each MoE layer of `cfg`, in order."""
    return [layer_num_experts(cfg.model, i) for i in moe_layer_ids(cfg.model)]
