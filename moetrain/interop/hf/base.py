"""The architecture family interface, the registry (by config.json `model_type` and `architectures`), and the
Llama-style family most checkpoints share.

A family maps both ways:
    to_moetrain(config.json dict) -> (model keys, router keys)     refusing what moetrain cannot represent
    to_hf(TrainConfig)            -> config.json dict              refusing what the format cannot represent
    tensor_map(ModelConfig)       -> TensorMap                     where each moetrain tensor lives in the checkpoint
Settings absent from a config.json take the value transformers' config class gives them (`defaults`): a file that
omits a key means what transformers makes of it.
"""

from __future__ import annotations

from typing import ClassVar, Optional

from moetrain.config.schema import ModelConfig, TrainConfig
from moetrain.interop import ConvertError
from moetrain.interop.hf import common as c
from moetrain.model.transformer import is_moe_layer

FAMILIES: dict[str, type["Family"]] = {}  # model_type -> family


def register(cls: type["Family"]) -> type["Family"]:
    for name in (cls.model_type, *cls.aliases):
        FAMILIES[name] = cls
    return cls


def family_for(hf: dict) -> type["Family"]:
    """The family of a config.json: by `model_type`, else by `architectures`."""
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    by_arch = {f.architecture: f for f in FAMILIES.values()}
    for arch in hf.get("architectures") or []:
        if arch in by_arch:
            return by_arch[arch]
    supported = ", ".join(sorted({f.model_type for f in FAMILIES.values()}))
    raise c.refuse("model_type", model_type, f"not an architecture moetrain converts (supported: {supported})")


def family_named(model_type: str) -> type["Family"]:
    if model_type not in FAMILIES:
        supported = ", ".join(sorted({f.model_type for f in FAMILIES.values()}))
        raise ConvertError(f"--arch {model_type} is not an architecture moetrain converts (supported: {supported})")
    return FAMILIES[model_type]


class Family:
    model_type: ClassVar[str]
    architecture: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict] = {}
    moe: ClassVar[bool] = True  # the architecture has routed experts
    has_expert_bias: ClassVar[bool] = False  # the checkpoint stores a selection bias per expert (DeepSeek-V3)

    @classmethod
    def read(cls, hf: dict) -> dict:
        return {**cls.defaults, **hf}

    @classmethod
    def to_moetrain(cls, hf: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    @classmethod
    def to_hf(cls, cfg: TrainConfig) -> dict:
        raise NotImplementedError

    @classmethod
    def tensor_map(cls, model: ModelConfig, hf: Optional[dict] = None) -> c.TensorMap:
        """Where each tensor of `model` lives; `hf`: the config.json being imported (None: the layout export
        writes)."""
        raise NotImplementedError

    @classmethod
    def ignored(cls, key: str, model: ModelConfig) -> bool:
        """Checkpoint tensors transformers does not load either (e.g. cached rope frequencies)."""
        return key.endswith("rotary_emb.inv_freq")

    # ------------------------------------------------------------------------------------ shared export checks
    @classmethod
    def check_router(cls, cfg: TrainConfig) -> None:
        """What every family's router needs: top-k token choice, dropless, nothing forced; and one expert count for
        every MoE layer (Hugging Face configs have a single num_experts)."""
        r = cfg.router
        per_layer = getattr(cfg.model, "experts_per_layer", None)
        if per_layer is not None and len(set(per_layer)) > 1:
            raise ConvertError(f"model.experts_per_layer={per_layer}: {cls.architecture} has one "
                               f"expert count for all layers; compress with the same --keep in every layer to export")
        if r.method != "topk":
            raise ConvertError(f"router.method={r.method}: {cls.architecture} routes by top-k token choice; only "
                               f"router.method=topk models export")
        if r.capacity_factor is not None:
            raise ConvertError(f"router.capacity_factor={r.capacity_factor}: {cls.architecture} is dropless; export "
                               f"a dropless model (router.capacity_factor=null)")
        if r.force_balanced:
            raise ConvertError("router.force_balanced=true is a benchmarking mode with no Hugging Face equivalent")

    @classmethod
    def check_model(cls, cfg: TrainConfig, **required) -> None:
        """Each `key=value` must hold for cfg.model (the keys this family fixes)."""
        cls._check_section("model", cfg.model, required)

    @classmethod
    def check_router_keys(cls, cfg: TrainConfig, **required) -> None:
        """Each `key=value` must hold for cfg.router."""
        cls._check_section("router", cfg.router, required)

    @classmethod
    def _check_section(cls, section: str, node, required: dict) -> None:
        for key, want in required.items():
            have = getattr(node, key)
            if have != want:
                raise ConvertError(f"{section}.{key}={have}: {cls.architecture} needs {section}.{key}={want}")


class LlamaLike(Family):
    """Llama-style decoder layers: `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `input_layernorm`,
    `post_attention_layernorm`, dense `mlp.{gate,up,down}_proj`; MoE layers `mlp.gate` (the router) and
    `mlp.experts.{e}.{gate,up,down}_proj`. Subclasses say what differs."""

    qk_norm: ClassVar[str] = "none"
    bias_key: ClassVar[str] = "attention_bias"  # the config key turning q/k/v(/o) biases on; "" when always on
    clips: ClassVar[bool] = False  # the architecture may clamp q, k, v (config.json clip_qkv)

    # ------------------------------------------------------------------------------------------- config.json in
    @classmethod
    def to_moetrain(cls, hf: dict) -> tuple[dict, dict]:
        hf = cls.read(hf)
        c.check_activation(hf)
        c.check_full_attention(hf)
        c.check_zero(hf, "attention_dropout", "moetrain has no attention dropout")
        c.check_zero(hf, "mlp_bias", "moetrain's feed-forward layers have no biases")
        dim, heads = c.require(hf, "hidden_size"), c.require(hf, "num_attention_heads")
        head_dim = hf.get("head_dim") or dim // heads
        model = dict(
            name=cls.model_type, vocab_size=c.require(hf, "vocab_size"), dim=dim,
            n_layers=c.require(hf, "num_hidden_layers"), n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, max_seq_len=c.require(hf, "max_position_embeddings"),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim=0 if head_dim == dim // heads else head_dim, attention="gqa", qkv_bias=cls.qkv_bias(hf),
            qk_norm=cls.qk_norm, clip_qkv=None, q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=0,
            qk_rope_head_dim=0, v_head_dim=0, ffn_hidden=hf.get("intermediate_size") or 1,
            **c.rope_settings(hf))
        router = {"method": "topk", "score_func": "softmax", "route_scale": 1.0, "num_groups": 1, "topk_groups": 1,
                  "group_score_topk": 0, "group_by": "experts", "capacity_factor": None, "force_balanced": False}
        if cls.moe:
            moe_model, moe_router = cls.moe_to_moetrain(hf, model)
            model.update(moe_model)
            router.update(moe_router)
        else:
            model.update(num_experts=0, moe_hidden=1, num_shared_experts=0, shared_expert_hidden=0,
                         shared_expert_gate=False, first_k_dense=model["n_layers"], moe_every=1)
        return model, router

    @classmethod
    def qkv_bias(cls, hf: dict) -> bool:
        if not cls.bias_key:
            return True
        bias = bool(hf.get(cls.bias_key, False))
        if bias and cls.bias_key == "attention_bias":  # also on o_proj, which moetrain lacks
            raise c.refuse("attention_bias", True, "moetrain's attention output projection has no bias")
        return bias

    @classmethod
    def moe_to_moetrain(cls, hf: dict, model: dict) -> tuple[dict, dict]:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ config.json out
    @classmethod
    def to_hf(cls, cfg: TrainConfig) -> dict:
        m = cfg.model
        cls.check_model(cfg, attention="gqa", qk_norm=cls.qk_norm)
        if m.clip_qkv is not None and not cls.clips:
            raise ConvertError(f"model.clip_qkv={m.clip_qkv}: {cls.architecture} does not clamp q, k, v")
        if cls.bias_key == "attention_bias" and m.qkv_bias:
            raise ConvertError(f"model.qkv_bias=true: {cls.architecture}'s attention_bias would also put a bias on "
                               f"the output projection, which moetrain lacks")
        if not cls.bias_key and not m.qkv_bias:
            raise ConvertError(f"model.qkv_bias=false: {cls.architecture} always has q/k/v biases")
        hf = {
            "architectures": [cls.architecture], "model_type": cls.model_type, "vocab_size": m.vocab_size,
            "hidden_size": m.dim, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim or m.dim // m.n_heads,
            "hidden_act": "silu", "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
            "tie_word_embeddings": m.tie_embeddings, "attention_dropout": 0.0,
            "rope_parameters": c.rope_parameters(m), "rope_theta": m.rope_theta,
            "intermediate_size": m.ffn_hidden, "initializer_range": m.init_std, "dtype": "float32",
        }
        if cls.bias_key:
            hf[cls.bias_key] = m.qkv_bias
        if cls.moe:
            cls.check_router(cfg)
            if m.num_experts == 0:
                raise ConvertError(f"model.num_experts=0: {cls.architecture} is an MoE architecture; export a dense "
                                   f"model as llama, qwen2 or qwen3 (--arch)")
            hf.update(cls.moe_to_hf(cfg))
        elif m.num_experts > 0 and c.moe_layers(m):
            raise ConvertError(f"model.num_experts={m.num_experts}: {cls.architecture} is a dense architecture")
        return hf

    @classmethod
    def moe_to_hf(cls, cfg: TrainConfig) -> dict:
        raise NotImplementedError

    @classmethod
    def softmax_router_to_hf(cls, cfg: TrainConfig) -> None:
        """The softmax top-k routers (Mixtral, Qwen, OLMoE): no groups, no scaling, no selection bias."""
        cls.check_router_keys(cfg, score_func="softmax", route_scale=1.0)
        if cfg.router.num_groups > 1 and cfg.router.topk_groups < cfg.router.num_groups:
            raise ConvertError(f"router.num_groups={cfg.router.num_groups}: {cls.architecture} has no group-limited "
                               f"routing")

    # --------------------------------------------------------------------------------------------------- tensors
    @classmethod
    def tensor_map(cls, model: ModelConfig, hf: Optional[dict] = None) -> c.TensorMap:
        m = c.TensorMap()
        c.embeddings(m, model)
        for i in range(model.n_layers):
            c.norms(m, i)
            c.gqa_attention(m, i, model, f"model.layers.{i}.self_attn")
            if is_moe_layer(model, i):
                cls.moe_tensors(m, i, model)
            else:
                c.swiglu(m, f"layers.{i}.ffn", f"model.layers.{i}.mlp")
        return m

    @classmethod
    def moe_tensors(cls, m: c.TensorMap, i: int, model: ModelConfig) -> None:
        """Router and experts of MoE layer i under `model.layers.{i}.mlp` (the selection bias stays zero)."""
        p = f"model.layers.{i}.mlp"
        m.add(f"layers.{i}.ffn.router.gate.weight", f"{p}.gate.weight")
        m.zeros.append(f"layers.{i}.ffn.router.expert_bias_E")
        m.experts.append(c.Experts(f"layers.{i}.ffn.experts", f"{p}.experts", fused=(f"{p}.experts",)))


def qwen_moe_layers(hf: dict, n_layers: int) -> set[int]:
    """Qwen-MoE's MoE layers: i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    step = hf.get("decoder_sparse_step") or 1
    only_mlp = set(hf.get("mlp_only_layers") or [])
    return {i for i in range(n_layers) if i not in only_mlp and (i + 1) % step == 0}


def qwen_layout_to_hf(model: ModelConfig) -> dict:
    """decoder_sparse_step / mlp_only_layers giving moetrain's MoE layers: every n-th from layer n-1 is the step alone,
    anything else lists the dense layers."""
    moe = c.moe_layers(model)
    if model.first_k_dense == model.moe_every - 1:
        return {"decoder_sparse_step": model.moe_every, "mlp_only_layers": []}
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(model.n_layers) if i not in moe]}
