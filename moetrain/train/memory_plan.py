"""Memory planning: the bytes one rank holds for a config at a world size, without starting any process.

`plan_memory(cfg, world_size)` validates the layout for that world size (moetrain.config.validate), builds the model
on the meta device (nothing is allocated) and reads every shape from it: parameters are classified by their
`expert_ids` attribute (expert) or its absence (dense), attention / FFN / router sizes come from the modules' weights,
the routed experts per token from the routing method (`experts_per_token`). `moetrain-train trainer.dry_run=true`
prints the result (`format_plan`); docs/memory.md explains the rows and lists the presets.

Legend: W world size, ep expert-parallel size (mode=ep; the expert-data-parallel size is W/ep), dpr
parallel.dp_replicate (HSDP replicas), B micro-batch, S sequence length, T = B*S tokens per rank and micro-batch,
D model dim, H query heads, Dq = H * head dim, Dkv = n_kv_heads * head dim, Fd dense FFN hidden, F expert hidden,
Fs the shared experts' hidden size (default F * shared experts), X router choices (E plus virtual experts), E routed
experts per MoE layer, K routed experts per token (the method's `experts_per_token`; top_k for top-k routing), L layers
(Lm of them MoE), V vocabulary, X_e = 3*D*F elements of one expert, b bytes of the compute dtype (4 fp32, 2 bf16;
parameters, gradients and optimizer state stay fp32).

Experts per rank and layer, E_loc:  mode=ep: E/ep;  mode=fssdp: E/W (one owner each).
Parameters (fp32 master weights), per rank, 4 bytes per element of the local tensors:
    ddp:   every dense parameter whole;  expert parameters E_loc of E rows
    fsdp (W > 1; FSDP2 shards dim 0, padded to a multiple of the shard group):
           dense parameter p  -> ceil(p.shape[0] / N_d) * (elements of one row), N_d = W/dpr
           expert parameter   -> ceil(E_loc / N_e) * (elements of one expert's weight), N_e = W/(ep*dpr) over the
                                 expert-data-parallel ranks; N_e = 1 (FSDP leaves the experts alone) when that
                                 group has one rank (ep = W) and under mode=fssdp
Gradients: the same elements, fp32 (4 B).  Optimizer (AdamW): 2 fp32 moments of the same elements (8 B; step counts
and other scalars not counted).
Activations, bytes saved for backward by one micro-batch (gradient accumulation keeps one at a time); the 4*(...)
terms stay fp32 under bf16 (residual stream, norm statistics, router scores, logits), the b*(...) terms do not:
    attention part of a block:  4*(2*T*D + B*H*S) + b*(T*D + 3*T*Dq + 2*T*Dkv)
        (norm input and normalised input, softmax log-sum-exp; norm output, q, attention output, wo input, k, v)
        + 4*2*T*(Dq + Dkv) with model.qk_norm (the norms' fp32 input and normalised q, k)
        + b*T*(Dq + 2*Dkv) with model.clip_qkv (the unclipped q, k, v)
      mla (Qr q_lora_rank, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, Dv v_head_dim):
                                4*(2*T*D + B*H*S) + 4*T*(2*Qr + C) + b*T*(D + Qr + 2*C + R + H*(N + Dv)
                                + 2*H*(N + R) + 2*H*Dv)
        (as above; the q latent's norm input, normalised value and output; the kv latent with its rope key, its
        normalised value and norm output; c Wkv_b (keys and values); q and k; attention output, wo input)
    dense FFN:                  4*2*T*D + b*(T*D + 4*T*Fd)          (norm; its output, h1, silu(h1), h3, product)
    MoE FFN, dense part:        4*(2*T*D + 2*T*X) + b*(T*D + 4*T*Fs) (norm, router scores, shared experts)
             expert part:       b*(2*R*D + 2*R*F)  (received rows, h1 and h3 of the fused grouped SwiGLU, returned rows)
    head:                       4*(2*T*D + 2*T*V) + b*T*D           (final norm; logits and their log-softmax)
  with R = T*K routed rows per rank (balanced routing; capacity_factor c: E*ceil(T*K*c/E) with padding, else at most
  that). trainer.activation_checkpointing:
    full:       4*L*T*D (the blocks' inputs) + the largest block's activations (recomputed in backward) + head
    selective:  per MoE block 4*T*D (its input) + the MoE FFN's dense part + b*2*R*D (received and returned rows);
                per dense block 4*2*T*D (its input and the attention sub-block's output); + head + the largest
                piece recomputed in backward: an attention part, a dense FFN or the experts' b*2*R*F (h1, h3)
All-to-all buffers (only when experts are spread over more than one rank): the send and the receive buffer of one
MoE layer's dispatch or combine, b*2*R*D (all pipeline chunks are in flight at once: the same total).
Weight copies, held during compute (beside the fp32 parameters):
    bf16, parameters FSDP does not shard (ddp: all; fsdp: the experts it leaves alone):
                        2*(dense ones, ddp only) + 2*Lm*M*X_e - the bf16 casts autocast keeps for backward, and the
                        grouped GEMM's casts of the M experts a rank computes per layer (ep: E_loc; fssdp: E/W +
                        parallel.fssdp.budget)
    fssdp with a budget, W > 1:  4*M*X_e per MoE layer for the gathered replicas (Lm layers, or 1 with
                        rematerialize) + 4*M*X_e for one layer's gathered gradient before its reduce-scatter
    fsdp, W > 1:        2b*root + (2b + 4)*block: the root's unsharded parameters and gradients (embedding, final
                        norm, output: FSDP2 keeps the root unsharded from forward to the end of backward, and its
                        gradients are reduced last), and for the largest block its unsharded parameters, its
                        unsharded gradients and the fp32 reduce-scatter input they are copied into (the block's
                        experts count when FSDP shards them: E_loc of them)
Not counted: allocator caching and fragmentation, the CUDA context, NCCL/gloo internal buffers, the temporary buffers
of backward (activation gradients: the largest is the logits' gradient, 4*T*V bytes), gradient-sync buckets, FSDP
prefetch of the next block, routing index tensors and buffers (router bias, FSSDP load window).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch

from moetrain.config.schema import TrainConfig

GIB = 2**30
FP32 = 4


@dataclass
class Split:
    """Bytes of one row of the plan, dense vs expert."""

    dense: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: "Split") -> "Split":
        return Split(self.dense + other.dense, self.expert + other.expert)


@dataclass
class MemoryPlan:
    """Per-rank bytes for one config at one world size (formulas: module docstring)."""

    world_size: int
    layout: str  # e.g. "mode=ep ep=64 (expert-data-parallel 4), dense fsdp over 256 ranks, experts fsdp over 4"
    precision: str  # fp32 | bf16 (the resolved parallel.mixed_precision)
    micro_batch: int  # B
    seq_len: int  # S
    activation_checkpointing: str  # none | full | selective
    param_elements: Split  # local parameter elements per rank (not bytes)
    parameters: Split
    gradients: Split
    optimizer: Split
    activations: Split
    all_to_all: Split
    weight_copies: Split
    notes: list[str] = field(default_factory=list)
    recomputed: Split = field(default_factory=Split)  # of `activations`, what backward's recomputation holds

    ROWS = (("parameters", "parameters (fp32)"), ("gradients", "gradients (fp32)"),
            ("optimizer", "optimizer (AdamW)"), ("activations", "activations"), ("all_to_all", "all-to-all"),
            ("weight_copies", "weight copies"))

    def rows(self) -> Iterator[tuple[str, Split]]:
        for name, label in self.ROWS:
            yield label, getattr(self, name)

    @property
    def total(self) -> Split:
        out = Split()
        for _, s in self.rows():
            out = out + s
        return out


# ----------------------------------------------------------------------------------------------------- layout
def planned_precision(cfg: TrainConfig) -> str:
    """fp32 | bf16: parallel.mixed_precision as the launch resolves it (moetrain/train/precision.py: auto is bf16 on
    CUDA), on the device trainer.device would pick (auto: CUDA when this machine has a GPU)."""
    from moetrain.train.precision import resolve_precision

    device = cfg.trainer.device
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dtype = resolve_precision(cfg, torch.device("cuda" if on_cuda else "cpu"))
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _as_launched(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, list[str]]:
    """The config the validator sees: data.global_batch_size only sets gradient accumulation, which per-rank memory
    does not depend on, so a batch that does not divide over `world_size` ranks is a note, not an error."""
    d = cfg.data
    per_step = d.micro_batch_size * world_size
    if d.micro_batch_size < 1 or d.global_batch_size < 1 or d.global_batch_size % per_step == 0:
        return cfg, []
    fixed = per_step * max(1, d.global_batch_size // per_step)
    note = (f"data.global_batch_size={d.global_batch_size} is not a multiple of data.micro_batch_size="
            f"{d.micro_batch_size} x {world_size} ranks: a launch needs e.g. data.global_batch_size={fixed} "
            f"(per-rank memory does not depend on it)")
    return dataclasses.replace(cfg, data=dataclasses.replace(d, global_batch_size=fixed)), [note]


def _check_layout(cfg: TrainConfig, world_size: int) -> list[str]:
    """Validate `cfg` for `world_size` ranks with the config validator (a ConfigError, one line per problem);
    returns the notes to print."""
    from moetrain.config.validate import ConfigError, validate

    if world_size < 1:
        raise ConfigError(f"world size {world_size} must be >= 1; set trainer.dry_run_world_size=N")
    checked, notes = _as_launched(cfg, world_size)
    validate(checked, world_size)
    return notes


# ---------------------------------------------------------------------------------------------------- planning
def _meta_model(cfg: TrainConfig):
    from moetrain.model.transformer import TransformerLM

    with torch.device("meta"):
        return TransformerLM(cfg.model, cfg.router)


def _total(s: Split) -> int:
    return s.total


def _is_expert(p: torch.Tensor) -> bool:
    return getattr(p, "expert_ids", None) is not None


def _local_elements(p: torch.Tensor, experts_local: int, shard_dense: int, shard_expert: int) -> int:
    """Elements of parameter `p` (a meta parameter holding all E experts, for expert parameters) on one rank."""
    rest = math.prod(p.shape[1:])
    if _is_expert(p):
        return math.ceil(experts_local / shard_expert) * rest
    return math.ceil(p.shape[0] / shard_dense) * rest


def plan_memory(cfg: TrainConfig, world_size: int) -> MemoryPlan:
    """Per-rank memory of training `cfg` on `world_size` ranks (see the module docstring for every formula).
    Raises ConfigError (one line per problem) when the layout does not fit the world size."""
    from moetrain.model.transformer import layer_num_experts, moe_layer_ids
    from moetrain.moe.layer import MoELayer
    from moetrain.moe.routers import router_class

    notes = _check_layout(cfg, world_size)
    m, r, par, tc = cfg.model, cfg.router, cfg.parallel, cfg.trainer
    W, E = world_size, m.num_experts
    precision = planned_precision(cfg)
    b = 2 if precision == "bf16" else FP32
    fssdp = par.mode == "fssdp"
    ep = W if fssdp else par.ep  # the ranks experts are spread over
    E_loc = E // ep if E else 0  # experts each rank holds per MoE layer (the largest layer's, experts_per_layer)
    E_locs = [layer_num_experts(m, i) // ep for i in moe_layer_ids(m)]  # ... and each MoE layer's
    fsdp = par.data_parallel == "fsdp" and W > 1  # the trainer applies FSDP only to a distributed run
    dpr = par.dp_replicate if fsdp else 1
    edp = 1 if fssdp else W // ep  # ranks holding the same experts
    fsdp_experts = fsdp and edp > 1  # FSDP shards the experts too (over their expert-data-parallel ranks)
    N_d = W // dpr if fsdp else 1
    N_e = max(1, edp // dpr) if fsdp_experts else 1

    if fsdp_experts and E_loc % N_e:
        notes.append(f"FSDP shards expert weights by whole experts (dim 0): {E_loc} per layer over {N_e} ranks "
                     f"leave {math.ceil(E_loc / N_e)} on every rank, padding included")

    model = _meta_model(cfg)
    blocks = list(model.layers)

    def local(p) -> int:
        return _local_elements(p, p.shape[0] // ep if _is_expert(p) else 0, N_d, N_e)

    # ---- parameters, gradients, optimizer: the local tensors of every parameter
    elems = Split()
    for p in model.parameters():
        if _is_expert(p):
            elems.expert += local(p)
        else:
            elems.dense += local(p)
    parameters = Split(FP32 * elems.dense, FP32 * elems.expert)
    gradients = Split(FP32 * elems.dense, FP32 * elems.expert)
    optimizer = Split(2 * FP32 * elems.dense, 2 * FP32 * elems.expert)

    # ---- activations of one micro-batch
    B, S, V, D = cfg.data.micro_batch_size, cfg.data.seq_len, m.vocab_size, m.dim
    T = B * S

    def routed_rows(E: int) -> int:
        """R, the routed rows of a layer of E experts."""
        K = router_class(r).experts_per_token(r, E) if E else 0.0
        rows = T * K
        if E and r.capacity_factor is not None:
            padded = E * math.ceil(T * K * r.capacity_factor / E)
            rows = padded if r.pad_to_capacity else min(rows, padded)
        return int(math.ceil(rows))

    def block_parts(block) -> tuple[Split, Split, Split, Split]:
        """(attention part, FFN part, kept under selective, largest piece recomputed under selective)."""
        attention = Split(attention_activation_bytes(block.attn, B, S, D, b), 0)
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            X = ffn.router.gate.weight.shape[0]
            Fs = ffn.shared_experts.w1.weight.shape[0] if ffn.shared_experts is not None else 0
            F, R = ffn.experts.w1_EDF.shape[-1], routed_rows(ffn.num_experts)
            kept = Split(FP32 * (2 * T * D + 2 * T * X) + b * (T * D + 4 * T * Fs), b * 2 * R * D)
            experts = Split(0, b * 2 * R * F)
            return attention, kept + experts, Split(FP32 * T * D, 0) + kept, max(attention, experts, key=_total)
        Fd = ffn.w1.weight.shape[0]
        dense_ffn = Split(FP32 * 2 * T * D + b * (T * D + 4 * T * Fd), 0)
        return attention, dense_ffn, Split(FP32 * 2 * T * D, 0), max(attention, dense_ffn, key=_total)

    parts = [block_parts(blk) for blk in blocks]
    head = Split(FP32 * (2 * T * D + 2 * T * V) + b * T * D, 0)
    activations, recomputed = head, Split()
    if tc.activation_checkpointing == "full":
        recomputed = max((attention + ffn for attention, ffn, _, _ in parts), key=_total)
        activations = activations + Split(FP32 * len(blocks) * T * D, 0) + recomputed
    elif tc.activation_checkpointing == "selective":
        for _, _, kept, _ in parts:
            activations = activations + kept
        recomputed = max((piece for _, _, _, piece in parts), key=_total)
        activations = activations + recomputed
    else:
        for attention, ffn, _, _ in parts:
            activations = activations + attention + ffn

    # ---- all-to-all buffers: one layer's send + receive
    n_moe = len(E_locs)
    all_to_all = Split(0, b * 2 * routed_rows(E) * D if n_moe and ep > 1 else 0)

    # ---- weight copies held during compute
    X_e = 3 * D * m.moe_hidden  # elements of one expert (w1, w3, w2)
    copies = Split()
    extra = par.fssdp.budget if fssdp and W > 1 else 0
    M = E_loc + extra  # experts a rank computes per layer (the largest layer)
    if b != FP32:  # bf16 casts of what FSDP does not gather in bf16 itself
        computed = sum(E_locs) + n_moe * extra  # experts a rank computes, over all MoE layers
        copies = copies + Split(0 if fsdp else b * elems.dense, 0 if fsdp_experts else b * computed * X_e)
    if fssdp and W > 1 and par.fssdp.budget > 0 and n_moe:
        kept = 1 if par.fssdp.rematerialize else n_moe
        copies = copies + Split(0, FP32 * (kept + 1) * M * X_e)
    if fsdp:
        def unsharded(params) -> Split:
            s = Split()
            for p in params:
                if not _is_expert(p):
                    s.dense += p.numel()
                elif fsdp_experts:
                    s.expert += p.shape[0] // ep * math.prod(p.shape[1:])
            return s

        block_ids = {id(p) for blk in blocks for p in blk.parameters()}
        root = unsharded(p for p in model.parameters() if id(p) not in block_ids)
        block = max((unsharded(blk.parameters()) for blk in blocks), key=lambda s: s.total)
        copies = copies + Split(2 * b * root.dense + (2 * b + FP32) * block.dense, (2 * b + FP32) * block.expert)

    ep_text = (f"mode=fssdp (experts over all {W} ranks, budget {par.fssdp.budget})" if fssdp
               else f"mode=ep ep={par.ep} (expert-data-parallel {W // par.ep})")
    if fsdp:
        dense_text = f"dense fsdp over {N_d}" + (f" ranks x {dpr} replicas" if dpr > 1 else " ranks")
        dense_text += f", experts fsdp over {N_e}" if fsdp_experts else ", experts not sharded by fsdp"
    else:
        dense_text = "dense ddp (replicated)"
    return MemoryPlan(W, f"{ep_text}, {dense_text}", precision, B, S, tc.activation_checkpointing, elems,
                      parameters, gradients, optimizer, activations, all_to_all, copies, notes, recomputed)


def attention_activation_bytes(attn, B: int, S: int, D: int, b: int) -> int:
    """Bytes the attention part of a block saves for backward (module docstring), from the module's weights."""
    from moetrain.model.mla import MLAttention

    T, H = B * S, attn.n_heads
    common = FP32 * (2 * T * D + B * H * S)
    if isinstance(attn, MLAttention):
        N, R, Dv, C, Qr = attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_rank, attn.q_rank
        return common + FP32 * T * (2 * Qr + C) + b * T * (D + Qr + 2 * C + R + H * (N + Dv) + 2 * H * (N + R)
                                                            + 2 * H * Dv)
    Dq, Dkv = attn.wq.weight.shape[0], attn.wk.weight.shape[0]
    out = common + b * (T * D + 3 * T * Dq + 2 * T * Dkv)
    if attn.qk_norm != "none":
        out += FP32 * 2 * T * (Dq + Dkv)
    if attn.clip_qkv is not None:
        out += b * T * (Dq + 2 * Dkv)
    return out


# ----------------------------------------------------------------------------------------------------- printing
def format_plan(plan: MemoryPlan) -> str:
    """The compact GiB table the dry run prints."""
    def gib(n: int) -> str:
        return f"{n / GIB:>10.3f}"

    lines = [f"memory per rank (GiB) at world size {plan.world_size}: {plan.layout}",
             f"  {plan.precision}, micro-batch {plan.micro_batch} x {plan.seq_len} tokens, "
             f"activation checkpointing {plan.activation_checkpointing}",
             f"  {'':<20}{'dense':>10}{'expert':>10}{'total':>10}"]
    for label, s in plan.rows():
        lines.append(f"  {label:<20}{gib(s.dense)}{gib(s.expert)}{gib(s.total)}")
    t = plan.total
    lines.append(f"  {'total per rank':<20}{gib(t.dense)}{gib(t.expert)}{gib(t.total)}")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
