"""Semantic checks of a composed TrainConfig, run before any process group starts.

Each problem is one line that names the key, the value and the fix. All problems are collected and reported
together, so a user fixes a command line once.

The checks come in three layers:
- every key, by type: strings must be printable (one-line messages, usable paths), integers must fit in 64 bits;
- `RULES`, one range rule per numeric key and one allowed-value rule (from `CHOICES`) per string key with a fixed set
  of values: finite where a float must be, bounds, enums. Every key but the booleans (which composition already
  type-checks) has a rule or a cross-key check; tests/test_validate_props.py walks the schema to keep it so;
- cross-key checks (divisibility, top_k <= num_experts, paths, installed packages), run only on keys that passed
  their own rules, so one bad value gives one message.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import tempfile
import typing
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from moetrain.config.schema import TrainConfig
from moetrain.parallel.pipeline import CANDIDATES as PIPELINE_DEGREES
from moetrain.telemetry.loggers import TENSORBOARD_MISSING, WANDB_MISSING, WANDB_MODES


class ConfigError(ValueError):
    """A configuration problem the user can fix on the command line."""


# The allowed values of every string key with a fixed set of values (one place; docs/configuration.md lists them).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.attention": ("gqa", "mla"),
    "model.qk_norm": ("none", "head", "full"),
    "model.rope_scaling": ("none", "yarn"),
    "router.score_func": ("softmax", "sigmoid"),
    "router.group_by": ("experts", "ranks"),
    "router.bias_update_rule": ("proportional", "sign"),
    "parallel.mode": ("ep", "fssdp"),
    "parallel.data_parallel": ("ddp", "fsdp"),
    "parallel.pipeline_degree": ("auto",) + tuple(str(n) for n in PIPELINE_DEGREES),
    "parallel.pipeline_split": ("experts", "tokens"),
    "parallel.backend": ("auto", "gloo", "nccl"),
    "parallel.mixed_precision": ("auto", "fp32", "bf16"),
    "optim.name": ("adamw",),
    "optim.schedule": ("cosine", "constant"),
    "optim.impl": ("auto", "fused", "foreach", "apex"),
    "data.name": ("stdlib", "shards"),
    "logger.wandb_mode": WANDB_MODES,
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.activation_checkpointing": ("none", "full", "selective"),
}

SEED_LIMIT = 2**32  # trainer.seed is combined with step and expert ids into torch generator seeds


# ------------------------------------------------------------------------------------------------ schema walking
def routers() -> dict:
    """The routing methods' registry (imported here, not at module level: the routers import the config package)."""
    from moetrain.moe.routers import ROUTERS

    return ROUTERS


def schema_fields(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, annotated type) of every leaf field of the schema, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from schema_fields(tp, f"{key}.")
        else:
            yield key, tp


def schema_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, nested config nodes included (`parallel.fssdp` and its leaves); under
    `router` the keys of every routing method's config (each preset brings its method's own keys)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        keys.append(key)
        if key == "router":
            keys += sorted({k for r in routers().values() for k in schema_keys(r.config_cls, "router.")})
        elif dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{key}.")
    return keys


def get_key(cfg: TrainConfig, key: str) -> Any:
    return reduce(getattr, key.split("."), cfg)


def show(value: Any) -> str:
    """A value as it appears in a message: plain where printable, repr otherwise (keeps the message one line)."""
    text = str(value)
    return text if text and text.isprintable() else repr(value)


# --------------------------------------------------------------------------------------------------- range rules
@dataclass(frozen=True)
class Rule:
    """`key`'s value must satisfy `ok`; otherwise the problem is `"{key}={value} {text}"`."""

    key: str
    ok: Callable[[Any], bool]
    text: str
    quote: bool = False  # show the value as repr (strings of a fixed set, so an empty or spaced value is visible)

    def problem(self, value: Any) -> Optional[str]:
        if self.ok(value):
            return None
        shown = repr(value) if self.quote else show(value)
        return f"{self.key}={shown} {self.text}"


def at_least(key: str, lo: int, note: str = "") -> Rule:
    """An integer >= lo."""
    return Rule(key, lambda v: v >= lo, f"must be >= {lo}{note}")


def positive(key: str, note: str = "") -> Rule:
    """A finite float > 0."""
    return Rule(key, lambda v: math.isfinite(v) and v > 0, f"must be > 0 and finite{note}")


def non_negative(key: str, note: str = "") -> Rule:
    """A finite float >= 0."""
    return Rule(key, lambda v: math.isfinite(v) and v >= 0, f"must be >= 0 and finite{note}")


def fraction(key: str, interval: str, note: str = "") -> Rule:
    """A float in `interval`, one of "[0, 1]", "[0, 1)", "(0, 1)"."""
    lo_ok = (lambda v: v >= 0) if interval[0] == "[" else (lambda v: v > 0)
    hi_ok = (lambda v: v <= 1) if interval[-1] == "]" else (lambda v: v < 1)
    return Rule(key, lambda v: math.isfinite(v) and lo_ok(v) and hi_ok(v), f"must be in {interval}{note}")


def one_of(key: str, verb: str = "is unknown") -> Rule:
    values = CHOICES[key]
    listed = values[0] if len(values) == 1 else ", ".join(values[:-1]) + f" or {values[-1]}"
    return Rule(key, lambda v: v in values, f"{verb}; use {listed}", quote=True)


def non_empty(key: str, text: str, optional: bool = False) -> Rule:
    """A string with more than white space (or None where `optional`)."""
    return Rule(key, lambda v: (optional and v is None) or bool(v and v.strip()), text, quote=True)


RULES: tuple[Rule, ...] = (
    # model
    non_empty("model.name", "must be a non-empty name"),
    at_least("model.vocab_size", 1),  # and at least the tokenizer's vocabulary: see _tokenizer_vocab
    at_least("model.dim", 1),
    at_least("model.n_layers", 1),
    at_least("model.n_heads", 1),
    at_least("model.n_kv_heads", 1),
    at_least("model.max_seq_len", 1),
    Rule("model.rope_theta", lambda v: math.isfinite(v) and v > 1,
         "must be > 1 and finite (the RoPE base; 10000 is usual)"),
    positive("model.norm_eps", " (RMSNorm's epsilon; 1e-5 is usual)"),
    at_least("model.ffn_hidden", 1),
    at_least("model.num_experts", 0, " (0 = dense model)"),
    at_least("model.moe_hidden", 1),
    at_least("model.num_shared_experts", 0),
    at_least("model.first_k_dense", 0, " (model.n_layers or more makes every layer dense)"),
    at_least("model.moe_every", 1),
    positive("model.init_std", " (the std of the initial weights; 0.02 is usual)"),
    at_least("model.head_dim", 0, " (0: model.dim / model.n_heads)"),
    one_of("model.attention"),
    one_of("model.qk_norm"),
    Rule("model.clip_qkv", lambda v: v is None or (math.isfinite(v) and v > 0),
         "must be > 0 and finite (or null for no clipping)"),
    at_least("model.q_lora_rank", 0, " (0: queries projected directly)"),
    at_least("model.kv_lora_rank", 0),
    at_least("model.qk_nope_head_dim", 0),
    at_least("model.qk_rope_head_dim", 0),
    at_least("model.v_head_dim", 0),
    one_of("model.rope_scaling"),
    Rule("model.rope_factor", lambda v: math.isfinite(v) and v >= 1,
         "must be >= 1 and finite (yarn's context extension factor)"),
    at_least("model.rope_original_max_seq_len", 0),
    positive("model.rope_beta_fast", " (yarn; 32 is usual)"),
    positive("model.rope_beta_slow", " (yarn; 1 is usual)"),
    non_negative("model.rope_mscale", " (yarn; 1.0 is usual)"),
    non_negative("model.rope_mscale_all_dim", " (yarn; 0 turns it off)"),
    at_least("model.shared_expert_hidden", 0, " (0: model.num_shared_experts * model.moe_hidden)"),
    # router (top_k against model.num_experts: see _router_shape)
    one_of("router.score_func"),
    at_least("router.num_groups", 1, " (1 = no group-limited routing)"),
    at_least("router.topk_groups", 1),
    at_least("router.group_score_topk", 0, " (0: max(1, router.top_k / router.topk_groups))"),
    one_of("router.group_by"),
    positive("router.route_scale", " (gates are multiplied by it; 1.0 leaves them as they are)"),
    non_negative("router.bias_update_rate", " (0 turns the bias update off)"),
    one_of("router.bias_update_rule"),
    fraction("router.bias_update_stop_frac", "[0, 1]",
             " (the fraction of trainer.max_steps after which the bias stops)"),
    non_negative("router.aux_loss_coeff", " (0 turns it off)"),
    non_negative("router.seq_aux_loss_coeff", " (0 turns it off)"),
    non_negative("router.z_loss_coeff", " (0 turns it off)"),
    Rule("router.capacity_factor", lambda v: v is None or (math.isfinite(v) and v > 0),
         "must be > 0 and finite (or null for dropless)"),
    # parallel
    one_of("parallel.mode"),
    at_least("parallel.ep", 1),
    one_of("parallel.data_parallel"),
    one_of("parallel.pipeline_degree", verb="is invalid"),
    one_of("parallel.pipeline_split", verb="is invalid"),
    one_of("parallel.backend"),
    at_least("parallel.dp_replicate", 1, " (1 = plain FSDP; >1 = HSDP replicas)"),
    one_of("parallel.mixed_precision"),
    positive("parallel.timeout_s", " (seconds a collective may wait)"),
    at_least("parallel.fssdp.budget", 0),
    at_least("parallel.fssdp.window", 1),
    at_least("parallel.fssdp.reshard_every", 0, " (0 never re-shards)"),
    non_negative("parallel.fssdp.flops_per_byte", " (0: replica copies cost nothing in the placement)"),
    # optim
    one_of("optim.name"),
    positive("optim.lr"),
    fraction("optim.min_lr_ratio", "[0, 1]"),
    at_least("optim.warmup_steps", 0),
    one_of("optim.schedule"),
    non_negative("optim.weight_decay"),
    fraction("optim.beta1", "[0, 1)", " (Adam's first-moment decay; 0.9 is usual)"),
    fraction("optim.beta2", "[0, 1)", " (Adam's second-moment decay; 0.95 is usual)"),
    positive("optim.eps", " (Adam's epsilon; 1e-8 is usual)"),
    non_negative("optim.grad_clip", " (0 disables clipping)"),
    one_of("optim.impl"),
    # data (path, cache_dir: see _data_paths; the tokenizer's vocabulary: _tokenizer_vocab)
    one_of("data.name"),
    Rule("data.tokenizer", lambda v: v == "bytes" or _exists(Path(v).expanduser()),
         "is neither bytes nor an existing tokenizer.json file or Hugging Face tokenizer directory; give one of them"),
    at_least("data.seq_len", 1),
    at_least("data.global_batch_size", 1),
    at_least("data.micro_batch_size", 1),
    fraction("data.val_fraction", "(0, 1)"),
    at_least("data.max_corpus_bytes", 1),
    # logger
    non_empty("logger.wandb_project", "must be a non-empty wandb project name"),
    one_of("logger.wandb_mode"),
    non_empty("logger.wandb_run_name", "must be a non-empty run name, or null to let wandb pick one",
              optional=True),
    at_least("logger.heatmap_every", 0, " (steps between two load heatmaps; 0: none)"),
    # trainer (device=cuda, run_dir, resume: see _backend_device, _run_dir, _resume)
    at_least("trainer.max_steps", 1),
    at_least("trainer.dry_run_world_size", 0, " (0 plans for the launched processes)"),
    Rule("trainer.seed", lambda v: 0 <= v < SEED_LIMIT, "must be in [0, 2^32)"),
    at_least("trainer.log_every", 1),
    at_least("trainer.eval_every", 0, " (0 evaluates only at the end)"),
    at_least("trainer.eval_batches", 0, " (0 turns evaluation off)"),
    at_least("trainer.checkpoint_every", 0, " (0 writes only the final checkpoint)"),
    at_least("trainer.keep_checkpoints", 1),
    at_least("trainer.max_bad_steps", 1, " (consecutive non-finite steps tolerated before stopping)"),
    non_empty("trainer.run_dir", "must name a directory"),
    non_empty("trainer.resume", "must be auto, none or a checkpoint directory"),
    one_of("trainer.device"),
    # The former boolean (true/false, which OmegaConf turns into 'True'/'False' for this string key) is refused
    # rather than mapped: `true` could now mean full or selective, so the user picks.
    Rule("trainer.activation_checkpointing", lambda v: v in CHOICES["trainer.activation_checkpointing"],
         "is unknown; use none, full or selective (the former true is full, false is none)", quote=True),
)


def type_problems(cfg: TrainConfig) -> Iterator[tuple[str, str]]:
    """(key, problem) for values no key may take: strings with control characters, integers beyond 64 bits."""
    for key, _ in schema_fields():
        value = get_key(cfg, key)
        if isinstance(value, str) and not value.isprintable():
            yield key, f"{key}={value!r} contains a control character; remove it"
        elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            yield key, f"{key}={value} does not fit in 64 bits; use a smaller value"


def rule_problems(cfg: TrainConfig, skip: set[str]) -> Iterator[tuple[str, str]]:
    """(key, problem) for every value outside its rule's range (keys in `skip` already have a problem)."""
    for rule in RULES:
        if rule.key not in skip:
            problem = rule.problem(get_key(cfg, rule.key))
            if problem is not None:
                yield rule.key, problem


# ---------------------------------------------------------------------------------------------- cross-key checks
def _writable_dir(path: Path) -> bool:
    """Whether `path` is, or could be created as, a writable directory: probe its nearest existing ancestor by
    creating and removing a temporary directory there (os.access says yes to root even where writes fail)."""
    try:
        p = path.expanduser().absolute()
        while not p.exists():
            if p.parent == p:
                return False
            p = p.parent
        if not p.is_dir():
            return False
        os.rmdir(tempfile.mkdtemp(dir=p, prefix=".moetrain-probe-"))
    except (OSError, ValueError, RuntimeError):  # ValueError: a name the OS refuses; RuntimeError: `~user` unknown
        return False
    return True


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError, RuntimeError):
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _model_shape(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    m = cfg.model
    if m.attention == "mla":
        yield from _mla_shape(cfg)
        return
    for key in MLA_KEYS:
        if getattr(m, key):
            yield (f"model.{key}={getattr(m, key)} is only read with model.attention=mla; set model.attention=mla "
                   f"or model.{key}=0")
    if m.head_dim:
        if m.head_dim % 2:
            yield f"model.head_dim={m.head_dim} must be even for RoPE"
    elif m.dim % m.n_heads:
        yield (f"model.dim={m.dim} must be a positive multiple of model.n_heads={m.n_heads} (or set "
               f"model.head_dim)")
    elif (m.dim // m.n_heads) % 2:
        yield f"head dim model.dim/model.n_heads={m.dim}/{m.n_heads} must be even for RoPE"
    if m.n_heads % m.n_kv_heads:
        yield (f"model.n_heads={m.n_heads} must be divisible by model.n_kv_heads={m.n_kv_heads} "
               f"(grouped-query attention)")


def _mla_shape(cfg: TrainConfig) -> Iterator[str]:
    """Multi-head Latent Attention: a key/value latent, per-head rope and non-rope query/key dims, a value dim;
    the options of grouped-query attention do not apply."""
    m = cfg.model
    for key in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
        if getattr(m, key) < 1:
            yield (f"model.attention=mla needs model.{key} >= 1 (DeepSeek-V3: kv_lora_rank 512, qk_rope_head_dim 64, "
                   f"v_head_dim 128); set model.{key}")
    if m.qk_rope_head_dim % 2:
        yield f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even for RoPE"
    for key, default in (("head_dim", 0), ("qkv_bias", False), ("qk_norm", "none"), ("clip_qkv", None)):
        if getattr(m, key) != default:
            yield (f"model.{key}={show(getattr(m, key))} is an option of model.attention=gqa; drop it with "
                   f"model.attention=mla")


def _rope_scaling(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """yarn needs a factor > 1 and the original context length; its keys are refused without it."""
    m = cfg.model
    if m.rope_scaling == "yarn":
        if m.rope_factor <= 1:
            yield (f"model.rope_scaling=yarn needs model.rope_factor > 1 (the context extension factor), got "
                   f"{m.rope_factor}")
        if m.rope_original_max_seq_len < 1:
            yield ("model.rope_scaling=yarn needs model.rope_original_max_seq_len (the context length the model was "
                   "trained at, e.g. 4096)")
        return
    defaults = {"rope_factor": 1.0, "rope_original_max_seq_len": 0, "rope_beta_fast": 32.0, "rope_beta_slow": 1.0,
                "rope_mscale": 1.0, "rope_mscale_all_dim": 0.0}
    for key, default in defaults.items():
        if getattr(m, key) != default:
            yield (f"model.{key}={getattr(m, key)} is only read with model.rope_scaling=yarn; set "
                   f"model.rope_scaling=yarn or drop it")


def _shared_experts(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    m = cfg.model
    if m.num_shared_experts > 0 and m.num_experts > 0:
        return
    for key, value, default in (("shared_expert_hidden", m.shared_expert_hidden, 0),
                                ("shared_expert_gate", m.shared_expert_gate, False)):
        if value != default:
            yield (f"model.{key}={show(value)} needs shared experts (model.num_shared_experts >= 1 in an MoE "
                   f"model); set model.num_shared_experts or drop model.{key}")


def _router_method(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """The method's own keys are present (its preset was selected) and pass the method's checks."""
    cls = routers().get(cfg.router.method)
    if cls is None:
        yield (f"router.method='{show(cfg.router.method)}' is unknown; select a routing method with its preset, "
               f"router=NAME, NAME one of {', '.join(sorted(routers()))}")
    elif not isinstance(cfg.router, cls.config_cls):
        yield (f"router.method={cfg.router.method} needs the keys of its preset; select the method with "
               f"router={cfg.router.method} instead of setting router.method")
    elif cfg.model.num_experts > 0:
        yield from cls.check(cfg.router, cfg.model)
        r = cfg.router
        if not cls.group_limited and r.num_groups > 1:
            yield (f"router.num_groups={r.num_groups}: router={r.method} has no group-limited routing; set "
                   f"router.num_groups=1 (group-limited routing is part of router=default)")
        if not cls.group_limited and r.force_balanced:
            yield (f"router.force_balanced=true is a top-k benchmarking mode that router={r.method} does not have; "
                   f"drop router.force_balanced or use router=default")


def _router_shape(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """top_k and expert groups against the number of experts (a dense model only needs top_k >= 1)."""
    m, r = cfg.model, cfg.router
    if m.num_experts == 0:
        if r.top_k < 1:
            yield f"router.top_k={r.top_k} must be >= 1"
        return
    cls = routers().get(r.method)
    choices = cls.num_choices(r, m.num_experts) if cls is not None else m.num_experts
    if not 1 <= r.top_k <= choices:
        extra = "" if choices == m.num_experts else f" plus the {choices - m.num_experts} experts of router={r.method}"
        yield (f"router.top_k={r.top_k} must be between 1 and model.num_experts={m.num_experts}{extra}; "
               f"lower router.top_k or raise model.num_experts")
    if m.num_experts % r.num_groups:
        yield f"model.num_experts={m.num_experts} must be divisible by router.num_groups={r.num_groups}"
    elif r.topk_groups > r.num_groups:
        yield f"router.topk_groups={r.topk_groups} must be between 1 and router.num_groups={r.num_groups}"
    elif r.num_groups > 1 and r.top_k > r.topk_groups * (m.num_experts // r.num_groups):
        yield (f"router.top_k={r.top_k} exceeds the experts in router.topk_groups={r.topk_groups} groups of "
               f"{m.num_experts // r.num_groups}; raise router.topk_groups")
    elif r.group_score_topk and r.num_groups == 1:
        yield (f"router.group_score_topk={r.group_score_topk} is only read with group-limited routing "
               f"(router.num_groups > 1); drop it")
    elif r.group_score_topk > m.num_experts // r.num_groups:
        yield (f"router.group_score_topk={r.group_score_topk} exceeds the {m.num_experts // r.num_groups} experts "
               f"of a group; lower it")


def _router_nodes(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """group_by=ranks splits the ranks computing experts into router.num_groups nodes: it must divide them."""
    r, par = cfg.router, cfg.parallel
    if r.group_by != "ranks" or r.num_groups == 1 or cfg.model.num_experts == 0:
        return
    W = world_size if par.mode == "fssdp" else par.ep
    if W > 1 and W % r.num_groups:
        yield (f"router.group_by=ranks splits the {W} ranks computing experts into router.num_groups={r.num_groups} "
               f"nodes: router.num_groups must divide {W}; set it to the number of nodes, or use "
               f"router.group_by=experts")


def _router_capacity(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    if cfg.router.pad_to_capacity and cfg.router.capacity_factor is None:
        yield "router.pad_to_capacity=true needs a router.capacity_factor (padding is to the capacity)"


def _fssdp_layout(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    m, par = cfg.model, cfg.parallel
    if par.mode != "fssdp":
        return
    if m.num_experts == 0 or m.num_experts % world_size:
        yield (f"parallel.mode=fssdp shards whole experts over all {world_size} ranks: model.num_experts="
               f"{m.num_experts} must be a positive multiple of the world size")
    if par.ep not in (1, world_size):
        yield (f"parallel.ep={par.ep} has no meaning with parallel.mode=fssdp (experts are sharded over all "
               f"ranks); drop parallel.ep")


def _ep_layout(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    m, par = cfg.model, cfg.parallel
    if par.mode != "ep":
        return
    if world_size % par.ep:
        yield (f"world size {world_size} is not divisible by parallel.ep={par.ep}; launch a multiple of {par.ep} "
               f"processes or change parallel.ep")
    if m.num_experts % par.ep:
        yield (f"model.num_experts={m.num_experts} is not divisible by parallel.ep={par.ep}; "
               f"pick parallel.ep among the divisors of {m.num_experts}")
    elif par.ep > 1 and m.num_experts == 0:
        yield "parallel.ep > 1 needs MoE layers (model.num_experts > 0)"


def _hsdp_layout(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """parallel.dp_replicate > 1 (HSDP) shards FSDP2 within world/dp_replicate ranks and replicates across them."""
    par = cfg.parallel
    R = par.dp_replicate
    if R == 1:
        return
    if par.data_parallel != "fsdp":
        yield (f"parallel.dp_replicate={R} needs parallel.data_parallel=fsdp (HSDP replicates FSDP shards); set "
               f"parallel.data_parallel=fsdp or parallel.dp_replicate=1")
    elif world_size % R:
        yield (f"parallel.dp_replicate={R} must divide the world size {world_size}; launch a multiple of {R} "
               f"processes or pick parallel.dp_replicate among the divisors of {world_size}")
    elif par.mode == "ep" and world_size % par.ep == 0 and world_size // par.ep > 1 and (world_size // par.ep) % R:
        yield (f"parallel.dp_replicate={R} must divide the {world_size // par.ep} ranks holding the same experts "
               f"(world size {world_size} / parallel.ep={par.ep}), so an expert-parallel group stays inside one "
               f"replica group; use a parallel.dp_replicate dividing {world_size // par.ep} or change parallel.ep")


def _backend_device(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    if cfg.parallel.backend == "nccl" and cfg.trainer.device == "cpu":
        yield "parallel.backend=nccl needs CUDA but trainer.device=cpu; use parallel.backend=gloo (or auto)"
    if cfg.trainer.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            yield "trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu"


def _data_sizes(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    m, d = cfg.model, cfg.data
    if d.seq_len > m.max_seq_len:
        yield (f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower data.seq_len or raise "
               f"model.max_seq_len")
    per_step = d.micro_batch_size * world_size
    if d.global_batch_size % per_step:
        yield (f"data.global_batch_size={d.global_batch_size} must be a positive multiple of data.micro_batch_size="
               f"{d.micro_batch_size} x {world_size} ranks; e.g. data.global_batch_size="
               f"{per_step * max(1, d.global_batch_size // per_step)}")
    if d.name == "stdlib":
        n_val = int(d.max_corpus_bytes * d.val_fraction)
        if n_val < d.seq_len + 1 or d.max_corpus_bytes - n_val < d.seq_len + 2:
            yield (f"data.max_corpus_bytes={d.max_corpus_bytes} is too small for data.seq_len={d.seq_len} windows "
                   f"with data.val_fraction={d.val_fraction} (train and validation splits each need more than "
                   f"data.seq_len+1 tokens); raise data.max_corpus_bytes")


def _data_paths(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    d = cfg.data
    if d.name == "shards":
        if not d.path:
            yield "data.name=shards needs data.path=DIR; create DIR with `moetrain-prepare INPUT --out DIR`"
        elif not _is_file(Path(d.path) / "meta.json"):
            yield (f"data.path={show(d.path)} is not a shard directory (no meta.json); create it with "
                   f"`moetrain-prepare INPUT --out {show(d.path)}`")
        else:
            tokenizer = _tokenizer(d.tokenizer)
            if tokenizer is not None:  # else _tokenizer_vocab says why it cannot be loaded
                yield from _shard_problems(Path(d.path), tokenizer)
        return
    if d.path is not None:
        yield f"data.path={show(d.path)} is only read with data.name=shards; add data=shards or drop data.path"
    if d.cache_dir is not None and not _writable_dir(Path(d.cache_dir)):
        yield (f"data.cache_dir={show(d.cache_dir)} cannot be written (permission denied or not a directory); "
               f"choose another data.cache_dir")


def _shard_problems(path: Path, tokenizer) -> Iterator[str]:
    """What load_shards would refuse (malformed meta.json, missing or truncated .bin files, shards made with another
    tokenizer), found before launch."""
    from moetrain.data import DataError
    from moetrain.data.shards import load_shards

    try:
        load_shards(path, tokenizer)
    except DataError as e:
        yield f"data.path={show(path)}: {e}"


def _tokenizer(spec: str):
    """The tokenizer data.tokenizer names, or None when it cannot be loaded."""
    from moetrain.data import DataError
    from moetrain.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec)
    except DataError:
        return None


def _tokenizer_vocab(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """The tokenizer loads and its ids fit the model's embedding (model.vocab_size may be larger: padded)."""
    from moetrain.data import DataError
    from moetrain.data.tokenizer import load_tokenizer

    spec, vocab = cfg.data.tokenizer, cfg.model.vocab_size
    try:
        tokenizer = load_tokenizer(spec)
    except DataError as e:
        yield str(e)
        return
    if tokenizer.vocab_size > vocab:
        yield (f"model.vocab_size={vocab} is smaller than the vocabulary of data.tokenizer={show(spec)} "
               f"({tokenizer.vocab_size} ids); set model.vocab_size={tokenizer.vocab_size} or more")


def _logger_packages(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    lc = cfg.logger
    if lc.wandb and lc.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        yield WANDB_MISSING
    if lc.tensorboard and importlib.util.find_spec("tensorboard") is None:
        yield TENSORBOARD_MISSING


def _run_dir(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    run_dir = cfg.trainer.run_dir
    if not _writable_dir(Path(run_dir)):
        yield (f"trainer.run_dir={show(run_dir)} cannot be written (permission denied or not a directory); "
               f"choose another trainer.run_dir")

def _experts_per_layer(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    """model.experts_per_layer: one count per MoE layer, each passing what model.num_experts must pass (top_k,
    expert groups, the expert-parallel split); model.num_experts is their largest."""
    from moetrain.model.transformer import moe_layer_ids

    m, r, par = cfg.model, cfg.router, cfg.parallel
    counts = m.experts_per_layer
    if counts is None:
        return
    ids = moe_layer_ids(m)
    if len(counts) != len(ids):
        yield (f"model.experts_per_layer has {len(counts)} entries but the model has {len(ids)} MoE layers "
               f"(layers {ids}); give one expert count per MoE layer or null")
        return
    if any(E < 1 for E in counts):
        yield f"model.experts_per_layer={counts} must hold positive expert counts"
        return
    if m.num_experts != max(counts):
        yield (f"model.num_experts={m.num_experts} must be the largest of model.experts_per_layer={counts}; set "
               f"model.num_experts={max(counts)}")
    cls = routers().get(r.method)
    few = [E for E in counts if r.top_k > (cls.num_choices(r, E) if cls is not None else E)]
    if few:
        yield (f"router.top_k={r.top_k} exceeds the {min(few)} experts of a layer in model.experts_per_layer="
               f"{counts}; lower router.top_k")
    if any(E % r.num_groups for E in counts):
        yield f"every entry of model.experts_per_layer={counts} must be divisible by router.num_groups={r.num_groups}"
    split = world_size if par.mode == "fssdp" else par.ep
    if split > 1 and any(E % split for E in counts):
        common = math.gcd(*counts)
        what = f"parallel.ep={par.ep}" if par.mode == "ep" else f"the world size {world_size} (parallel.mode=fssdp)"
        yield (f"model.experts_per_layer={counts}: every MoE layer's experts must split evenly over {what}; "
               f"use a divisor of {common} ranks for the experts")


def _resume(cfg: TrainConfig, world_size: int) -> Iterator[str]:
    resume = cfg.trainer.resume
    if resume not in ("auto", "none") and not _is_file(Path(resume) / "COMPLETE"):
        yield (f"trainer.resume={show(resume)} is not a complete checkpoint directory; use trainer.resume=auto or "
               f"a path like RUN_DIR/checkpoints/step_00000100")


# Each cross check with the keys it reads: it runs only when all of them passed their own checks, so one bad value
# gives one message.
CROSS_CHECKS: tuple[tuple[Callable[[TrainConfig, int], Iterator[str]], tuple[str, ...]], ...] = (
    (_model_shape, ("model.dim", "model.n_heads", "model.n_kv_heads", "model.head_dim", "model.attention",
                    "model.qk_norm", "model.clip_qkv") + tuple(f"model.{k}" for k in MLA_KEYS)),
    (_rope_scaling, ("model.rope_scaling", "model.rope_factor", "model.rope_original_max_seq_len",
                     "model.rope_beta_fast", "model.rope_beta_slow", "model.rope_mscale", "model.rope_mscale_all_dim")),
    (_shared_experts, ("model.num_experts", "model.num_shared_experts", "model.shared_expert_hidden")),
    (_router_method, ("router.method",)),
    (_router_shape, ("model.num_experts", "router.method", "router.top_k", "router.num_groups", "router.topk_groups",
                     "router.group_score_topk")),
    (_router_nodes, ("router.group_by", "router.num_groups", "parallel.mode", "parallel.ep", "model.num_experts")),
    (_router_capacity, ("router.capacity_factor", "router.pad_to_capacity")),
    (_fssdp_layout, ("model.num_experts", "parallel.mode", "parallel.ep", "parallel.data_parallel")),
    (_ep_layout, ("model.num_experts", "parallel.mode", "parallel.ep", "parallel.data_parallel")),
    (_experts_per_layer, ("model.experts_per_layer", "model.num_experts", "model.n_layers", "model.first_k_dense",
                          "model.moe_every", "router.method", "router.top_k", "router.num_groups", "parallel.mode",
                          "parallel.ep")),
    (_hsdp_layout, ("parallel.mode", "parallel.ep", "parallel.data_parallel", "parallel.dp_replicate")),
    (_backend_device, ("parallel.backend", "trainer.device")),
    (_data_sizes, ("model.max_seq_len", "data.name", "data.seq_len", "data.global_batch_size",
                   "data.micro_batch_size", "data.val_fraction", "data.max_corpus_bytes")),
    (_data_paths, ("data.name", "data.path", "data.cache_dir", "data.tokenizer")),
    (_tokenizer_vocab, ("data.tokenizer", "model.vocab_size")),
    (_logger_packages, ("logger.wandb", "logger.wandb_mode", "logger.tensorboard")),
    (_run_dir, ("trainer.run_dir",)),
    (_resume, ("trainer.resume",)),
)


def check(cfg: TrainConfig, world_size: int) -> list[str]:
    """Every problem of `cfg` for a launch of `world_size` processes, one line each (empty: the config is valid)."""
    errors: list[str] = []
    bad: set[str] = set()
    for key, problem in type_problems(cfg):
        errors.append(problem)
        bad.add(key)
    for key, problem in rule_problems(cfg, skip=bad):
        errors.append(problem)
        bad.add(key)
    for cross_check, keys in CROSS_CHECKS:
        if bad.isdisjoint(keys):
            errors.extend(cross_check(cfg, world_size))
    return errors


def validate(cfg: TrainConfig, world_size: int) -> None:
    """Raise a ConfigError listing every problem of `cfg` (one line when there is one, else one line each)."""
    errors = check(cfg, world_size)
    if errors:
        raise ConfigError("; ".join(errors) if len(errors) == 1 else
                          f"{len(errors)} config problems:\n  - " + "\n  - ".join(errors))
