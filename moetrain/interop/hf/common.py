"""What the architecture families share: reading config.json settings (or refusing them), the rope layout change, and
the description of where each moetrain tensor lives in a Hugging Face checkpoint.

Legend: H query heads, G key/value heads, Dh head dim, D model dim, F expert hidden dim, E experts.

Rope layout. moetrain rotates interleaved pairs (x[2i], x[2i+1]) by angle p * theta_i; Llama-family checkpoints
rotate halves (x[i], x[i + Dh/2]) by the same angle. The two agree when the rows of each head's q and k projection are
permuted, moetrain row 2i = HF row i and moetrain row 2i+1 = HF row i + Dh/2:
    perm = [0, Dh/2, 1, Dh/2 + 1, ..., Dh/2 - 1, Dh - 1]          w_moe[h, j] = w_hf[h, perm[j]]
q . k is unchanged (both permuted alike) and v is untouched; a bias or an RMSNorm weight over those rows is permuted
the same way (RMSNorm is equivariant to a permutation of its features).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from moetrain.interop import ConvertError

MISSING = object()


# ------------------------------------------------------------------------------------------------ config reading
def refuse(key: str, value: Any, why: str) -> ConvertError:
    """The one-line error for a config.json setting moetrain cannot represent."""
    return ConvertError(f"config.json {key}={_show(value)}: {why}")


def _show(value: Any) -> str:
    import json

    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def require(hf: dict, key: str, kind: type = int) -> Any:
    """hf[key], which must be present and of `kind` (an int where an int is due)."""
    value = hf.get(key, MISSING)
    if value is MISSING or value is None:
        raise ConvertError(f"config.json has no {key}; it is needed to build the model")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise refuse(key, value, f"must be {'an integer' if kind is int else 'a ' + kind.__name__}")
    return value


def check_activation(hf: dict, key: str = "hidden_act") -> None:
    act = hf.get(key, "silu")
    if act not in ("silu", "swish"):
        raise refuse(key, act, "moetrain's feed-forward layers are SwiGLU (silu); other activations are not "
                               "supported")


def check_zero(hf: dict, key: str, why: str) -> None:
    """Refuse a setting that must be absent, null, false or zero."""
    value = hf.get(key)
    if value not in (None, False, 0, 0.0):
        raise refuse(key, value, why)


def check_full_attention(hf: dict) -> None:
    """Refuse sliding-window attention that reaches below max_position_embeddings: moetrain attends over the whole
    sequence."""
    max_pos = hf.get("max_position_embeddings")
    window = hf.get("sliding_window")
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        window = None
    if window not in (None, 0) and (max_pos is None or window < max_pos):
        raise refuse("sliding_window", window, f"moetrain attends over the whole sequence; a window below "
                                               f"max_position_embeddings={max_pos} cannot be represented")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types) and window not in (None, 0):
        raise refuse("layer_types", layer_types, "moetrain has full attention in every layer")


def rope_settings(hf: dict, *, truncate_ok: bool = True) -> dict:
    """moetrain model keys for the rope of `hf`: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`
    (older files). Default rope and yarn are supported; other scalings are refused."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            params.setdefault("rope_theta", hf["rope_theta"])
        source = "rope_scaling"
    else:
        source = "rope_parameters"
    if not isinstance(params, dict):
        raise refuse(source, params, "expected one object of rope settings (per-layer rope is not supported)")
    if "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()) and params:
        raise refuse(source, params, "per-layer-type rope settings are not supported")
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise refuse("partial_rotary_factor", partial, "moetrain rotates every dim of a head")
    out: dict = {"rope_theta": float(params.get("rope_theta", 10000.0))}
    if kind == "default":
        out["rope_scaling"] = "none"
        return out
    if kind != "yarn":
        raise refuse(f"{source}.rope_type", kind, "moetrain supports default rope and yarn only")
    if params.get("attention_factor") is not None:
        raise refuse(f"{source}.attention_factor", params["attention_factor"],
                     "an explicit yarn attention factor is not supported (moetrain derives it from factor, mscale "
                     "and mscale_all_dim)")
    if not params.get("truncate", True):
        raise refuse(f"{source}.truncate", params["truncate"], "moetrain's yarn truncates the correction range")
    original = params.get("original_max_position_embeddings")
    if original is None:
        raise ConvertError(f"config.json {source} yarn has no original_max_position_embeddings")
    factor = params.get("factor")
    if factor is None:
        factor = require(hf, "max_position_embeddings") / original
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):  # transformers then uses 0.1 ln(factor) + 1 alone
        mscale, mscale_all_dim = 1.0, 0.0
    out.update(rope_scaling="yarn", rope_factor=float(factor), rope_original_max_seq_len=int(original),
               rope_beta_fast=float(params.get("beta_fast") or 32.0),
               rope_beta_slow=float(params.get("beta_slow") or 1.0),
               rope_mscale=float(mscale), rope_mscale_all_dim=float(mscale_all_dim))
    return out


def rope_parameters(model) -> dict:
    """The transformers 5 `rope_parameters` of a moetrain ModelConfig."""
    params: dict = {"rope_type": "default", "rope_theta": model.rope_theta}
    if model.rope_scaling == "yarn":
        params.update(rope_type="yarn", factor=model.rope_factor,
                      original_max_position_embeddings=model.rope_original_max_seq_len,
                      beta_fast=model.rope_beta_fast, beta_slow=model.rope_beta_slow)
        if model.rope_mscale_all_dim:
            params.update(mscale=model.rope_mscale, mscale_all_dim=model.rope_mscale_all_dim)
        elif model.rope_mscale != 1.0:
            raise ConvertError(f"model.rope_mscale={model.rope_mscale} without model.rope_mscale_all_dim: transformers "
                               f"ignores mscale unless mscale_all_dim is set")
    return params


def moe_layout(n_layers: int, moe_layers: set[int]) -> tuple[int, int]:
    """(first_k_dense, moe_every) whose MoE layers are exactly `moe_layers`, or a ConvertError. moetrain's layer i is
    MoE when i >= first_k_dense and (i - first_k_dense) % moe_every == 0."""
    if not moe_layers:
        return n_layers, 1
    ordered = sorted(moe_layers)
    k = ordered[0]
    every = ordered[1] - ordered[0] if len(ordered) > 1 else max(1, n_layers - k)
    if set(range(k, n_layers, every)) != moe_layers:
        raise ConvertError(f"the MoE layers {ordered} of config.json are not 'every {every}-th layer from layer {k}': "
                           f"moetrain places MoE layers from model.first_k_dense every model.moe_every layers")
    return k, every


def moe_layers(model) -> list[int]:
    from moetrain.model.transformer import is_moe_layer

    return [i for i in range(model.n_layers) if is_moe_layer(model, i)]


# --------------------------------------------------------------------------------------------------- rope layout
def halves_to_pairs(dim: int) -> torch.Tensor:
    """perm with moetrain row j = HF (rotate_half) row perm[j] (module docstring)."""
    half = torch.arange(dim // 2)
    return torch.stack((half, half + dim // 2), dim=-1).flatten()


def permute_rows(t: torch.Tensor, block: int, perm: torch.Tensor) -> torch.Tensor:
    """Permute dim 0 of `t` inside each block of `block` rows: out[b*block + j] = t[b*block + perm[j]]."""
    return t.unflatten(0, (-1, block))[:, perm].flatten(0, 1).contiguous()


def rope_in(block: int, perm: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """HF -> moetrain: the rows of every `block` rows permuted by perm."""
    return lambda t: permute_rows(t, block, perm)


def rope_out(block: int, perm: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """moetrain -> HF: the inverse of `rope_in`."""
    inverse = torch.argsort(perm)
    return lambda t: permute_rows(t, block, inverse)


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


# ------------------------------------------------------------------------------------------------ tensor mapping
@dataclass(frozen=True)
class Tensor:
    """One moetrain state-dict entry `moe` and the checkpoint tensor `hf` it comes from (or `aliases`: other names
    the same tensor has in some files). to_moe / to_hf change the layout (e.g. the rope permutation)."""

    moe: str
    hf: str
    to_moe: Callable[[torch.Tensor], torch.Tensor] = _same
    to_hf: Callable[[torch.Tensor], torch.Tensor] = _same
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class Experts:
    """The routed experts of one MoE layer: moetrain's stacked `{moe}.w1_EDF` (E, D, F), `w3_EDF`, `w2_EFD` (E, F, D)
    and the checkpoint's per-expert nn.Linear weights `{hf}.{e}.{gate|up|down}.weight` ((F, D), (F, D), (D, F)), or
    the fused stacks transformers 5 holds in memory, `{fused}.gate_up_proj` (E, 2F, D: gate rows then up rows) and
    `{fused}.down_proj` (E, D, F)."""

    moe: str
    hf: str
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused: tuple[str, ...] = ()

    def per_expert(self, e: int) -> tuple[str, str, str]:
        return tuple(f"{self.hf}.{e}.{n}.weight" for n in self.names)


@dataclass
class TensorMap:
    """Every tensor of a model: plain tensors and the experts of each MoE layer."""

    tensors: list[Tensor] = field(default_factory=list)
    experts: list[Experts] = field(default_factory=list)
    zeros: list[str] = field(default_factory=list)  # moetrain tensors the format lacks: zero on import, and must be
                                                    # zero to export (the balancing bias of a softmax router)
    constants: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # checkpoint tensors moetrain lacks
                                                    # whose zeros make them do nothing: written as zeros, not read

    def add(self, moe: str, hf: str, **kw) -> None:
        self.tensors.append(Tensor(moe, hf, **kw))


def gqa_attention(m: TensorMap, i: int, model, hf_prefix: str, *, rope_halves: bool = True) -> None:
    """Llama-family attention of layer i: q/k/v/o projections, optional q/k/v biases and q/k norms, the q and k rows
    (and their biases and norm weights) permuted to moetrain's interleaved rope."""
    moe = f"layers.{i}.attn"
    dh = model.head_dim or model.dim // model.n_heads
    perm = halves_to_pairs(dh) if rope_halves else torch.arange(dh)
    rope = {"to_moe": rope_in(dh, perm), "to_hf": rope_out(dh, perm)}
    m.add(f"{moe}.wq.weight", f"{hf_prefix}.q_proj.weight", **rope)
    m.add(f"{moe}.wk.weight", f"{hf_prefix}.k_proj.weight", **rope)
    m.add(f"{moe}.wv.weight", f"{hf_prefix}.v_proj.weight")
    m.add(f"{moe}.wo.weight", f"{hf_prefix}.o_proj.weight")
    if model.qkv_bias:
        m.add(f"{moe}.wq.bias", f"{hf_prefix}.q_proj.bias", **rope)
        m.add(f"{moe}.wk.bias", f"{hf_prefix}.k_proj.bias", **rope)
        m.add(f"{moe}.wv.bias", f"{hf_prefix}.v_proj.bias")
    if model.qk_norm != "none":  # `head`: one Dh weight; `full`: H*Dh and G*Dh, per head the same permutation
        m.add(f"{moe}.q_norm.weight", f"{hf_prefix}.q_norm.weight", **rope)
        m.add(f"{moe}.k_norm.weight", f"{hf_prefix}.k_norm.weight", **rope)


def swiglu(m: TensorMap, moe: str, hf_prefix: str, names=("gate_proj", "up_proj", "down_proj")) -> None:
    """A dense SwiGLU: moetrain w1/w3/w2 = gate/up/down."""
    for ours, theirs in zip(("w1", "w3", "w2"), names):
        m.add(f"{moe}.{ours}.weight", f"{hf_prefix}.{theirs}.weight")


def embeddings(m: TensorMap, model) -> None:
    m.add("tok_embeddings.weight", "model.embed_tokens.weight")
    m.add("norm.weight", "model.norm.weight")
    m.add("output.weight", "model.embed_tokens.weight" if model.tie_embeddings else "lm_head.weight")


def norms(m: TensorMap, i: int) -> None:
    m.add(f"layers.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight")
    m.add(f"layers.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")


def none_if_zero(value: int) -> Optional[int]:
    return value or None
