"""OLMoE (OlmoeForCausalLM): an RMSNorm over the whole q projection and the whole k projection (before the heads
are split), optional clamping of q, k, v to [-clip_qkv, clip_qkv] after the norms, every layer MoE, softmax top-k
without renormalisation by default, no shared experts."""

from __future__ import annotations

from moetrain.config.schema import TrainConfig
from moetrain.interop import ConvertError
from moetrain.interop.hf import common as c
from moetrain.interop.hf.base import LlamaLike, register


@register
class Olmoe(LlamaLike):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    defaults = {"norm_topk_prob": False, "clip_qkv": None, "attention_bias": False, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0}
    qk_norm = "full"
    clips = True

    @classmethod
    def to_moetrain(cls, hf: dict) -> tuple[dict, dict]:
        model, router = super().to_moetrain(hf)
        if model["head_dim"]:  # transformers sizes q_norm by hidden_size: only Dh = hidden / heads is consistent
            raise c.refuse("head_dim", hf.get("head_dim"), "OLMoE's head dim is hidden_size / num_attention_heads")
        clip = cls.read(hf).get("clip_qkv")
        model["clip_qkv"] = None if clip is None else float(clip)
        return model, router

    @classmethod
    def moe_to_moetrain(cls, hf: dict, model: dict) -> tuple[dict, dict]:
        moe = dict(num_experts=c.require(hf, "num_experts"), moe_hidden=c.require(hf, "intermediate_size"),
                   num_shared_experts=0, shared_expert_hidden=0, shared_expert_gate=False, first_k_dense=0,
                   moe_every=1)
        return moe, {"top_k": c.require(hf, "num_experts_per_tok"), "norm_topk_prob": bool(hf["norm_topk_prob"])}

    @classmethod
    def to_hf(cls, cfg: TrainConfig) -> dict:
        m = cfg.model
        if m.head_dim and m.head_dim != m.dim // m.n_heads:
            raise ConvertError(f"model.head_dim={m.head_dim}: OLMoE's head dim is model.dim / model.n_heads")
        hf = super().to_hf(cfg)
        hf.update(clip_qkv=m.clip_qkv)
        hf.pop("head_dim")
        return hf

    @classmethod
    def moe_to_hf(cls, cfg: TrainConfig) -> dict:
        m = cfg.model
        if len(c.moe_layers(m)) != m.n_layers:
            raise ConvertError(f"model.first_k_dense={m.first_k_dense}, model.moe_every={m.moe_every}: every OLMoE "
                               f"layer is MoE")
        cls.check_model(cfg, num_shared_experts=0)
        cls.softmax_router_to_hf(cfg)
        return {"num_experts": m.num_experts, "num_experts_per_tok": cfg.router.top_k,
                "intermediate_size": m.moe_hidden, "norm_topk_prob": cfg.router.norm_topk_prob,
                "router_aux_loss_coef": cfg.router.aux_loss_coeff}
