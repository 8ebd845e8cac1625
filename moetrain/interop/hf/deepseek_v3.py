"""DeepSeek-V3 (DeepseekV3ForCausalLM): Multi-head Latent Attention, sigmoid scores with the per-expert selection bias
`e_score_correction_bias` (moetrain's balancing bias `router.expert_bias_E`), group-limited routing (a group's score
is the sum of its top-2 biased scores), gates renormalised and scaled by routed_scaling_factor, shared experts, the
first first_k_dense_replace layers dense.

MLA tensors (per layer, HF -> moetrain): q_proj -> wq (q_lora_rank null) or q_a_proj -> wq_a, q_a_layernorm ->
q_norm, q_b_proj -> wq_b; kv_a_proj_with_mqa -> wkv_a; kv_a_layernorm -> kv_norm; kv_b_proj -> wkv_b; o_proj -> wo.
Rope: with `rope_interleave` (the default, DeepSeek's own layout) the rope dims already rotate interleaved pairs as
moetrain does; without it they rotate halves, and the rope rows of q (the last qk_rope_head_dim of each head) and of
wkv_a (its last qk_rope_head_dim rows) are permuted as for Llama (common.py). Export writes rope_interleave=true.
The multi-token-prediction layers of hub checkpoints (layer ids >= num_hidden_layers) are not loaded, as in
transformers.
"""

from __future__ import annotations

from typing import Optional

import torch

from moetrain.config.schema import ModelConfig, TrainConfig
from moetrain.interop import ConvertError
from moetrain.interop.hf import common as c
from moetrain.interop.hf.base import Family, register
from moetrain.model.transformer import is_moe_layer


@register
class DeepseekV3(Family):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    has_expert_bias = True
    defaults = {  # transformers' DeepseekV3Config defaults, for keys a config.json omits
        "moe_intermediate_size": 2048, "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "rope_interleave": True, "attention_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    }

    @classmethod
    def to_moetrain(cls, hf: dict) -> tuple[dict, dict]:
        hf = cls.read(hf)
        c.check_activation(hf)
        c.check_zero(hf, "attention_dropout", "moetrain has no attention dropout")
        c.check_zero(hf, "attention_bias", "moetrain's MLA projections have no biases")
        for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
            if key in hf and hf[key] != want:
                raise c.refuse(key, hf[key], f"transformers' DeepSeek-V3 implements {key}={want} only")
        heads = c.require(hf, "num_attention_heads")
        if (hf.get("num_key_value_heads") or heads) != heads:
            raise c.refuse("num_key_value_heads", hf["num_key_value_heads"],
                           f"MLA expands keys and values to every head; it must equal num_attention_heads={heads}")
        n_layers = c.require(hf, "num_hidden_layers")
        experts, groups = c.require(hf, "n_routed_experts"), c.require(hf, "n_group")
        if experts % groups or (groups > 1 and experts // groups < 2):
            raise c.refuse("n_group", groups, f"must split n_routed_experts={experts} into groups of 2 or more")
        model = dict(
            name=cls.model_type, vocab_size=c.require(hf, "vocab_size"), dim=c.require(hf, "hidden_size"),
            n_layers=n_layers, n_heads=heads, n_kv_heads=heads, max_seq_len=c.require(hf, "max_position_embeddings"),
            norm_eps=float(hf["rms_norm_eps"]), tie_embeddings=bool(hf.get("tie_word_embeddings", False)), head_dim=0,
            attention="mla", qkv_bias=False, qk_norm="none", clip_qkv=None, q_lora_rank=hf.get("q_lora_rank") or 0,
            kv_lora_rank=c.require(hf, "kv_lora_rank"), qk_nope_head_dim=c.require(hf, "qk_nope_head_dim"),
            qk_rope_head_dim=c.require(hf, "qk_rope_head_dim"), v_head_dim=c.require(hf, "v_head_dim"),
            ffn_hidden=c.require(hf, "intermediate_size"), num_experts=experts,
            moe_hidden=c.require(hf, "moe_intermediate_size"), num_shared_experts=c.require(hf, "n_shared_experts"),
            shared_expert_hidden=0, shared_expert_gate=False,
            first_k_dense=min(c.require(hf, "first_k_dense_replace"), n_layers), moe_every=1,
            **c.rope_settings(hf))
        router = dict(method="topk", top_k=c.require(hf, "num_experts_per_tok"), score_func="sigmoid",
                      norm_topk_prob=bool(hf["norm_topk_prob"]), route_scale=float(hf["routed_scaling_factor"]),
                      num_groups=groups, topk_groups=c.require(hf, "topk_group") if groups > 1 else 1,
                      group_score_topk=2 if groups > 1 else 0,
                      group_by="experts", capacity_factor=None, force_balanced=False,
                      bias_update_rule="sign", bias_update_rate=1e-3)  # DeepSeek-V3's published balancing step
        return model, router

    @classmethod
    def to_hf(cls, cfg: TrainConfig) -> dict:
        m, r = cfg.model, cfg.router
        cls.check_model(cfg, attention="mla", qk_norm="none", qkv_bias=False, clip_qkv=None, moe_every=1,
                        shared_expert_gate=False)
        cls.check_router(cfg)
        cls.check_router_keys(cfg, score_func="sigmoid", group_by="experts")
        if m.num_experts == 0:
            raise ConvertError("model.num_experts=0: DeepSeek-V3 is an MoE architecture")
        limited = r.num_groups > 1 and r.topk_groups < r.num_groups
        group_m = r.group_score_topk or max(1, r.top_k // r.topk_groups)
        if limited and group_m != 2:
            raise ConvertError(f"router.group_score_topk={r.group_score_topk}: DeepSeek-V3 scores a group by its top-2 "
                               f"biased scores; set router.group_score_topk=2")
        if r.num_groups > 1 and m.num_experts // r.num_groups < 2:
            raise ConvertError(f"router.num_groups={r.num_groups}: DeepSeek-V3 needs at least 2 experts per group")
        shared = m.shared_expert_hidden or m.num_shared_experts * m.moe_hidden
        if shared == 0 or shared % m.moe_hidden:
            raise ConvertError(f"model.num_shared_experts={m.num_shared_experts}, model.shared_expert_hidden="
                               f"{m.shared_expert_hidden}: DeepSeek-V3 has n_shared_experts >= 1 shared experts of "
                               f"model.moe_hidden={m.moe_hidden} each")
        return {
            "architectures": [cls.architecture], "model_type": cls.model_type, "vocab_size": m.vocab_size,
            "hidden_size": m.dim, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_heads, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "attention_bias": False,
            "attention_dropout": 0.0, "rope_parameters": c.rope_parameters(m), "rope_theta": m.rope_theta,
            "rope_interleave": True, "q_lora_rank": c.none_if_zero(m.q_lora_rank), "kv_lora_rank": m.kv_lora_rank,
            "qk_nope_head_dim": m.qk_nope_head_dim, "qk_rope_head_dim": m.qk_rope_head_dim,
            "v_head_dim": m.v_head_dim, "head_dim": m.qk_rope_head_dim,
            "intermediate_size": m.ffn_hidden, "moe_intermediate_size": m.moe_hidden,
            "n_routed_experts": m.num_experts, "n_shared_experts": shared // m.moe_hidden,
            "num_experts_per_tok": r.top_k, "first_k_dense_replace": min(m.first_k_dense, m.n_layers),
            "moe_layer_freq": 1, "n_group": r.num_groups if limited else 1,
            "topk_group": r.topk_groups if limited else 1,
            "norm_topk_prob": r.norm_topk_prob, "routed_scaling_factor": r.route_scale, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "num_nextn_predict_layers": 0, "initializer_range": m.init_std,
            "dtype": "float32",
        }

    @classmethod
    def tensor_map(cls, model: ModelConfig, hf: Optional[dict] = None) -> c.TensorMap:
        """`hf`: the config.json being imported (its rope_interleave); None: the layout export writes."""
        rope_interleave = True if hf is None else bool(cls.read(hf).get("rope_interleave", True))
        m = c.TensorMap()
        c.embeddings(m, model)
        nope, rope, kv = model.qk_nope_head_dim, model.qk_rope_head_dim, model.kv_lora_rank
        if rope_interleave:
            q_perm, kv_perm = torch.arange(nope + rope), torch.arange(kv + rope)
        else:
            q_perm = torch.cat((torch.arange(nope), nope + c.halves_to_pairs(rope)))
            kv_perm = torch.cat((torch.arange(kv), kv + c.halves_to_pairs(rope)))
        q_rope = {"to_moe": c.rope_in(nope + rope, q_perm), "to_hf": c.rope_out(nope + rope, q_perm)}
        kv_rope = {"to_moe": c.rope_in(kv + rope, kv_perm), "to_hf": c.rope_out(kv + rope, kv_perm)}
        for i in range(model.n_layers):
            c.norms(m, i)
            a, p = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
            if model.q_lora_rank:
                m.add(f"{a}.wq_a.weight", f"{p}.q_a_proj.weight")
                m.add(f"{a}.q_norm.weight", f"{p}.q_a_layernorm.weight")
                m.add(f"{a}.wq_b.weight", f"{p}.q_b_proj.weight", **q_rope)
            else:
                m.add(f"{a}.wq.weight", f"{p}.q_proj.weight", **q_rope)
            m.add(f"{a}.wkv_a.weight", f"{p}.kv_a_proj_with_mqa.weight", **kv_rope)
            m.add(f"{a}.kv_norm.weight", f"{p}.kv_a_layernorm.weight")
            m.add(f"{a}.wkv_b.weight", f"{p}.kv_b_proj.weight")
            m.add(f"{a}.wo.weight", f"{p}.o_proj.weight")
            f, q = f"layers.{i}.ffn", f"model.layers.{i}.mlp"
            if is_moe_layer(model, i):
                m.add(f"{f}.router.gate.weight", f"{q}.gate.weight")
                m.add(f"{f}.router.expert_bias_E", f"{q}.gate.e_score_correction_bias")
                m.experts.append(c.Experts(f"{f}.experts", f"{q}.experts", fused=(f"{q}.experts",)))
                if model.num_shared_experts or model.shared_expert_hidden:
                    c.swiglu(m, f"{f}.shared_experts", f"{q}.shared_experts")
            else:
                c.swiglu(m, f, q)
        return m

    @classmethod
    def ignored(cls, key: str, model: ModelConfig) -> bool:
        parts = key.split(".")
        if key.startswith("model.layers.") and parts[2].isdigit() and int(parts[2]) >= model.n_layers:
            return True  # multi-token-prediction layers
        return super().ignored(key, model)
