"""Import a Hugging Face model directory into a moetrain run directory, and export a run back.

Import:  config.json -> the family's model and router keys (refusing what moetrain cannot represent), composed with the
         user's overrides (theirs win) and validated -> the model built under the parallel layout of the overrides
         (`parallel.ep`, `parallel.mode=fssdp`), exactly as the trainer builds it -> every tensor read from the
         checkpoint one at a time, each rank reading only the experts it holds -> `write_run_dir` (collective).
         Every check (settings, missing or unexpected tensors, shapes) runs before anything is read or written, on
         every rank alike.
Export:  the run loaded in one process -> the family (`arch`, or the one the model's structure names) checks that it
         can represent the model and routing -> config.json + safetensors shards in the hub layout (per-expert
         tensors), written one shard at a time.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from moetrain.config.schema import ModelConfig, TrainConfig
from moetrain.interop import ConvertError
from moetrain.interop.hf import common as c
from moetrain.interop.hf.base import FAMILIES, Family, family_for, family_named
from moetrain.interop.hf.io import (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, HFCheckpoint, parse_size, read_hf_config,
                                    write_safetensors)

DEFAULT_MAX_SHARD_SIZE = "5GB"


# ------------------------------------------------------------------------------------------------------- config
def hf_config_to_moetrain(hf_config: dict) -> tuple[dict, dict]:
    """(model keys, router keys) of a config.json dict; a ConvertError names the first setting moetrain cannot
    represent."""
    family = family_for(hf_config)
    if hf_config.get("quantization_config"):
        method = hf_config["quantization_config"].get("quant_method", "?")
        raise c.refuse("quantization_config.quant_method", method, "quantized checkpoints do not import; "
                       "dequantize the weights to bf16 or fp32 first")
    model_keys, router_keys = family.to_moetrain(hf_config)
    if family.moe and not family.has_expert_bias:
        # The architecture routes without a selection bias: training keeps it that way (the run stays exportable to
        # its own architecture); router.bias_update_rate=... on the command line turns the bias back on.
        router_keys.setdefault("bias_update_rate", 0.0)
    return model_keys, router_keys


def _pinned(overrides: Sequence[str]) -> set[str]:
    """The dotted keys the user sets with key=value (they win over the checkpoint's settings)."""
    keys = set()
    for item in overrides:
        key, sep, _ = item.partition("=")
        if sep:
            keys.add(key.lstrip("+~"))
    return keys


def import_config(hf_config: dict, overrides: Sequence[str] = (), world_size: int = 1) -> TrainConfig:
    """The TrainConfig of an import: composed from `overrides` (presets and key=value), then every model and router
    setting of the checkpoint that the user did not set with key=value; validated for `world_size` ranks. The routing
    method stays the composed one (top-k unless a preset says otherwise)."""
    from moetrain.config.compose import compose_config
    from moetrain.config.validate import validate

    model_keys, router_keys = hf_config_to_moetrain(hf_config)
    cfg = compose_config(list(overrides))
    pinned = _pinned(overrides)
    for key, value in model_keys.items():
        if f"model.{key}" not in pinned:
            setattr(cfg.model, key, value)
    for key, value in router_keys.items():
        if key != "method" and f"router.{key}" not in pinned and hasattr(cfg.router, key):
            setattr(cfg.router, key, value)
    validate(cfg, world_size)
    return cfg


# ------------------------------------------------------------------------------------------------------- import
def build_model(cfg: TrainConfig, ctx=None) -> torch.nn.Module:
    """The TransformerLM of `cfg` under the parallel layout of `ctx` (moetrain.parallel.mesh.ParallelContext; None:
    one process), built as the trainer builds it (weights not initialised: the import fills them)."""
    from moetrain.model.transformer import TransformerLM
    from moetrain.parallel.moe_layer import moe_layer_factory

    if ctx is None or not ctx.is_distributed:
        return TransformerLM(cfg.model, cfg.router)
    fssdp = cfg.parallel.fssdp if cfg.parallel.mode == "fssdp" else None
    factory = moe_layer_factory(cfg.router, ctx.ep_group, ctx.world_group, fssdp, cfg.parallel.pipeline_degree,
                                cfg.parallel.pipeline_split)
    return TransformerLM(cfg.model, cfg.router, factory)


def _present(ckpt: HFCheckpoint, t: c.Tensor) -> Optional[str]:
    return next((k for k in (t.hf, *t.aliases) if k in ckpt), None)


def _expected(t: c.Tensor, target: torch.Tensor) -> tuple[int, ...]:
    """The checkpoint shape of a moetrain tensor (its layout change applied to an empty tensor of its shape)."""
    return tuple(t.to_hf(torch.empty(target.shape, device="meta")).shape)


def _shape_error(key: str, have, want) -> ConvertError:
    return ConvertError(f"checkpoint tensor {key} has shape {list(have)}, but config.json describes {list(want)}; "
                        f"the weights do not match their config.json")


def _expert_layout(ckpt: HFCheckpoint, ex: c.Experts) -> tuple[str, Optional[str]]:
    """("per_expert", None) or ("fused", prefix) for the experts of one layer, or a ConvertError naming what is
    missing."""
    if ex.per_expert(0)[0] in ckpt:
        return "per_expert", None
    for prefix in ex.fused:
        if f"{prefix}.gate_up_proj" in ckpt:
            return "fused", prefix
    raise ConvertError(f"the checkpoint has no tensor {ex.per_expert(0)[0]} (nor the fused {ex.fused[0]}"
                       f".gate_up_proj); it does not hold the experts config.json describes")


def check_checkpoint(ckpt: HFCheckpoint, tmap: c.TensorMap, state: dict, model: ModelConfig,
                     family: type[Family]) -> dict[str, tuple[str, Optional[str]]]:
    """Every check before reading: each moetrain tensor is mapped; each mapped tensor is in the checkpoint with the
    right shape (every expert of every layer, not only this rank's); nothing in the checkpoint is left unexplained.
    Returns the expert layout of each MoE layer."""
    mapped = {t.moe for t in tmap.tensors} | set(tmap.zeros)
    mapped |= {f"{ex.moe}.{w}" for ex in tmap.experts for w in ("w1_EDF", "w3_EDF", "w2_EFD")}
    unmapped = sorted(set(state) - mapped)
    if unmapped:
        raise ConvertError(f"{family.architecture} has no tensor for moetrain's {unmapped[0]}; this model setting "
                           f"does not convert")
    used: set[str] = set()
    for t in tmap.tensors:
        key = _present(ckpt, t)
        if key is None:
            hint = " (config.json says tie_word_embeddings=false)" if t.hf == "lm_head.weight" else ""
            raise ConvertError(f"the checkpoint has no tensor {t.hf}{hint}; it does not hold the model its "
                               f"config.json describes")
        want = _expected(t, state[t.moe])
        if ckpt.shape(key) != want:
            raise _shape_error(key, ckpt.shape(key), want)
        used.add(key)
    layouts = {}
    D, F, E = model.dim, model.moe_hidden, model.num_experts
    for ex in tmap.experts:
        layout, prefix = layouts[ex.moe] = _expert_layout(ckpt, ex)
        if layout == "fused":
            for key, want in ((f"{prefix}.gate_up_proj", (E, 2 * F, D)), (f"{prefix}.down_proj", (E, D, F))):
                if key not in ckpt:
                    raise ConvertError(f"the checkpoint has no tensor {key}")
                if ckpt.shape(key) != want:
                    raise _shape_error(key, ckpt.shape(key), want)
                used.add(key)
            continue
        for e in range(E):
            for key, want in zip(ex.per_expert(e), ((F, D), (F, D), (D, F))):
                if key not in ckpt:
                    raise ConvertError(f"the checkpoint has no tensor {key}; config.json describes {E} experts of "
                                       f"hidden size {F}")
                if ckpt.shape(key) != want:
                    raise _shape_error(key, ckpt.shape(key), want)
                used.add(key)
    for key, shape in tmap.constants:  # present or not, never read (transformers fills what is absent)
        if key in ckpt and ckpt.shape(key) != shape:
            raise _shape_error(key, ckpt.shape(key), shape)
        used.add(key)
    for key in ckpt.keys():
        if key in used or family.ignored(key, model):
            continue
        if key == "lm_head.weight" and model.tie_embeddings:
            if torch.equal(ckpt.get(key), ckpt.get("model.embed_tokens.weight")):
                continue
            raise ConvertError("config.json says tie_word_embeddings=true but the checkpoint's lm_head.weight differs "
                               "from model.embed_tokens.weight; fix tie_word_embeddings")
        raise ConvertError(f"checkpoint tensor {key} has no place in the model config.json describes (a setting "
                           f"moetrain does not represent, or a config.json that does not match the weights)")
    return layouts


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, cfg: TrainConfig, ckpt: HFCheckpoint, hf_config: dict) -> None:
    """Fill `model` (any parallel layout) from the checkpoint: plain tensors one at a time, then each expert this
    rank holds (by its global id), one expert at a time (a row of a fused stack is read alone)."""
    family = family_for(hf_config)
    tmap = family.tensor_map(cfg.model, hf_config)
    state = model.state_dict(keep_vars=True)
    layouts = check_checkpoint(ckpt, tmap, state, cfg.model, family)
    for t in tmap.tensors:
        state[t.moe].copy_(t.to_moe(ckpt.get(_present(ckpt, t))))
    for name in tmap.zeros:
        state[name].zero_()
    F = cfg.model.moe_hidden
    for ex in tmap.experts:
        w1, w3, w2 = (state[f"{ex.moe}.{w}"] for w in ("w1_EDF", "w3_EDF", "w2_EFD"))
        layout, prefix = layouts[ex.moe]
        for row, e in enumerate(w1.expert_ids):
            if layout == "per_expert":
                gate, up, down = (ckpt.get(k) for k in ex.per_expert(e))
            else:
                gate_up = ckpt.get_row(f"{prefix}.gate_up_proj", e)
                gate, up, down = gate_up[:F], gate_up[F:], ckpt.get_row(f"{prefix}.down_proj", e)
            w1[row].copy_(gate.T)
            w3[row].copy_(up.T)
            w2[row].copy_(down.T)


def _context(cfg: TrainConfig):
    """The ParallelContext of an initialised default process group (the layout of `cfg.parallel`), None in one
    process."""
    from datetime import timedelta

    from moetrain.parallel.mesh import ParallelContext, build_groups

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    ep = dist.get_world_size() if cfg.parallel.mode == "fssdp" else cfg.parallel.ep
    return build_groups(ParallelContext(ep=ep), timedelta(seconds=cfg.parallel.timeout_s))


def load_hf_model(src: Path, overrides: Sequence[str] = (), ctx=None) -> tuple[TrainConfig, torch.nn.Module]:
    """(TrainConfig, TransformerLM in eval mode) of a Hugging Face model directory, in memory. Single process unless a
    process group is initialised (then under the layout of `overrides`, each rank holding its experts)."""
    src = Path(src)
    hf_config = read_hf_config(src)
    with HFCheckpoint(src) as ckpt:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        cfg = import_config(hf_config, overrides, world)
        ctx = ctx if ctx is not None else _context(cfg)
        model = build_model(cfg, ctx)
        load_hf_weights(model, cfg, ckpt, hf_config)
    return cfg, model.eval()


def import_hf(src: Path, out: Path, overrides: Sequence[str] = ()) -> Path:
    """Convert the Hugging Face model directory `src` into the run directory `out` (config.yaml + a weights-only
    step-0 checkpoint); return the checkpoint. Collective under a process group (each rank reads its experts)."""
    from moetrain.interop.run_dir import write_run_dir
    from moetrain.train import checkpoint as ckpt_io

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file; give a directory path")
    existing = ckpt_io.find_latest(out / "checkpoints")
    if existing is not None:
        raise ConvertError(f"{out} already holds a checkpoint ({existing}); choose a new --out directory or remove "
                           f"the old run")
    cfg, model = load_hf_model(src, overrides)
    return write_run_dir(out, cfg, model)


# ------------------------------------------------------------------------------------------------------- export
def family_for_model(cfg: TrainConfig) -> type[Family]:
    """The Hugging Face architecture whose structure matches the model (its settings are checked by the family)."""
    m = cfg.model
    if m.attention == "mla":
        return FAMILIES["deepseek_v3"]
    if m.num_experts == 0 or not c.moe_layers(m):
        return FAMILIES["qwen3" if m.qk_norm == "head" else "qwen2" if m.qkv_bias else "llama"]
    if m.qk_norm == "full":
        return FAMILIES["olmoe"]
    if m.qk_norm == "head":
        return FAMILIES["qwen3_moe"]
    all_moe = len(c.moe_layers(m)) == m.n_layers
    if m.shared_expert_gate or m.qkv_bias or not all_moe or not cfg.router.norm_topk_prob:
        return FAMILIES["qwen2_moe"]
    return FAMILIES["mixtral"]


def hf_tensors(model: torch.nn.Module, cfg: TrainConfig, family: type[Family]) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every tensor of a single-process model, in the hub layout (per-expert
    nn.Linear weights). The selection bias of a family without one must be zero (checked before the first)."""
    tmap = family.tensor_map(cfg.model)
    state = model.state_dict()
    for name in tmap.zeros:
        if torch.count_nonzero(state[name]):
            raise ConvertError(f"{name} is not zero: {family.architecture} has no balancing bias, so the export "
                               f"would route differently; train with router.bias_update_rate=0 to export as "
                               f"{family.model_type}")
    written = set()
    for t in tmap.tensors:
        if t.hf not in written:  # tied embeddings: one tensor
            written.add(t.hf)
            yield t.hf, t.to_hf(state[t.moe]).contiguous()
    for key, shape in tmap.constants:
        yield key, torch.zeros(shape)
    for ex in tmap.experts:
        w1, w3, w2 = (state[f"{ex.moe}.{w}"] for w in ("w1_EDF", "w3_EDF", "w2_EFD"))
        for e in range(w1.shape[0]):
            for key, w in zip(ex.per_expert(e), (w1[e], w3[e], w2[e])):
                yield key, w.T.contiguous()


EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_hf(src: Path, out: Path, step: Optional[int] = None, arch: Optional[str] = None,
              max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, dtype: str = "float32") -> list[Path]:
    """Write the run (or checkpoint) `src` as a Hugging Face model directory `out` (config.json + safetensors in the
    hub layout, sharded with an index above `max_shard_size`); `arch`: the model_type to write (default: the one the
    model's structure names); `dtype`: float32 (exact) | bfloat16 | float16 (rounded). Returns the files written."""
    from moetrain.interop.run_dir import load_run_model

    out = Path(out)
    limit = parse_size(max_shard_size)
    if dtype not in EXPORT_DTYPES:
        raise ConvertError(f"--dtype {dtype} is not a dtype the export writes; use {', '.join(EXPORT_DTYPES)}")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} is a file; give a directory path")
    clash = [p.name for p in (out / CONFIG_FILE, out / SINGLE_FILE, out / INDEX_FILE) if p.exists()]
    clash += [p.name for p in out.glob("model-*.safetensors")] if out.is_dir() else []
    if clash:
        raise ConvertError(f"{out} already holds a Hugging Face model ({clash[0]}); choose a new --out directory")
    cfg, model = load_run_model(src, step)
    family = family_named(arch) if arch else family_for_model(cfg)
    hf_config = {**family.to_hf(cfg), "dtype": dtype}
    tensors = hf_tensors(model, cfg, family)
    first = next(tensors)  # runs the bias check before anything is written
    out.mkdir(parents=True, exist_ok=True)

    def all_tensors():
        for name, tensor in itertools.chain([first], tensors):
            yield name, tensor.to(EXPORT_DTYPES[dtype])

    files = write_safetensors(out, all_tensors(), limit)
    (out / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")
    return [out / CONFIG_FILE, *files]
