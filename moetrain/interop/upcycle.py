"""Dense-to-MoE upcycling: an MoE run directory whose experts start as the dense model's feed-forward network.

Legend: D model dim, F the dense FFN's hidden size, G split, E routed experts (num_experts), C = E / G copies.

    moetrain-convert SRC --upcycle --num-experts E [--split G] [--noise STD] [--seed S] --out OUT [OVERRIDE ...]

SRC is a dense moetrain run directory (model.num_experts=0, or a checkpoint directory inside one) or a Hugging Face
Llama / Qwen2 / Qwen3 dense model directory. Every layer becomes an MoE layer (overrides such as
model.first_k_dense=1 or model.moe_every=2 keep some dense: those keep the dense FFN as it is); everything but the
FFNs is copied.

Fine-grained split (as in Qwen's upcycling): the dense SwiGLU y = w2 (silu(w1 x) * w3 x) is cut along F into G
segments of F/G hidden neurons, y = sum_g y_g with y_g = w2[:, g] (silu(w1[g] x) * w3[g] x), and each segment is
copied C = E / G times: expert e = c * G + g holds segment g (w1_EDF[e] = w1[g].T, w3_EDF[e] = w3[g].T,
w2_EFD[e] = w2[:, g].T), so model.moe_hidden = F / G. With G = 1 every expert is the whole FFN.

The router is initialised as the model's init configures it (trunc-normal gate, zero balancing bias), with one change
when G > 1: the G experts of a copy share one gate row (copy c's), so their scores tie and top-k picks whole copies.
The router defaults become top_k = G * min(2, C) (two copies), route_scale = G, norm_topk_prob = true. Then at step
0 the MoE computes exactly the dense FFN: the k = G * K selected experts are the G segments of K copies c with
renormalised gates p_c / (G * sum_c' p_c'), so
    route_scale * sum_selected gate * expert(x) = G * sum_c p_c / (G * sum p) * sum_g y_g = y.
This holds for the top-k router with normalised gates (softmax or sigmoid scores), no group limit, top_k a multiple of
G and route_scale = G, without shared experts (model.num_shared_experts > 0 adds freshly initialised ones) and
without noise. `noise_std` adds Gaussian noise of that standard deviation (absolute) to every expert weight, drawn
from a generator seeded with `seed`, so that copies differ and specialise; the router rows of a copy separate with
training (each segment's gradient differs).

Overrides win over all of this except model.num_experts and model.moe_hidden. The dense model's other settings
(shape, attention, rope, vocabulary) are kept; from a moetrain run also its data and optim settings (so training
continues on the same data, with the same tokenizer); a Hugging Face directory with tokenizer files becomes
data.tokenizer=SRC. The rest is moetrain's defaults. One process; the run directory loads under any layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch

from moetrain.config.schema import TrainConfig
from moetrain.interop import ConvertError

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def upcycle(src, out, num_experts: int, split: int = 1, noise_std: float = 0.0, seed: int = 0,
            overrides: Sequence[str] = ()) -> Path:
    """Write the upcycled MoE of the dense model at `src` as the run directory `out` (module docstring); returns
    the checkpoint written. Every check runs before anything is written."""
    from moetrain.interop.run_dir import write_run_dir
    from moetrain.train import checkpoint as ckpt

    import torch.distributed as dist

    src, out = Path(src), Path(out)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConvertError("--upcycle runs in one process; run moetrain-convert without torchrun (the run directory "
                           "it writes trains under any parallel layout)")
    _check_arguments(num_experts, split, noise_std, seed)
    existing = ckpt.find_latest(out / "checkpoints")
    if existing is not None:
        raise ConvertError(f"{out} already holds a checkpoint ({existing}); choose a new --out directory or remove "
                           f"the old run")
    dense_cfg, inherited, dense = _load_dense(src)
    cfg = upcycled_config(dense_cfg, inherited, num_experts, split, overrides)
    moe = upcycle_model(dense, cfg, split, noise_std, seed)
    return write_run_dir(out, cfg, moe)


def _check_arguments(num_experts: int, split: int, noise_std: float, seed: int) -> None:
    if split < 1:
        raise ConvertError(f"--split {split} must be >= 1 (1: every expert is the whole dense FFN)")
    if num_experts < 1 or num_experts % split:
        raise ConvertError(f"--num-experts {num_experts} must be a positive multiple of --split {split} (each of the "
                           f"{split} segments of the dense FFN is copied num_experts / split times)")
    if not (noise_std >= 0 and noise_std != float("inf")):
        raise ConvertError(f"--noise {noise_std} must be >= 0 and finite")
    if not 0 <= seed < 2**63:
        raise ConvertError(f"--seed {seed} must be in [0, 2^63)")


def _load_dense(src: Path) -> tuple[TrainConfig, tuple[str, ...], torch.nn.Module]:
    """(the source's TrainConfig, its sections or keys the MoE inherits, the dense TransformerLM) of a moetrain run
    or a Hugging Face directory."""
    from moetrain.interop.run_dir import CONFIG_FILE, load_run_model

    if not src.is_dir():
        raise ConvertError(f"{src} is not a directory; give a dense moetrain run directory or a Hugging Face model "
                           f"directory")
    if (src / "config.json").is_file():
        cfg, dense = _load_hf_dense(src)
        inherited: tuple[str, ...] = ("model",)
        if any((src / f).is_file() for f in HF_TOKENIZER_FILES):
            cfg.data.tokenizer, inherited = str(src.resolve()), ("model", "data.tokenizer")
    elif (src / CONFIG_FILE).is_file() or (src.parent.parent / CONFIG_FILE).is_file():
        cfg, dense = load_run_model(src)
        inherited = ("model", "data", "optim")
    else:
        raise ConvertError(f"{src} is neither a moetrain run directory (config.yaml) nor a Hugging Face model "
                           f"directory (config.json)")
    if any(getattr(block.ffn, "router", None) is not None for block in dense.layers):
        raise ConvertError(f"{src} is already an MoE (model.num_experts={cfg.model.num_experts}, first_k_dense="
                           f"{cfg.model.first_k_dense}); upcycling starts from a dense model (model.num_experts=0)")
    return cfg, inherited, dense


def _load_hf_dense(src: Path) -> tuple[TrainConfig, torch.nn.Module]:
    from moetrain.interop.hf.convert import hf_config_to_moetrain, load_hf_weights
    from moetrain.interop.hf.io import HFCheckpoint, read_hf_config
    from moetrain.model.transformer import TransformerLM

    hf_config = read_hf_config(src)
    model_keys, router_keys = hf_config_to_moetrain(hf_config)
    cfg = TrainConfig()
    for key, value in model_keys.items():
        setattr(cfg.model, key, value)
    if cfg.model.num_experts:
        raise ConvertError(f"{src} is already an MoE ({hf_config.get('architectures', ['?'])[0]} with "
                           f"{cfg.model.num_experts} experts); upcycling starts from a dense Llama / Qwen2 / Qwen3")
    dense = TransformerLM(cfg.model, cfg.router)
    with HFCheckpoint(src) as ckpt:
        load_hf_weights(dense, cfg, ckpt, hf_config)
    return cfg, dense


def _pinned(overrides: Sequence[str]) -> set[str]:
    """The dotted keys the user sets with key=value."""
    return {item.partition("=")[0].lstrip("+~") for item in overrides if "=" in item}


def upcycled_config(dense: TrainConfig, inherited: Sequence[str], num_experts: int, split: int,
                    overrides: Sequence[str] = ()) -> TrainConfig:
    """The MoE's TrainConfig: `overrides` composed; then, for every key they do not set, the `inherited` sections
    (or dotted keys) of the dense run's config and the upcycling defaults (module docstring); validated for one
    process."""
    from moetrain.config.compose import compose_config
    from moetrain.config.validate import validate

    if dense.model.ffn_hidden % split:
        raise ConvertError(f"--split {split} does not divide the dense FFN's hidden size model.ffn_hidden="
                           f"{dense.model.ffn_hidden}; choose a divisor")
    cfg = compose_config(list(overrides))
    pinned = _pinned(overrides)
    copies = num_experts // split
    keys = {}
    for item in inherited:
        section, _, key = item.partition(".")
        names = [key] if key else [f.name for f in dataclasses.fields(getattr(dense, section))]
        keys.update({f"{section}.{name}": getattr(getattr(dense, section), name) for name in names})
    keys.update({"model.name": f"{dense.model.name}-upcycled", "model.first_k_dense": 0, "model.moe_every": 1,
                 "model.num_shared_experts": 0, "model.shared_expert_hidden": 0, "model.shared_expert_gate": False,
                 "router.top_k": split * min(2, copies), "router.route_scale": float(split),
                 "router.norm_topk_prob": True})
    for dotted, value in keys.items():
        if dotted not in pinned:
            section, name = dotted.split(".")
            setattr(getattr(cfg, section), name, value)
    cfg.model.num_experts, cfg.model.moe_hidden = num_experts, dense.model.ffn_hidden // split
    validate(cfg, 1)
    return cfg


@torch.no_grad()
def upcycle_model(dense: torch.nn.Module, cfg: TrainConfig, split: int, noise_std: float = 0.0,
                  seed: int = 0) -> torch.nn.Module:
    """The MoE TransformerLM of `cfg` with the dense model's weights: everything but the FFNs copied; each MoE
    layer's experts the segments of the dense FFN (module docstring), its router initialised by init_weights(seed)
    with the rows of each copy tied; dense layers keep the dense FFN."""
    from moetrain.model.transformer import TransformerLM
    from moetrain.moe.layer import MoELayer

    moe = TransformerLM(cfg.model, cfg.router)
    moe.init_weights(seed)
    dense_state = dense.state_dict()
    moe_state = moe.state_dict()
    for name, tensor in moe_state.items():
        if ".ffn." in name and isinstance(moe.get_submodule(name.rsplit(".ffn.", 1)[0]).ffn, MoELayer):
            continue
        if name not in dense_state or dense_state[name].shape != tensor.shape:
            raise ConvertError(f"the dense model has no tensor {name} of shape {list(tensor.shape)}; the overrides "
                               f"change the model's shape (only FFN settings may differ)")
        tensor.copy_(dense_state[name])
    noise = torch.Generator().manual_seed(seed)
    for i, block in enumerate(moe.layers):
        if isinstance(block.ffn, MoELayer):
            _fill_moe_layer(block.ffn, dense.layers[i].ffn, split, noise_std, noise)
    return moe


def _fill_moe_layer(layer, ffn, split: int, noise_std: float, noise: torch.Generator) -> None:
    w1_FD, w3_FD, w2_DF = ffn.w1.weight, ffn.w3.weight, ffn.w2.weight
    experts = layer.experts
    Fg = w1_FD.shape[0] // split
    for row, e in enumerate(experts.expert_ids):
        seg = slice((e % split) * Fg, (e % split + 1) * Fg)
        for dst, src in ((experts.w1_EDF, w1_FD[seg].T), (experts.w3_EDF, w3_FD[seg].T),
                         (experts.w2_EFD, w2_DF[:, seg].T)):
            dst[row].copy_(src)
            if noise_std > 0:
                dst[row].add_(torch.randn(dst[row].shape, generator=noise) * noise_std)
    gate = getattr(layer.router, "gate", None)
    if split > 1 and gate is not None:  # the G segments of copy c share copy c's first row
        E = gate.weight.shape[0]
        gate.weight.copy_(gate.weight[torch.arange(E) // split * split])
