"""Dense Llama (LlamaForCausalLM), Qwen2 (Qwen2ForCausalLM, always q/k/v biases) and Qwen3 (Qwen3ForCausalLM, q/k
norms per head): imported as moetrain models with model.num_experts=0, e.g. to upcycle them into MoEs."""

from __future__ import annotations

from moetrain.interop.hf.base import LlamaLike, register


class Dense(LlamaLike):
    moe = False


@register
class Llama(Dense):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    defaults = {"attention_bias": False, "mlp_bias": False, "rope_theta": 10000.0}


@register
class Qwen2(Dense):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    defaults = {"use_sliding_window": False, "rope_theta": 10000.0}
    bias_key = ""  # q/k/v biases always


@register
class Qwen3(Dense):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    defaults = {"attention_bias": False, "use_sliding_window": False, "rope_theta": 10000.0}
    qk_norm = "head"
