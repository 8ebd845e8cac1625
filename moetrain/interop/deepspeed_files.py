"""Finding and reading the files of a DeepSpeed engine checkpoint without unpickling arbitrary objects.

What `engine.save_checkpoint(save_dir)` writes for a model with native `deepspeed.moe.layer.MoE` layers (checked
against DeepSpeed 0.19.8; no ZeRO stage 3, no tensor or pipeline parallelism):

    save_dir/latest                                       the newest tag, e.g. `global_step100` (a text file)
    save_dir/<tag>/mp_rank_00_model_states.pt             `module`: every non-expert weight (the gates among them,
                                                          `<path>.deepspeed_moe.gate.wg.weight`); `num_experts`: one
                                                          entry per MoE layer; engine bookkeeping
    save_dir/<tag>/layer_<L>_expert_<e>_mp_rank_00_model_states.pt
                                                          expert e (global id) of the L-th MoE layer in module order:
                                                          `<path>.deepspeed_moe.experts.deepspeed_experts.<e>.<name>`
    save_dir/<tag>/expp_rank_<r>_mp_rank_00_optim_states.pt, zero_pp_rank_*_optim_states.pt
                                                          optimizer state (not read)

Every rank of an expert-parallel group writes the files of the experts it holds under their global ids, so one tag
directory holds all experts whatever `ep_size` was.

The `.pt` files are pickles. They are read with `torch.load(weights_only=True)`, whose unpickler builds tensors and
plain containers only, plus an explicit allow-list (`ALLOWED_BY_NAME`) of the few harmless non-tensor objects that
DeepSpeed and its users keep beside the weights (the fp16 loss scaler in the optimizer state, Megatron-DeepSpeed's
`args`). These are not imported nor constructed: each is replaced by an inert `Unused` placeholder, and the import
reads nothing from them. A file that needs any other global is refused with the global's name; nothing in it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moetrain.interop import ConvertError

MODEL_STATES = "mp_rank_00_model_states.pt"
LATEST = "latest"
EXPERT_FILE = "layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt"
MOE_PREFIX = ".deepspeed_moe.experts.deepspeed_experts."
GATE_SUFFIX = ".deepspeed_moe.gate.wg.weight"


class Unused:
    """Stands in for an allow-listed non-tensor object of a checkpoint: takes any constructor arguments and state,
    keeps nothing, runs nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# Globals (module.name) a DeepSpeed checkpoint may hold beside its tensors, loaded as `Unused`.
ALLOWED_BY_NAME: tuple[str, ...] = (
    "argparse.Namespace",  # Megatron-DeepSpeed's `args` in the client state
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # fp16 optimizer state (static loss scale)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 optimizer state (dynamic loss scale)
)


def load_pickle(path: Path) -> Any:
    """The object stored in the DeepSpeed `.pt` file `path`, loaded as described in the module docstring."""
    allowed = [(Unused, name) for name in ALLOWED_BY_NAME]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unpickling or format error: name what refused the file
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                      if g not in ALLOWED_BY_NAME]
        except Exception:  # noqa: BLE001 - not even a torch file
            unsafe = []
        if unsafe:
            raise ConvertError(f"{path} needs the Python global(s) {', '.join(unsafe[:3])} to load, which a safe "
                               f"load does not construct (only tensors, plain containers and "
                               f"{', '.join(ALLOWED_BY_NAME)}); nothing was executed: re-save the checkpoint "
                               f"without such objects in its client state") from None
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ConvertError(f"{path} is not a readable torch checkpoint file ({first})") from None


def find_tag_dir(src: Path) -> Path:
    """The tag directory of the DeepSpeed checkpoint `src`: `src` itself when it holds the model states, else the
    tag named by `src/latest`. Layouts this import cannot read are refused with the reason."""
    src = Path(src)
    if not src.is_dir():
        raise ConvertError(f"{src} is not a directory; give the directory DeepSpeed's engine.save_checkpoint wrote "
                           f"(or one of its tag directories)")
    tag_dir = src
    if not (src / MODEL_STATES).is_file() and (src / LATEST).is_file():
        tag = (src / LATEST).read_text().strip()
        tag_dir = src / tag
        if not tag or not tag_dir.is_dir():
            raise ConvertError(f"{src / LATEST} names the tag {tag!r}, but {tag_dir} is not a directory; give the "
                               f"tag directory itself")
    if any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        raise ConvertError(f"{tag_dir} is a ZeRO stage 3 checkpoint (weights partitioned over ranks); re-save it "
                           f"with ZeRO stage 0-2 (or gather the weights with engine.save_16bit_model) first")
    if any(tag_dir.glob("layer_*-model_*states.pt")):
        raise ConvertError(f"{tag_dir} is a DeepSpeed pipeline-parallel checkpoint (PipelineModule); only engine "
                           f"checkpoints of a plain module with deepspeed.moe.layer.MoE layers import")
    if not (tag_dir / MODEL_STATES).is_file():
        raise ConvertError(f"{src} is not a DeepSpeed checkpoint: no {MODEL_STATES} in it and no `{LATEST}` file "
                           f"naming a tag; give the directory engine.save_checkpoint wrote (or one of its tags)")
    if any(p.name != MODEL_STATES for p in tag_dir.glob("mp_rank_*_model_states.pt")):
        raise ConvertError(f"{tag_dir} holds tensor-parallel shards (mp_rank_01 and up); only checkpoints saved "
                           f"without tensor parallelism (mp_rank_00 only) import")
    return tag_dir


def read_model_states(tag_dir: Path) -> tuple[dict[str, torch.Tensor], list[int]]:
    """(`module` state dict, experts per MoE layer in module order, as the engine recorded them; empty when it did
    not) of the checkpoint's model-states file."""
    path = tag_dir / MODEL_STATES
    states = load_pickle(path)
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict) or not all(isinstance(v, torch.Tensor) for v in module.values()):
        raise ConvertError(f"{path} has no `module` state dict of tensors; it was not written by a DeepSpeed "
                           f"engine's save_checkpoint")
    if states.get("ds_autoep_layers"):
        raise ConvertError(f"{path} comes from DeepSpeed AutoEP layers (fused expert weights); only native "
                           f"deepspeed.moe.layer.MoE layers import")
    num_experts = states.get("num_experts") or []
    if isinstance(num_experts, int):
        num_experts = [num_experts]
    return dict(module), [int(n) for n in num_experts]


def read_expert(tag_dir: Path, layer: int, expert: int, moe_path: str) -> dict[str, torch.Tensor]:
    """The weights of global expert `expert` of the `layer`-th MoE layer (module path `moe_path`), keyed by their
    names inside the expert module (e.g. `w1.weight`)."""
    path = tag_dir / EXPERT_FILE.format(layer=layer, expert=expert)
    if not path.is_file():
        raise ConvertError(f"{path} is missing: the checkpoint lacks expert {expert} of MoE layer {layer} "
                           f"({moe_path}); copy every layer_*_expert_* file that engine.save_checkpoint wrote "
                           f"(each expert-parallel rank writes its own experts)")
    states = load_pickle(path)
    prefix = f"{moe_path}{MOE_PREFIX}{expert}."
    if not isinstance(states, dict) or not states or not all(
            isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor) for k, v in states.items()):
        raise ConvertError(f"{path} does not hold expert {expert} of {moe_path} (its keys must start with "
                           f"{prefix}); the file belongs to another checkpoint or model")
    return {k[len(prefix):]: v for k, v in states.items()}


def moe_paths(module: dict[str, torch.Tensor]) -> list[str]:
    """Module paths of the MoE layers, in module order (the order of the `layer_<L>` expert files)."""
    return [k[:-len(GATE_SUFFIX)] for k in module if k.endswith(GATE_SUFFIX)]

