"""Model variants for imported architectures (issue 10): grouped-query attention options (head_dim, qkv_bias, qk_norm,
clip_qkv), Multi-head Latent Attention, yarn rope scaling, shared expert size and gate, group_score_topk, the KV cache.

Each option is checked against a reference written here from the formulas (explicit per-head loops, rope through
complex multiplication), and, where transformers is installed, against its own modules (DeepseekV3Attention,
Qwen3MoeAttention, OlmoeAttention, Qwen2MoeAttention and the yarn rope init) with mapped weights. Incremental decoding
through the KV cache gives the full forward's logits; the default config keeps its parameters and its outputs
bit for bit.
"""

import math

import pytest
import torch

from moetrain.config.compose import compose_config
from moetrain.config.schema import ModelConfig, RouterConfig
from moetrain.config.validate import ConfigError, validate
from moetrain.model.attention import Attention
from moetrain.model.kv_cache import KVCache
from moetrain.model.mla import MLAttention
from moetrain.model.rope import rope_tables, yarn_attention_factor, yarn_inv_freq, yarn_mscale
from moetrain.model.transformer import TransformerLM, count_parameters
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers.topk import TopKRouter, select_topk
from tests.train_utils import SavedTensorBytes, overrides

BASE = dict(dim=32, n_heads=4, n_kv_heads=2, max_seq_len=64)
GQA_VARIANTS = {
    "head_dim_bias": dict(head_dim=12, qkv_bias=True),
    "qk_norm_head": dict(head_dim=12, qk_norm="head", norm_eps=1e-6),
    "qk_norm_full_clip": dict(qk_norm="full", clip_qkv=0.3),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_seq_len=8, rope_mscale=0.8,
                 rope_mscale_all_dim=0.5),
}
MLA = dict(attention="mla", kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
MLA_VARIANTS = {
    "mla": MLA,
    "mla_q_lora_yarn": dict(MLA, q_lora_rank=10, rope_scaling="yarn", rope_factor=40.0, rope_original_max_seq_len=8,
                            rope_mscale=1.0, rope_mscale_all_dim=1.0),
}


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm weights around 1), so a mapped or skipped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if "norm" in name else 0.3 * noise)


# ---------------------------------------------------------------------------------------------- the references
def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def ref_inv_freq(cfg: ModelConfig, dim: int) -> tuple[torch.Tensor, float]:
    if cfg.rope_scaling == "yarn":  # checked against transformers below
        return (yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_factor, cfg.rope_original_max_seq_len, cfg.rope_beta_fast,
                              cfg.rope_beta_slow),
                yarn_attention_factor(cfg.rope_factor, cfg.rope_mscale, cfg.rope_mscale_all_dim))
    return torch.tensor([cfg.rope_theta ** (-2 * i / dim) for i in range(dim // 2)]), 1.0


def ref_rope(x_SDh, inv_freq, factor, start=0):
    """(x_2i + i x_2i+1) * exp(i p theta_i) * factor, through complex numbers."""
    S = x_SDh.shape[0]
    angles = torch.arange(start, start + S, dtype=torch.float64)[:, None] * inv_freq.double()[None]
    xc = torch.view_as_complex(x_SDh.double().reshape(S, -1, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).reshape(S, -1) * factor


def ref_causal_attention(q_SDh, k_SDh, v_SDv, scale):
    S = q_SDh.shape[0]
    scores = (q_SDh @ k_SDh.T) * scale
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v_SDv


def ref_gqa(attn: Attention, cfg: ModelConfig, x_SD):
    H, G, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim or cfg.dim // cfg.n_heads
    x = x_SD.double()

    def proj(lin):
        return x @ lin.weight.double().T + (lin.bias.double() if lin.bias is not None else 0)

    q, k, v = proj(attn.wq), proj(attn.wk), proj(attn.wv)
    if cfg.qk_norm == "full":
        q, k = rms(q, attn.q_norm.weight.double(), cfg.norm_eps), rms(k, attn.k_norm.weight.double(), cfg.norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    inv_freq, factor = ref_inv_freq(cfg, Dh)
    heads = []
    for h in range(H):
        g = h // (H // G)
        qh, kh, vh = q[:, h * Dh:(h + 1) * Dh], k[:, g * Dh:(g + 1) * Dh], v[:, g * Dh:(g + 1) * Dh]
        if cfg.qk_norm == "head":
            qh, kh = rms(qh, attn.q_norm.weight.double(), cfg.norm_eps), rms(kh, attn.k_norm.weight.double(),
                                                                            cfg.norm_eps)
        heads.append(ref_causal_attention(ref_rope(qh, inv_freq, factor), ref_rope(kh, inv_freq, factor), vh,
                                          1 / math.sqrt(Dh)))
    return torch.cat(heads, -1) @ attn.wo.weight.double().T


def ref_mla(attn: MLAttention, cfg: ModelConfig, x_SD):
    H, N, R, Dv, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    x = x_SD.double()
    if cfg.q_lora_rank:
        q = rms(x @ attn.wq_a.weight.double().T, attn.q_norm.weight.double(), 1e-6) @ attn.wq_b.weight.double().T
    else:
        q = x @ attn.wq.weight.double().T
    ckr = x @ attn.wkv_a.weight.double().T
    c, kr = rms(ckr[:, :C], attn.kv_norm.weight.double(), 1e-6), ckr[:, C:]
    kv = c @ attn.wkv_b.weight.double().T
    inv_freq, factor = ref_inv_freq(cfg, R)
    kr = ref_rope(kr, inv_freq, factor)
    scale = 1 / math.sqrt(N + R)
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim:
        scale *= (0.1 * cfg.rope_mscale_all_dim * math.log(cfg.rope_factor) + 1) ** 2
    heads = []
    for h in range(H):
        qh = q[:, h * (N + R):(h + 1) * (N + R)]
        kvh = kv[:, h * (N + Dv):(h + 1) * (N + Dv)]
        qh = torch.cat((qh[:, :N], ref_rope(qh[:, N:], inv_freq, factor)), -1)
        kh = torch.cat((kvh[:, :N], kr), -1)
        heads.append(ref_causal_attention(qh, kh, kvh[:, N:], scale))
    return torch.cat(heads, -1) @ attn.wo.weight.double().T


# -------------------------------------------------------------------------------------- attention vs reference
@pytest.mark.parametrize("name", list(GQA_VARIANTS) + list(MLA_VARIANTS))
def test_attention_matches_the_per_head_reference(name):
    cfg = model_cfg(**{**GQA_VARIANTS, **MLA_VARIANTS}[name])
    attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
    randomize(attn)
    x_BSD = torch.randn(2, 7, cfg.dim)
    cos, sin = rope_tables(cfg, 7)
    with torch.no_grad():
        got = attn(x_BSD, cos, sin)
    ref = ref_mla if cfg.attention == "mla" else ref_gqa
    for b in range(2):
        torch.testing.assert_close(got[b].double(), ref(attn, cfg, x_BSD[b]), atol=2e-5, rtol=1e-5)


def test_gqa_parameter_shapes_follow_the_options():
    attn = Attention(model_cfg(head_dim=12, qkv_bias=True, qk_norm="head"))
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {"wq.weight": (48, 32), "wq.bias": (48,), "wk.weight": (24, 32), "wk.bias": (24,),
                      "wv.weight": (24, 32), "wv.bias": (24,), "wo.weight": (32, 48), "q_norm.weight": (12,),
                      "k_norm.weight": (12,)}
    full = Attention(model_cfg(qk_norm="full"))
    assert full.q_norm.weight.shape == (32,) and full.k_norm.weight.shape == (16,)


def test_mla_parameter_names_and_shapes():
    attn = MLAttention(model_cfg(**MLA_VARIANTS["mla_q_lora_yarn"]))
    shapes = {k: tuple(v.shape) for k, v in attn.state_dict().items()}
    assert shapes == {"wq_a.weight": (10, 32), "q_norm.weight": (10,), "wq_b.weight": (4 * 12, 10),
                      "wkv_a.weight": (12 + 4, 32), "kv_norm.weight": (12,), "wkv_b.weight": (4 * (8 + 6), 12),
                      "wo.weight": (32, 4 * 6)}
    assert set(MLAttention(model_cfg(**MLA)).state_dict()) == {"wq.weight", "wkv_a.weight", "kv_norm.weight",
                                                               "wkv_b.weight", "wo.weight"}


# ------------------------------------------------------------------------------------ the default is unchanged
def legacy_attention(attn, x_BSD):
    """The attention of the previous release, verbatim (rope tables and forward)."""
    import torch.nn.functional as F

    from moetrain.model.rope import apply_rope

    B, S, _ = x_BSD.shape
    Dh = attn.head_dim
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh))
    angles = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    q = attn.wq(x_BSD).view(B, S, attn.n_heads, Dh)
    k = attn.wk(x_BSD).view(B, S, attn.n_kv_heads, Dh)
    v = attn.wv(x_BSD).view(B, S, attn.n_kv_heads, Dh)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=attn.n_kv_heads != attn.n_heads)
    return attn.wo(out.transpose(1, 2).reshape(B, S, -1))


def test_default_model_keeps_its_parameters_and_outputs():
    cfg = ModelConfig()
    model = TransformerLM(cfg, RouterConfig())
    model.init_weights(0)
    per_layer = {"attn_norm.weight", "ffn_norm.weight", "attn.wq.weight", "attn.wk.weight", "attn.wv.weight",
                 "attn.wo.weight"}
    dense = {"ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight"}
    moe = {"ffn.router.gate.weight", "ffn.router.expert_bias_E", "ffn.experts.w1_EDF", "ffn.experts.w3_EDF",
           "ffn.experts.w2_EFD"}
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    for i in range(cfg.n_layers):
        expected |= {f"layers.{i}.{k}" for k in per_layer | (moe if i >= cfg.first_k_dense else dense)}
    assert set(model.state_dict()) == expected
    attn = model.layers[0].attn
    x_BSD = torch.randn(2, 9, cfg.dim)
    cos, sin = rope_tables(cfg, 9)
    with torch.no_grad():
        assert torch.equal(attn(x_BSD, cos, sin), legacy_attention(attn, x_BSD))


# --------------------------------------------------------------------------------------------------------- yarn
@pytest.mark.parametrize("factor,mscale,mscale_all_dim,beta_fast,original",
                         [(40.0, 1.0, 1.0, 32.0, 4096), (4.0, 0.707, 0.0, 32.0, 64), (8.0, 1.0, 0.8, 16.0, 2048),
                          (2.0, 0.0, 0.0, 32.0, 32)])
def test_yarn_matches_transformers(factor, mscale, mscale_all_dim, beta_fast, original):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "original_max_position_embeddings": original,
            "beta_fast": beta_fast, "beta_slow": 1.0}
    rope.update({"mscale": mscale} if mscale else {})
    rope.update({"mscale_all_dim": mscale_all_dim} if mscale_all_dim else {})
    hf = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16, max_position_embeddings=4096,
                          rope_parameters=rope)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = yarn_inv_freq(16, 10000.0, factor, original, beta_fast, 1.0)
    assert torch.equal(ours, inv_freq.float())
    assert yarn_attention_factor(factor, mscale, mscale_all_dim) == pytest.approx(attention_factor, rel=1e-12)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    inv = yarn_inv_freq(64, 10000.0, 40.0, 4096, 32.0, 1.0)
    plain = 10000.0 ** (-torch.arange(0, 64, 2) / 64)
    torch.testing.assert_close(inv[:4], plain[:4])  # many rotations over 4096 positions: unchanged
    torch.testing.assert_close(inv[-4:], plain[-4:] / 40)  # less than one rotation: interpolated by the factor
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40) + 1)


# ------------------------------------------------------------------------------------------- vs transformers
def _hf_causal(B, S):
    return torch.full((S, S), float("-inf")).triu(1)[None, None].expand(B, 1, S, S)


def halves_to_interleaved(w: torch.Tensor, n_heads: int, dh: int) -> torch.Tensor:
    """Rows of a q/k projection (or a bias / norm weight) from rotate-half order to interleaved pairs, per head."""
    P = dh // 2
    perm = torch.stack((torch.arange(P), torch.arange(P) + P), 1).flatten()
    return w.reshape(n_heads, dh, -1)[:, perm].reshape(w.shape)


@pytest.mark.parametrize("q_lora,yarn,interleave", [(None, False, True), (12, True, True), (12, True, False)])
def test_mla_matches_transformers_deepseek_v3_attention(q_lora, yarn, interleave):
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    H, N, R, Dv, C = 4, 6, 4, 5, 10
    rope = {"rope_type": "default", "rope_theta": 500.0}
    ours_rope = {"rope_theta": 500.0}
    if yarn:
        rope = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0, "original_max_position_embeddings": 8,
                "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
        ours_rope.update(rope_scaling="yarn", rope_factor=8.0, rope_original_max_seq_len=8, rope_mscale=1.0,
                         rope_mscale_all_dim=0.8)
    hc = DeepseekV3Config(hidden_size=32, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora,
                          kv_lora_rank=C, qk_nope_head_dim=N, qk_rope_head_dim=R, v_head_dim=Dv,
                          max_position_embeddings=64, rope_parameters=rope, rope_interleave=interleave,
                          attn_implementation="eager")
    hf = DeepseekV3Attention(hc, 0).eval()
    randomize(hf, seed=1)
    cfg = model_cfg(n_kv_heads=H, attention="mla", q_lora_rank=q_lora or 0, kv_lora_rank=C, qk_nope_head_dim=N,
                    qk_rope_head_dim=R, v_head_dim=Dv, **ours_rope)
    names = {"wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    names.update({"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj"} if q_lora else {"wq": "q_proj"})
    state = {f"{ours}.weight": getattr(hf, theirs).weight.detach().clone() for ours, theirs in names.items()}
    if not interleave:  # transformers rotates halves: put each rope block's rows into interleaved pairs
        wq = "wq_b.weight" if q_lora else "wq.weight"
        q = state[wq].view(H, N + R, -1)
        q[:, N:] = halves_to_interleaved(q[:, N:].reshape(H * R, -1), H, R).view(H, R, -1)
        state["wkv_a.weight"][C:] = halves_to_interleaved(state["wkv_a.weight"][C:], 1, R)
    ours = MLAttention(cfg)
    ours.load_state_dict(state)
    B, S = 2, 9
    x = torch.randn(B, S, 32)
    with torch.no_grad():
        position = DeepseekV3RotaryEmbedding(hc)(x, torch.arange(S)[None].expand(B, S))
        ref = hf(x, position, _hf_causal(B, S))[0]
        got = ours(x, *rope_tables(cfg, S))
    assert ours.scale == pytest.approx(hf.scaling, rel=1e-12)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "qwen2_moe"])
def test_gqa_options_match_transformers(arch):
    transformers = pytest.importorskip("transformers")
    import importlib

    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    prefix = {"qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe", "qwen2_moe": "Qwen2Moe"}[arch]
    H, G = 4, 2
    common = dict(hidden_size=32, num_attention_heads=H, num_key_value_heads=G, max_position_embeddings=64,
                  rms_norm_eps=1e-6, attn_implementation="eager")
    if arch == "qwen3_moe":
        hc, ours_kw = transformers.Qwen3MoeConfig(head_dim=12, **common), dict(head_dim=12, qk_norm="head")
    elif arch == "olmoe":
        hc, ours_kw = transformers.OlmoeConfig(clip_qkv=0.4, **common), dict(qk_norm="full", clip_qkv=0.4)
    else:
        hc, ours_kw = transformers.Qwen2MoeConfig(qkv_bias=True, **common), dict(qkv_bias=True)
    hf = getattr(module, f"{prefix}Attention")(hc, 0).eval()
    randomize(hf, seed=2)
    cfg = model_cfg(norm_eps=1e-6, **ours_kw)
    Dh = cfg.head_dim or cfg.dim // H
    state = {}
    for ours, theirs, heads in (("wq", "q_proj", H), ("wk", "k_proj", G), ("wv", "v_proj", G), ("wo", "o_proj", 0)):
        lin = getattr(hf, theirs)
        for kind in ("weight", "bias"):
            t = getattr(lin, kind)
            if t is not None:
                state[f"{ours}.{kind}"] = halves_to_interleaved(t.detach(), heads, Dh) if ours in ("wq", "wk") else t
    for norm, heads in (("q_norm", H), ("k_norm", G)):
        if hasattr(hf, norm):
            w = getattr(hf, norm).weight.detach()
            state[f"{norm}.weight"] = halves_to_interleaved(w, 1 if cfg.qk_norm == "head" else heads, Dh)
    ours = Attention(cfg)
    ours.load_state_dict(state)
    B, S = 2, 9
    x = torch.randn(B, S, 32)
    with torch.no_grad():
        position = getattr(module, f"{prefix}RotaryEmbedding")(hc)(x, torch.arange(S)[None].expand(B, S))
        ref = hf(x, position, _hf_causal(B, S))[0]
        got = ours(x, *rope_tables(cfg, S))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ shared experts
def test_shared_expert_size_and_sigmoid_gate():
    torch.manual_seed(0)
    layer = MoELayer(8, 16, 4, 1, RouterConfig(top_k=2), layer_id=1, shared_hidden=24, shared_gate=True)
    layer.reset_parameters(0.2, 0.2, seed=0)
    assert layer.shared_experts.w1.weight.shape == (24, 8) and layer.shared_gate.weight.shape == (1, 8)
    x = torch.randn(2, 3, 8)
    shared, gate = layer.shared_experts, layer.shared_gate
    layer.shared_experts, layer.shared_gate = None, None
    y_routed = layer(x)
    layer.shared_experts, layer.shared_gate = shared, gate
    x_TD = x.view(-1, 8)
    w1, w3, w2 = shared.w1.weight, shared.w3.weight, shared.w2.weight
    expected = torch.sigmoid(x_TD @ gate.weight.T) * ((torch.nn.functional.silu(x_TD @ w1.T) * (x_TD @ w3.T)) @ w2.T)
    torch.testing.assert_close(layer(x) - y_routed, expected.view_as(x))
    assert (layer(x) - y_routed).abs().max() > 0


def test_model_state_dict_has_the_shared_gate():
    cfg = model_cfg(n_layers=2, first_k_dense=1, num_experts=4, moe_hidden=8, num_shared_experts=2,
                    shared_expert_hidden=20, shared_expert_gate=True)
    state = TransformerLM(cfg, RouterConfig()).state_dict()
    assert tuple(state["layers.1.ffn.shared_gate.weight"].shape) == (1, 32)
    assert tuple(state["layers.1.ffn.shared_experts.w1.weight"].shape) == (20, 32)


# ------------------------------------------------------------------------------------------ group_score_topk
def ref_group_limited(biased_TE, k, G, topk_groups, m):
    out = []
    for row in biased_TE:
        groups = row.view(G, -1)
        score_G = groups.topk(m, dim=-1).values.sum(-1)
        keep = set(score_G.topk(topk_groups).indices.tolist())
        allowed = torch.tensor([float("-inf") if e // groups.shape[1] not in keep else 0.0 for e in range(len(row))])
        out.append(sorted((row + allowed).topk(k).indices.tolist()))
    return out


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_group_score_topk_sums_the_best_m_of_each_group(m):
    torch.manual_seed(0)
    biased_TE = torch.randn(64, 12)
    got = select_topk(biased_TE, 4, num_groups=4, topk_groups=2, group_score_topk=m).sort(-1).values.tolist()
    assert got == ref_group_limited(biased_TE, 4, 4, 2, m or 2)  # 0: top_k // topk_groups
    general = select_topk(biased_TE, 4, 4, 2, torch.arange(12) // 3, group_score_topk=m).sort(-1).values.tolist()
    assert general == got


def test_group_score_topk_changes_the_chosen_groups():
    # group 0 has one very good expert, group 1 two good ones: m = 1 prefers group 0, m = 2 group 1
    biased = torch.tensor([[5.0, 0.0, 0.0, 3.0, 2.9, 0.0]])
    assert select_topk(biased, 1, 2, 1, group_score_topk=1).tolist() == [[0]]
    assert select_topk(biased, 1, 2, 1, group_score_topk=2).tolist() == [[3]]
    router = TopKRouter(6, 6, RouterConfig(top_k=1, num_groups=2, topk_groups=1, group_score_topk=2,
                                           score_func="sigmoid"))
    with torch.no_grad():
        router.gate.weight.zero_()
        router.expert_bias_E.copy_(biased[0])
    from moetrain.moe.routers import RouteContext
    assert router.route(torch.zeros(1, 6), RouteContext((1, 1))).topk_idx_TK.tolist() == [[3]]


# ----------------------------------------------------------------------------------------------------- KV cache
CACHE_VARIANTS = {"default": {}, "gqa_all": dict(head_dim=12, qkv_bias=True, qk_norm="head", clip_qkv=0.5),
                  "gqa_full_yarn": GQA_VARIANTS["qk_norm_full_clip"] | GQA_VARIANTS["yarn"], **MLA_VARIANTS}


@pytest.mark.parametrize("name", list(CACHE_VARIANTS))
def test_incremental_decoding_matches_the_full_forward(name):
    cfg = model_cfg(n_layers=3, ffn_hidden=48, num_experts=4, moe_hidden=16, num_shared_experts=1,
                    shared_expert_gate=True, **CACHE_VARIANTS[name])
    model = TransformerLM(cfg, RouterConfig(top_k=2))
    model.init_weights(0)
    randomize(model, seed=3)
    model.eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache.create(cfg, 2, 16)
        steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 10)]
        steps.append(model(tokens[:, 10:], cache=cache))  # two tokens at once after single steps
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_refuses_what_does_not_fit():
    cfg = model_cfg(n_layers=1, num_experts=0, max_seq_len=8)
    model = TransformerLM(cfg, RouterConfig()).eval()
    cache = KVCache.create(cfg, 1, 6)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"^4 cached positions \+ 3 new tokens exceed the KV cache length 6 "):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="batch of 2 sequences for a KV cache of 1"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert cache.pos == 4
    with pytest.raises(ValueError, match="cache length 9 must be between 1 and model.max_seq_len=8"):
        KVCache.create(cfg, 1, 9)
    mla = KVCache.create(model_cfg(**MLA), 3, 5)
    assert tuple(mla.layer(0).a.shape) == (3, 5, 12) and tuple(mla.layer(0).b.shape) == (3, 5, 1, 4)


# ---------------------------------------------------------------------------------- training paths still work
def test_mla_gradients_are_the_same_under_activation_checkpointing():
    cfg = model_cfg(n_layers=2, first_k_dense=1, num_experts=4, moe_hidden=16, **MLA_VARIANTS["mla_q_lora_yarn"])
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    grads = {}
    for mode in ("none", "full", "selective"):
        model = TransformerLM(cfg, RouterConfig(top_k=2), activation_checkpointing=mode)
        model.init_weights(0)
        torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    assert grads["none"]["layers.0.attn.wq_a.weight"].abs().sum() > 0
    for mode in ("full", "selective"):
        for n, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][n], g, msg=n)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(tokens)).all()


# ------------------------------------------------------------------------------------------------ memory plan
@pytest.mark.parametrize("extra", [{}, dict(head_dim=24, qk_norm="head", clip_qkv=2.0), dict(qk_norm="full"),
                                   dict(MLA, q_lora_rank=24), MLA], ids=["default", "gqa_options", "full_norm",
                                                                          "mla_q_lora", "mla"])
def test_memory_plan_counts_what_the_attention_saves(extra):
    """The plan's attention part of a block (attn_norm + attention) against the bytes autograd saves in it."""
    from moetrain.train.memory_plan import attention_activation_bytes

    cfg = model_cfg(n_layers=1, num_experts=0, **extra)
    block = TransformerLM(cfg, RouterConfig()).layers[0]
    B, S = 2, 16
    x_BSD = torch.randn(B, S, cfg.dim, requires_grad=True)
    with SavedTensorBytes(list(block.parameters()) + [x_BSD]) as saved:
        block._attention(x_BSD, *rope_tables(cfg, S))
    saved.add(x_BSD)  # the block's input, which the plan counts as the norm's input
    planned = attention_activation_bytes(block.attn, B, S, cfg.dim, 4)
    # 15%: the plan counts the attention output and wo's input apart; on CPU (flash) SDPA they share one storage
    assert abs(planned - saved.total) <= 0.15 * saved.total, (planned, saved.total)


# ------------------------------------------------------------------------------------------ the DeepSeek preset
def test_deepseek_v3_preset_is_the_published_size():
    cfg = compose_config(["model=deepseek_v3_like", "router=deepseek_v3"])
    validate(cfg, 1)
    assert cfg.model.attention == "mla" and cfg.router.group_score_topk == 2
    counts = count_parameters(cfg.model, cfg.router)
    assert 670.5e9 < counts["total"] < 671.5e9  # 671B published
    assert 37.0e9 < counts["active"] < 38.0e9  # 37B published


# ------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("extra,message", [
    (["model.attention=mla"], "model.attention=mla needs model.kv_lora_rank >= 1"),
    (["model.attention=mla", "model.kv_lora_rank=8", "model.qk_rope_head_dim=3", "model.v_head_dim=8"],
     "model.qk_rope_head_dim=3 must be even for RoPE"),
    (["model.attention=mla", "model.kv_lora_rank=8", "model.qk_rope_head_dim=4", "model.v_head_dim=8",
      "model.qk_norm=head"], "model.qk_norm=head is an option of model.attention=gqa"),
    (["model.kv_lora_rank=8"], "model.kv_lora_rank=8 is only read with model.attention=mla"),
    (["model.attention=bogus"], "model.attention='bogus' is unknown; use gqa or mla"),
    (["model.qk_norm=rms"], "model.qk_norm='rms' is unknown; use none, head or full"),
    (["model.head_dim=0", "model.head_dim=-4"], "model.head_dim=-4 must be >= 0"),
    (["model.head_dim=7"], "model.head_dim=7 must be even for RoPE"),
    (["model.clip_qkv=0"], "model.clip_qkv=0.0 must be > 0"),
    (["model.rope_scaling=ntk"], "model.rope_scaling='ntk' is unknown; use none or yarn"),
    (["model.rope_scaling=yarn", "model.rope_original_max_seq_len=4096"],
     "model.rope_scaling=yarn needs model.rope_factor > 1"),
    (["model.rope_scaling=yarn", "model.rope_factor=4"],
     "model.rope_scaling=yarn needs model.rope_original_max_seq_len"),
    (["model.rope_factor=4"], "model.rope_factor=4.0 is only read with model.rope_scaling=yarn"),
    (["model.rope_factor=0.5"], "model.rope_factor=0.5 must be >= 1"),
    (["model.shared_expert_gate=true"], "model.shared_expert_gate=True needs shared experts"),
    (["model.shared_expert_hidden=64"], "model.shared_expert_hidden=64 needs shared experts"),
    (["router.group_score_topk=2"], "router.group_score_topk=2 is only read with group-limited routing"),
    (["router.num_groups=4", "router.topk_groups=2", "router.group_score_topk=3"],
     "router.group_score_topk=3 exceeds the 2 experts of a group"),
])
def test_inconsistent_values_are_one_line_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError) as info:
        validate(compose_config([f"trainer.run_dir={tmp_path}", *extra]), 1)
    text = str(info.value)
    assert message in text, text
    lines = text.splitlines()
    assert len(lines) == 1 or all(line.startswith("  - ") for line in lines[1:]), text


# ------------------------------------------------------------------------------------------ parallel layouts
MLA_RUN = ["model.attention=mla", "model.q_lora_rank=12", "model.kv_lora_rank=16", "model.qk_nope_head_dim=8",
           "model.qk_rope_head_dim=4", "model.v_head_dim=8", "model.rope_scaling=yarn", "model.rope_factor=4",
           "model.rope_original_max_seq_len=16", "model.rope_mscale_all_dim=1.0", "model.num_shared_experts=1",
           "model.shared_expert_hidden=24", "model.shared_expert_gate=true", "router.num_groups=2",
           "router.topk_groups=1", "router.group_score_topk=1", "trainer.max_steps=4", "trainer.eval_batches=0",
           "logger.jsonl=true"]


def _train_body(rank, world_size, args):
    from moetrain.cli import train_main

    return train_main(args)


def test_mla_model_trains_the_same_under_ep2_with_fsdp(tmp_path):
    """One process vs 2 gloo ranks (experts split, dense parameters sharded by FSDP2): the same losses."""
    from moetrain.cli import train_main
    from tests.distributed import run_distributed
    from tests.train_utils import losses

    one = overrides(tmp_path / "one", tmp_path / "cache", *MLA_RUN)
    assert train_main(one) == 0
    two = overrides(tmp_path / "two", tmp_path / "cache", *MLA_RUN, "parallel.ep=2", "parallel.data_parallel=fsdp")
    assert run_distributed(_train_body, 2, two) == [0, 0]
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-5), (step, got[step], ref[step])
