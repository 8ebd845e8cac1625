"""Mixtral (MixtralForCausalLM): every layer MoE, softmax top-k with renormalised gates, no shared experts.

Hub checkpoints name the MoE block `block_sparse_moe` and the experts' weights w1 (gate), w3 (up), w2 (down);
transformers 5 holds them fused in memory as `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` and writes the hub
names back with `save_pretrained`. Both are read; the hub names are written.
"""

from __future__ import annotations

from moetrain.config.schema import ModelConfig, TrainConfig
from moetrain.interop import ConvertError
from moetrain.interop.hf import common as c
from moetrain.interop.hf.base import LlamaLike, register


@register
class Mixtral(LlamaLike):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    defaults = {"rope_theta": 1e6, "rms_norm_eps": 1e-5}

    @classmethod
    def moe_to_moetrain(cls, hf: dict, model: dict) -> tuple[dict, dict]:
        c.check_zero(hf, "router_jitter_noise", "moetrain's router has no jitter noise (it acts in training only); "
                                                "set it to 0 in config.json to import")
        moe = dict(num_experts=c.require(hf, "num_local_experts"), moe_hidden=c.require(hf, "intermediate_size"),
                   num_shared_experts=0, shared_expert_hidden=0, shared_expert_gate=False, first_k_dense=0,
                   moe_every=1)
        return moe, {"top_k": c.require(hf, "num_experts_per_tok"), "norm_topk_prob": True}

    @classmethod
    def moe_to_hf(cls, cfg: TrainConfig) -> dict:
        m = cfg.model
        if len(c.moe_layers(m)) != m.n_layers:
            raise ConvertError(f"model.first_k_dense={m.first_k_dense}, model.moe_every={m.moe_every}: every "
                               f"Mixtral layer is MoE (export as qwen2_moe or qwen3_moe for dense layers)")
        cls.check_model(cfg, num_shared_experts=0)
        cls.softmax_router_to_hf(cfg)
        cls.check_router_keys(cfg, norm_topk_prob=True)
        return {"num_local_experts": m.num_experts, "num_experts_per_tok": cfg.router.top_k,
                "intermediate_size": m.moe_hidden, "router_jitter_noise": 0.0, "sliding_window": None,
                "router_aux_loss_coef": cfg.router.aux_loss_coeff}

    @classmethod
    def moe_tensors(cls, m: c.TensorMap, i: int, model: ModelConfig) -> None:
        hub, fused = f"model.layers.{i}.block_sparse_moe", f"model.layers.{i}.mlp"
        m.add(f"layers.{i}.ffn.router.gate.weight", f"{hub}.gate.weight", aliases=(f"{fused}.gate.weight",))
        m.zeros.append(f"layers.{i}.ffn.router.expert_bias_E")
        m.experts.append(c.Experts(f"layers.{i}.ffn.experts", f"{hub}.experts", names=("w1", "w3", "w2"),
                                   fused=(f"{fused}.experts",)))
