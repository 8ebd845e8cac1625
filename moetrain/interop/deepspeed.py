"""Import a DeepSpeed-MoE engine checkpoint into a moetrain run directory (`moetrain-convert SRC --from deepspeed`).

Legend: E experts, D model dim, F expert hidden dim, P the module path of a DeepSpeed MoE layer, i a layer index,
L the MoE layers in DeepSpeed's module order.

The MoE layers (`deepspeed.moe.layer.MoE` with a SwiGLU expert of three bias-free linears) map as

    P.deepspeed_moe.gate.wg.weight                              (E, D) -> layers.i.ffn.router.gate.weight  (E, D)
    P.deepspeed_moe.experts.deepspeed_experts.e.w1.weight       (F, D) -> layers.i.ffn.experts.w1_EDF[e] = W^T
    P.deepspeed_moe.experts.deepspeed_experts.e.w3.weight       (F, D) -> layers.i.ffn.experts.w3_EDF[e] = W^T
    P.deepspeed_moe.experts.deepspeed_experts.e.w2.weight       (D, F) -> layers.i.ffn.experts.w2_EFD[e] = W^T
    (no DeepSpeed counterpart)                                         -> layers.i.ffn.router.expert_bias_E = 0

where `layers.i.ffn` is P's moetrain name. Every other weight keeps its name, or is renamed by a name map (a JSON
file, `deepspeed.names=FILE`): the dense model must compute what moetrain's transformer computes (docs/interop.md).

DeepSpeed keeps its routing settings in the MoE constructor, not in the checkpoint, so they are given as options
(`deepspeed.<name>=<value>` among the overrides; defaults are DeepSpeed's) and mapped to moetrain's router:

    deepspeed.k=K                       -> router.top_k = K, router.norm_topk_prob = (K > 1)
                                           (DeepSpeed's top-2 and top-k gating renormalise the K selected softmax
                                           probabilities; top-1 uses the probability as it is)
    deepspeed.drop_tokens, capacity_factor -> router.capacity_factor = capacity_factor if drop_tokens else null
    (softmax gate)                      -> router.score_func = softmax
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from moetrain.interop import ConvertError
from moetrain.interop import deepspeed_files as files

OPTION_PREFIX = "deepspeed."
EXPERT_WEIGHTS = ("w1", "w3", "w2")  # moetrain's gate, up and down projections of a SwiGLU expert
EXPERT_PARAMS = {"w1": "w1_EDF", "w3": "w3_EDF", "w2": "w2_EFD"}


@dataclass
class DeepSpeedOptions:
    """The settings of the DeepSpeed MoE layers that the checkpoint does not store (`deepspeed.<name>=<value>`)."""

    k: int = 0  # the MoE layers' `k` (required: 1 and 2 are DeepSpeed's top-1 and top-2 gating, more is top-k)
    drop_tokens: bool = True  # DeepSpeed's default
    capacity_factor: float = 1.0  # DeepSpeed's default (the training capacity factor)
    names: Optional[str] = None  # a JSON name map for a model whose names differ from moetrain's


@dataclass
class NameMap:
    """How the DeepSpeed model's names map to moetrain's (read from the JSON file of `deepspeed.names`):

        {"names":  {"<DeepSpeed prefix>": "<moetrain prefix>", ...},   e.g. {"blocks.{i}.moe": "layers.{i}.ffn"}
         "expert": {"w1": "<gate linear>", "w3": "<up linear>", "w2": "<down linear>"},
         "ignore": ["<DeepSpeed name pattern>", ...]}                  e.g. ["*.rotary.inv_freq"]

    A name is renamed by the longest prefix that matches it at a `.` boundary; `{i}` stands for a layer index and
    must appear on both sides. Names no prefix matches stay as they are. `ignore` lists DeepSpeed weights (fnmatch
    patterns) that the moetrain model has no place for and may be left out."""

    renames: list[tuple[re.Pattern, str]] = field(default_factory=list)
    expert: dict[str, str] = field(default_factory=lambda: {w: w for w in EXPERT_WEIGHTS})
    ignore: list[str] = field(default_factory=list)

    def to_moetrain(self, name: str) -> str:
        for pattern, target in self.renames:  # longest prefix first
            m = pattern.match(name)
            if m:
                return target.replace("{i}", m.group("i") or "") + name[m.end():]
        return name

    def ignored(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.ignore)


def parse_options(overrides: Sequence[str]) -> tuple[DeepSpeedOptions, list[str]]:
    """Split `overrides` into the `deepspeed.*` options and the moetrain config overrides."""
    opts, rest = DeepSpeedOptions(), []
    known = [f.name for f in fields(DeepSpeedOptions)]
    for item in overrides:
        if not item.startswith(OPTION_PREFIX):
            rest.append(item)
            continue
        key, sep, value = item[len(OPTION_PREFIX):].partition("=")
        if not sep or key not in known:
            raise ConvertError(f"unknown DeepSpeed option {item!r}; the options are "
                               f"{', '.join(OPTION_PREFIX + k + '=...' for k in known)}")
        try:
            if key == "k":
                opts.k = int(value)
            elif key == "capacity_factor":
                opts.capacity_factor = float(value)
            elif key == "drop_tokens":
                if value.lower() not in ("true", "false"):
                    raise ValueError
                opts.drop_tokens = value.lower() == "true"
            else:
                opts.names = value
        except ValueError:
            raise ConvertError(f"{item}: bad value {value!r} (deepspeed.k is an integer, deepspeed.capacity_factor "
                               f"a number, deepspeed.drop_tokens true or false)") from None
    if opts.k < 1:
        raise ConvertError("a DeepSpeed checkpoint does not store its MoE layers' top-k: give the `k` they were "
                           "built with, e.g. deepspeed.k=2")
    if opts.drop_tokens and not opts.capacity_factor > 0:
        raise ConvertError(f"deepspeed.capacity_factor={opts.capacity_factor} must be > 0 (or deepspeed.drop_tokens="
                           f"false for dropless routing)")
    return opts, rest


def read_name_map(path: Optional[str]) -> NameMap:
    if path is None:
        return NameMap()
    try:
        spec = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConvertError(f"deepspeed.names={path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise ConvertError(f"deepspeed.names={path} is not valid JSON ({e})") from None
    bad = set(spec) - {"names", "expert", "ignore"} if isinstance(spec, dict) else {"(not an object)"}
    if bad:
        raise ConvertError(f"deepspeed.names={path}: unknown entries {sorted(bad)}; a name map holds `names`, "
                           f"`expert` and `ignore` (docs/interop.md)")
    names, expert, ignore = spec.get("names", {}), spec.get("expert", {}), spec.get("ignore", [])
    if not (isinstance(names, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in names.items())):
        raise ConvertError(f"deepspeed.names={path}: `names` must map DeepSpeed name prefixes to moetrain ones")
    if not (isinstance(expert, dict) and set(expert) <= set(EXPERT_WEIGHTS)
            and all(isinstance(v, str) for v in expert.values())):
        raise ConvertError(f"deepspeed.names={path}: `expert` maps w1 (gate), w3 (up), w2 (down) to the names of "
                           f"the linears inside the DeepSpeed expert, e.g. {{\"w1\": \"gate_proj\"}}")
    if not (isinstance(ignore, list) and all(isinstance(p, str) for p in ignore)):
        raise ConvertError(f"deepspeed.names={path}: `ignore` must be a list of DeepSpeed name patterns")
    renames = []
    for src, dst in sorted(names.items(), key=lambda kv: -len(kv[0])):
        if ("{i}" in src) != ("{i}" in dst) or src.count("{i}") > 1 or dst.count("{i}") > 1:
            raise ConvertError(f"deepspeed.names={path}: {src!r} -> {dst!r}: a layer index {{i}} must appear once "
                               f"on both sides or on neither")
        regex = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        renames.append((re.compile(rf"{regex}(?=\.|$)" if "{i}" in src else rf"{regex}(?=\.|$)(?P<i>)"), dst))
    return NameMap(renames, {**NameMap().expert, **expert}, ignore)


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value the last `key=value` override gives, None when there is none."""
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == key and "=" in o]
    return values[-1] if values else None


def expert_tensors(tag_dir: Path, layer: int, moe_path: str, num_experts: int,
                   names: NameMap) -> dict[str, torch.Tensor]:
    """{w1_EDF, w3_EDF, w2_EFD} of DeepSpeed MoE layer `layer` (module path `moe_path`), in moetrain's (in, out)
    layout: the transpose of each expert's nn.Linear weight, stacked over the global expert ids."""
    stacked: dict[str, list[torch.Tensor]] = {w: [] for w in EXPERT_WEIGHTS}
    want = {f"{names.expert[w]}.weight": w for w in EXPERT_WEIGHTS}
    for e in range(num_experts):
        weights = files.read_expert(tag_dir, layer, e, moe_path)
        if set(weights) != set(want):
            kind = ("a 2-linear MLP expert (GELU/ReLU style), which moetrain's SwiGLU experts cannot represent"
                    if len(weights) == 2 else "not a SwiGLU expert of three bias-free linears")
            raise ConvertError(f"the experts of DeepSpeed MoE layer {moe_path} hold {', '.join(sorted(weights))}: "
                               f"{kind}; moetrain imports SwiGLU experts whose gate, up and down linears are "
                               f"{', '.join(want)} (other linear names: the `expert` entry of deepspeed.names)")
        for name, w in want.items():
            stacked[w].append(weights[name].float().t())
    return {EXPERT_PARAMS[w]: torch.stack(ts) for w, ts in stacked.items()}


def import_deepspeed(src: Path, out: Path, overrides: Sequence[str] = ()) -> Path:
    """Convert the DeepSpeed engine checkpoint `src` (a save directory or one of its tags) into the moetrain run
    directory `out` (config.yaml + a weights-only checkpoint at step 0); return `out`. `overrides` are moetrain
    config overrides (applied after the converted settings) and the `deepspeed.*` options (module docstring).
    Every check happens before anything is written; a problem raises a one-line ConvertError (or ConfigError)."""
    from moetrain.config.compose import compose_config
    from moetrain.config.validate import validate
    from moetrain.interop.run_dir import write_run_dir
    from moetrain.model.transformer import TransformerLM

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConvertError("the DeepSpeed import runs as one process (moetrain-convert without torchrun); the run "
                           "directory it writes loads under any parallel layout")
    opts, user_overrides = parse_options(overrides)
    names = read_name_map(opts.names)
    tag_dir = files.find_tag_dir(Path(src))
    module, num_experts_L = files.read_model_states(tag_dir)

    # ---- the MoE layers: gate in the model states, experts in their own files
    paths = files.moe_paths(module)
    if not paths:
        raise ConvertError(f"{tag_dir / files.MODEL_STATES} holds no DeepSpeed MoE gate (*{files.GATE_SUFFIX}); "
                           f"the checkpoint has no deepspeed.moe.layer.MoE layers to import")
    gate_E = [module[p + files.GATE_SUFFIX].shape[0] for p in paths]  # a gate's rows: its layer's experts
    if num_experts_L and num_experts_L != gate_E:
        raise ConvertError(f"{tag_dir / files.MODEL_STATES} records {num_experts_L} experts per MoE layer but its "
                           f"gates have {gate_E} rows; the file is not from an unmodified engine.save_checkpoint")
    if len(set(gate_E)) != 1:
        raise ConvertError(f"the MoE layers have different numbers of experts ({gate_E}); moetrain's layers all "
                           f"have model.num_experts experts")
    E = gate_E[0]
    moe_layers: dict[int, tuple[int, str]] = {}  # moetrain layer index -> (DeepSpeed MoE layer number, path)
    for L, path in enumerate(paths):
        residual = [k for k in module if k.startswith(f"{path}.mlp.") or k.startswith(f"{path}.coefficient.")]
        if residual:
            raise ConvertError(f"DeepSpeed MoE layer {path} is a residual MoE (use_residual=True: {residual[0]}); "
                               f"its learned mix of an MLP and the experts has no moetrain counterpart")
        m = re.fullmatch(r"layers\.(\d+)\.ffn", names.to_moetrain(path))
        if m is None:
            raise ConvertError(f"DeepSpeed MoE layer {path} maps to {names.to_moetrain(path)!r}, not to a moetrain "
                               f"MoE layer layers.<i>.ffn; name it in deepspeed.names, e.g. "
                               f"{{\"names\": {{\"{re.sub(r'[0-9]+', '{i}', path)}\": \"layers.{{i}}.ffn\"}}}}")
        moe_layers[int(m.group(1))] = (L, path)

    # ---- every other weight, by moetrain name
    dense: dict[str, tuple[str, torch.Tensor]] = {}  # moetrain name -> (DeepSpeed name, tensor)
    for key, t in module.items():
        if key.endswith(files.GATE_SUFFIX) or names.ignored(key):
            continue
        dense[names.to_moetrain(key)] = (key, t)

    # ---- the model shape, from the weights (what they cannot tell comes from the user's overrides)
    def shape_of(name: str) -> Optional[tuple[int, ...]]:
        return tuple(dense[name][1].shape) if name in dense else None

    emb = shape_of("tok_embeddings.weight")
    if emb is None or len(emb) != 2:
        raise ConvertError("the checkpoint has no token embedding tok_embeddings.weight (vocab, dim); name the "
                           "DeepSpeed embedding in deepspeed.names, e.g. {\"names\": {\"embed\": \"tok_embeddings\"}}")
    vocab, dim = emb
    n_heads = override_value(user_overrides, "model.n_heads")
    if n_heads is None:
        raise ConvertError("a DeepSpeed checkpoint does not store the number of attention heads: give it as "
                           "model.n_heads=H (the key/value heads are read from the weights)")
    layer_ids = {int(m.group(1)) for n in dense if (m := re.match(r"layers\.(\d+)\.", n))} | set(moe_layers)
    n_layers = max(layer_ids) + 1
    moe_ids = sorted(moe_layers)
    first_k, every = moe_ids[0], (moe_ids[1] - moe_ids[0] if len(moe_ids) > 1 else 1)
    expected = [i for i in range(first_k, n_layers) if (i - first_k) % every == 0]
    if moe_ids != expected:
        raise ConvertError(f"the MoE layers are layers {moe_ids} of {n_layers}: moetrain places them at "
                           f"model.first_k_dense + n * model.moe_every up to the last layer")

    experts = {i: expert_tensors(tag_dir, L, path, E, names) for i, (L, path) in moe_layers.items()}
    F = experts[first_k]["w1_EDF"].shape[2]
    converted = ["model.name=deepspeed_import", f"model.vocab_size={vocab}", f"model.dim={dim}",
                 f"model.n_layers={n_layers}", f"model.num_experts={E}", f"model.moe_hidden={F}",
                 "model.num_shared_experts=0", f"model.first_k_dense={first_k}", f"model.moe_every={every}",
                 f"model.tie_embeddings={'output.weight' not in dense}"]
    dense_ffn = next((shape_of(f"layers.{i}.ffn.w1.weight") for i in range(n_layers) if i not in moe_layers), None)
    if dense_ffn is not None:
        converted.append(f"model.ffn_hidden={dense_ffn[0]}")
    wk = shape_of("layers.0.attn.wk.weight")
    try:
        head_dim = int(override_value(user_overrides, "model.head_dim") or 0) or dim // int(n_heads)
    except (ValueError, ZeroDivisionError):
        raise ConvertError(f"model.n_heads={n_heads} must be a positive integer") from None
    if wk is not None and head_dim and wk[0] % head_dim == 0:
        converted.append(f"model.n_kv_heads={wk[0] // head_dim}")
    converted += [f"router.top_k={opts.k}", f"router.norm_topk_prob={opts.k > 1}", "router.score_func=softmax",
                  f"router.capacity_factor={opts.capacity_factor if opts.drop_tokens else 'null'}"]
    cfg = compose_config(converted + list(user_overrides))
    validate(cfg, max(1, cfg.parallel.ep) * max(1, cfg.parallel.dp_replicate))

    # ---- fill the moetrain model: every entry from the checkpoint, shapes checked, nothing left over
    model = TransformerLM(cfg.model, cfg.router)
    state, missing, used = {}, [], set()
    for name, target in model.state_dict().items():
        m = re.fullmatch(r"layers\.(\d+)\.ffn\.(router\.gate\.weight|router\.expert_bias_E|experts\.(\w+))", name)
        if m and int(m.group(1)) in moe_layers:
            i, part = int(m.group(1)), m.group(2)
            origin = f"{moe_layers[i][1]}{files.GATE_SUFFIX}" if part == "router.gate.weight" else \
                f"experts of {moe_layers[i][1]}"
            if part == "router.gate.weight":
                value = module[origin]
            elif part == "router.expert_bias_E":
                value = torch.zeros_like(target)
            elif m.group(3) in experts[i]:
                value = experts[i][m.group(3)]
            else:
                missing.append(name)
                continue
        elif name in dense:
            origin, value = dense[name]
            used.add(name)
        elif name == "output.weight" and cfg.model.tie_embeddings:
            origin, value = dense["tok_embeddings.weight"]
        else:
            missing.append(name)
            continue
        if tuple(value.shape) != tuple(target.shape):
            raise ConvertError(f"{origin} has shape {tuple(value.shape)} but moetrain's {name} needs "
                               f"{tuple(target.shape)} under this config; check the model overrides "
                               f"(model.n_heads, model.head_dim, ...) against the DeepSpeed model")
        state[name] = value.to(target.dtype)
    if missing:
        raise ConvertError(f"{len(missing)} moetrain weights have no counterpart in the checkpoint (first: "
                           f"{', '.join(missing[:3])}); name the DeepSpeed weights in deepspeed.names")
    left = [dense[n][0] for n in dense if n not in used]
    if left:
        raise ConvertError(f"{len(left)} DeepSpeed weights have no place in the moetrain model (first: "
                           f"{', '.join(left[:3])}); map them in deepspeed.names, or list them under its `ignore` "
                           f"if moetrain's transformer has no such part")
    model.load_state_dict(state, strict=True)
    write_run_dir(Path(out), cfg, model)
    return Path(out)
