"""Qwen2-MoE (Qwen2MoeForCausalLM) and Qwen3-MoE (Qwen3MoeForCausalLM).

Qwen2-MoE: q/k/v biases, one shared expert of `shared_expert_intermediate_size` whose output is scaled by
sigmoid(x @ shared_expert_gate), softmax top-k (gates renormalised only with norm_topk_prob).
Qwen3-MoE: an RMSNorm over each head's q and k (before rope), an explicit head_dim, no shared expert.
Both: layer i is MoE when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0, dense (intermediate_size)
otherwise.
"""

from __future__ import annotations

from moetrain.config.schema import ModelConfig, TrainConfig
from moetrain.interop import ConvertError
from moetrain.interop.hf import common as c
from moetrain.interop.hf.base import LlamaLike, qwen_layout_to_hf, qwen_moe_layers, register

QWEN_DEFAULTS = {"norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "use_sliding_window": False, "rope_theta": 10000.0}


class QwenMoE(LlamaLike):
    @classmethod
    def experts_key(cls, hf: dict) -> int:
        return c.require(hf, "num_experts" if "num_experts" in hf else "num_local_experts")

    @classmethod
    def moe_to_moetrain(cls, hf: dict, model: dict) -> tuple[dict, dict]:
        first_k, every = c.moe_layout(model["n_layers"], qwen_moe_layers(hf, model["n_layers"]))
        moe = dict(num_experts=cls.experts_key(hf), moe_hidden=c.require(hf, "moe_intermediate_size"),
                   num_shared_experts=0, shared_expert_hidden=0, shared_expert_gate=False, first_k_dense=first_k,
                   moe_every=every)
        return moe, {"top_k": c.require(hf, "num_experts_per_tok"), "norm_topk_prob": bool(hf["norm_topk_prob"])}

    @classmethod
    def moe_to_hf(cls, cfg: TrainConfig) -> dict:
        m = cfg.model
        cls.softmax_router_to_hf(cfg)
        return {"num_experts": m.num_experts, "num_experts_per_tok": cfg.router.top_k,
                "moe_intermediate_size": m.moe_hidden, "norm_topk_prob": cfg.router.norm_topk_prob,
                "use_sliding_window": False, "router_aux_loss_coef": cfg.router.aux_loss_coeff,
                **qwen_layout_to_hf(m)}


@register
class Qwen2MoE(QwenMoE):
    """A moetrain MoE without shared experts exports as a Qwen2-MoE whose shared expert has size 0 (zero-size
    tensors and a zero gate: transformers computes sigmoid(.) * 0 = 0), and such a file imports without one: so any
    GQA MoE with dense layers, q/k/v biases or not, has a Hugging Face form."""

    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    defaults = {**QWEN_DEFAULTS, "qkv_bias": True}
    bias_key = "qkv_bias"

    @classmethod
    def moe_to_moetrain(cls, hf: dict, model: dict) -> tuple[dict, dict]:
        moe, router = super().moe_to_moetrain(hf, model)
        shared = hf.get("shared_expert_intermediate_size", 5632)  # transformers' default
        if not isinstance(shared, int) or shared < 0:
            raise c.refuse("shared_expert_intermediate_size", shared, "must be a size >= 0")
        if shared:
            moe.update(num_shared_experts=1, shared_expert_hidden=shared, shared_expert_gate=True)
        return moe, router

    @classmethod
    def moe_to_hf(cls, cfg: TrainConfig) -> dict:
        m = cfg.model
        if m.num_shared_experts > 0 and not m.shared_expert_gate:
            raise ConvertError(f"model.num_shared_experts={m.num_shared_experts} with model.shared_expert_gate=false: "
                               f"Qwen2-MoE's shared expert is gated (model.shared_expert_gate=true)")
        shared = (m.shared_expert_hidden or m.num_shared_experts * m.moe_hidden) if m.num_shared_experts else 0
        return {**super().moe_to_hf(cfg), "shared_expert_intermediate_size": shared}

    @classmethod
    def moe_tensors(cls, m: c.TensorMap, i: int, model: ModelConfig) -> None:
        super().moe_tensors(m, i, model)
        shared, gate = f"model.layers.{i}.mlp.shared_expert", f"model.layers.{i}.mlp.shared_expert_gate.weight"
        if model.num_shared_experts:
            c.swiglu(m, f"layers.{i}.ffn.shared_experts", shared)
            m.add(f"layers.{i}.ffn.shared_gate.weight", gate)
            return
        D = model.dim
        for name, shape in (("gate_proj", (0, D)), ("up_proj", (0, D)), ("down_proj", (D, 0))):
            m.constants.append((f"{shared}.{name}.weight", shape))
        m.constants.append((gate, (1, D)))


@register
class Qwen3MoE(QwenMoE):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    defaults = {**QWEN_DEFAULTS, "attention_bias": False}
    qk_norm = "head"

    @classmethod
    def moe_to_hf(cls, cfg: TrainConfig) -> dict:
        cls.check_model(cfg, num_shared_experts=0)
        return super().moe_to_hf(cfg)
