"""Hugging Face transformers checkpoints in and out of moetrain (docs/interop.md).

    import_hf(src, out, overrides)            HF model directory -> moetrain run directory (collective under torchrun)
    export_hf(run, out, step, arch, max_shard_size)   moetrain run -> HF model directory (hub layout)
    load_hf_model(src, overrides)             HF model directory -> (TrainConfig, TransformerLM) in memory
    hf_config_to_moetrain(config_dict)        config.json -> (model keys, router keys)
    read_hf_state(src)                        the checkpoint's tensors, read one at a time (safetensors, sharded or not)

One small module per architecture family maps the config and the tensors both ways (mixtral, qwen_moe, olmoe,
deepseek_v3, dense); base.py holds the registry by config.json `model_type` / `architectures`.
"""

from moetrain.interop.hf import deepseek_v3, dense, mixtral, olmoe, qwen_moe  # noqa: F401  (register the families)
from moetrain.interop.hf.base import FAMILIES, family_for
from moetrain.interop.hf.convert import (export_hf, family_for_model, hf_config_to_moetrain, import_config, import_hf,
                                         load_hf_model, load_hf_weights)
from moetrain.interop.hf.io import HFCheckpoint, read_hf_config, read_hf_state

__all__ = ["FAMILIES", "family_for", "family_for_model", "export_hf", "hf_config_to_moetrain", "import_config",
           "import_hf", "load_hf_model", "load_hf_weights", "HFCheckpoint", "read_hf_config", "read_hf_state"]
