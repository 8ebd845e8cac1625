"""Structured config schemas, registered in Hydra's ConfigStore.

`configs/train.yaml` starts its defaults list with the `train_schema` node stored here, so every group file and every
command-line override is merged into these dataclasses: an unknown key or a value of the wrong type fails when the
config is composed, before anything else runs. Semantic checks (top_k <= num_experts, divisibility, paths) live in
`moetrain.config.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConfig:
    name: str = "tiny"  # the preset's name (runs go to runs/<name> by default)
    vocab_size: int = 256  # token ids are in [0, vocab_size): at least the tokenizer's vocabulary (256 for bytes)
    dim: int = 128  # D, the model (residual stream) width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int = 2  # key/value heads (grouped-query attention); divides n_heads
    max_seq_len: int = 1024  # the longest sequence the model accepts (training and generation); >= data.seq_len
    rope_theta: float = 10000.0  # the RoPE base
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    ffn_hidden: int = 512  # hidden size of the dense SwiGLU FFN layers
    num_experts: int = 8  # E, routed experts per MoE layer
    experts_per_layer: Optional[list[int]] = None  # routed experts of each MoE layer in order (layers may differ,
                                                   # e.g. after moetrain-compress); null: num_experts in every one
    moe_hidden: int = 256  # F, hidden size of one routed expert
    num_shared_experts: int = 0  # shared experts, each of hidden size moe_hidden, fused into one SwiGLU
    first_k_dense: int = 1  # the first k layers use the dense FFN
    moe_every: int = 1  # after those, every n-th layer is MoE (the others dense)
    tie_embeddings: bool = False  # the output projection shares the token embedding matrix
    init_std: float = 0.02  # std of the normal initial weights
    # attention (moetrain/model/attention.py, moetrain/model/mla.py; docs/architecture.md)
    head_dim: int = 0  # per-head dim of q/k/v; 0: dim // n_heads (Qwen3 sets it explicitly)
    attention: str = "gqa"  # gqa | mla (Multi-head Latent Attention, DeepSeek-V2/V3)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2-MoE)
    qk_norm: str = "none"  # none | head (RMSNorm over each head's Dh, Qwen3-MoE) |
                           # full (RMSNorm over the whole q and the whole k projection, OLMoE)
    clip_qkv: Optional[float] = None  # clamp the q, k, v projections to [-c, c] (OLMoE)
    q_lora_rank: int = 0  # mla: rank of the query compression; 0: queries projected directly
    kv_lora_rank: int = 0  # mla: rank of the joint key/value compression
    qk_nope_head_dim: int = 0  # mla: per-head query/key dims without rope
    qk_rope_head_dim: int = 0  # mla: per-head query/key dims with rope (one shared rope key per token)
    v_head_dim: int = 0  # mla: per-head value dim
    # rope scaling (moetrain/model/rope.py)
    rope_scaling: str = "none"  # none | yarn
    rope_factor: float = 1.0  # yarn: context extension factor
    rope_original_max_seq_len: int = 0  # yarn: the context length the model was trained at (HF's
                                        # original_max_position_embeddings)
    rope_beta_fast: float = 32.0  # yarn: rotations below which a frequency is interpolated fully ...
    rope_beta_slow: float = 1.0  # ... and above which it is kept (extrapolated)
    rope_mscale: float = 1.0  # yarn: DeepSeek's mscale
    rope_mscale_all_dim: float = 0.0  # yarn: DeepSeek's mscale_all_dim (mla: also scales the softmax)
    # shared experts (moetrain/moe/layer.py)
    shared_expert_hidden: int = 0  # total hidden size of the fused shared experts; 0: num_shared_experts * moe_hidden
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output scaled by sigmoid(x @ w_g), w_g of shape (1, D)


@dataclass
class RouterConfig:
    """The keys every routing method shares; a method adds its own in a subclass (moetrain/moe/routers/<method>.py),
    selected with its preset (`router=<method>`), whose defaults list names the subclass (`schema_<method>`)."""

    method: str = "topk"  # the routing method (set by the preset; see moetrain/moe/routers)
    top_k: int = 2  # K, experts per token (for expert choice: on average)
    score_func: str = "softmax"  # softmax | sigmoid
    norm_topk_prob: bool = True  # renormalise the k selected gates to sum to one
    route_scale: float = 1.0  # gates are multiplied by this after (optional) renormalisation
    num_groups: int = 1  # group-limited routing: experts split in this many groups ...
    topk_groups: int = 1  # ... and a token may only use experts of this many groups
    group_score_topk: int = 0  # a group's score is the sum of its top-m biased scores; 0: m = max(1, top_k //
                               # topk_groups); DeepSeek-V3 uses m = 2
    group_by: str = "experts"  # experts: groups are equal expert-id ranges | ranks: num_groups blocks of the ranks
                               # computing the experts now (node-limited routing; docs/routers/deepseek_moe.md)
    bias_update_rate: float = 5e-2  # aux-loss-free balancing: the bias step u (see the rule); 0 turns it off
    bias_update_rule: str = "proportional"  # b += u * (mean(c) - c) / mean(c) | sign: b += u * sign(mean(c) - c)
                                            # (DeepSeek-V3's rule, with its u = 1e-3); docs/load_balancing.md
    bias_update_center: bool = False  # subtract the mean of the update
    bias_update_stop_frac: float = 1.0  # the rate falls to zero after this fraction of trainer.max_steps
    aux_loss_coeff: float = 0.0  # Switch/GShard: coeff * E * sum_i f_i * P_i
    seq_aux_loss_coeff: float = 0.0  # DeepSeek sequence-wise auxiliary loss
    z_loss_coeff: float = 0.0  # coeff * mean(logsumexp(logits)^2)
    capacity_factor: Optional[float] = None  # None: dropless; else capacity = ceil(T*K/E * factor)
    pad_to_capacity: bool = False  # capacity mode only: pad every expert's input to exactly its capacity
    force_balanced: bool = False  # benchmarking: every expert gets the same number of tokens


@dataclass
class FSSDPConfig:
    budget: int = 1  # extra (non-owned) experts a rank may materialize per layer and step
    window: int = 8  # steps of past expert load averaged to predict the next step's
    calibrate: bool = False  # blend the prediction with the current step's routing (one small all-reduce per layer)
    reshard_every: int = 0  # re-choose owners by predicted load every N steps, moving weights and optimizer state
    rematerialize: bool = False  # free replicas after forward and gather them again in backward
    flops_per_byte: float = 80.0  # machine balance for the placement's cost model: expert-GEMM FLOPs that take as
    #                               long as moving one byte of a replica (spAG + spRS); a replica is placed only
    #                               when the rows it saves on the busiest rank outweigh its copy. 0: copies are free
    #                               (80: measured on 2 CPU cores, gloo loopback; elsewhere:
    #                               the expert GEMM's FLOP/s over the expert all-to-all's bytes/s)
    fallback: bool = True  # shrink the replica budget towards 0 (expert parallelism's placement) after steps whose
    #                        placement would have been slower than owners only on the realised load; grow it back


@dataclass
class ParallelConfig:
    mode: str = "ep"  # ep | fssdp
    ep: int = 1  # expert-parallel size (mode=ep); the data-parallel size is world_size / ep
    data_parallel: str = "ddp"  # ddp | fsdp: how dense parameters are kept across ranks
    dp_replicate: int = 1  # fsdp only: HSDP, shard within groups of world/dp_replicate ranks, replicate across them
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (fp32 master weights and
    #                                optimizer state, bf16 compute, fp32 gradient reduction)
    pipeline_degree: str = "1"  # auto | 1 | 2 | 4 | 8 (chunks for comm/compute overlap)
    pipeline_split: str = "experts"  # experts | tokens: a chunk is a range of a rank's experts, or of its tokens
    backend: str = "auto"  # auto (nccl on cuda, gloo on cpu) | gloo | nccl
    timeout_s: float = 180.0  # a collective waiting longer than this ends the job, naming the rank that stopped
    fssdp: FSSDPConfig = field(default_factory=FSSDPConfig)  # mode=fssdp: experts sharded over all ranks


@dataclass
class OptimConfig:
    name: str = "adamw"  # the optimizer
    lr: float = 3e-3  # the peak learning rate, reached after warmup_steps
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up: lr * (step + 1) / warmup_steps for the first steps
    schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.1  # AdamW's decoupled decay, on matrices except the token embedding
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    impl: str = "auto"  # auto | fused | foreach | apex


@dataclass
class DataConfig:
    name: str = "stdlib"  # stdlib (embedded default corpus) | shards (prepared by moetrain-prepare)
    path: Optional[str] = None  # shard directory for name=shards
    cache_dir: Optional[str] = None  # where the embedded corpus is cached; default ~/.cache/moetrain
    tokenizer: str = "bytes"  # bytes | PATH to a tokenizer.json or a Hugging Face tokenizer directory (hf extra)
    seq_len: int = 128  # S, tokens per training sequence
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward on one rank
    val_fraction: float = 0.05  # the fraction of the corpus held out for validation
    max_corpus_bytes: int = 8_000_000  # cap on the embedded corpus size


@dataclass
class LoggerConfig:
    console: bool = True  # one line per logged step on stdout (rank 0)
    jsonl: bool = True  # RUN_DIR/metrics.jsonl, one JSON object per logged step
    tensorboard: bool = False  # RUN_DIR/tensorboard/ (needs tensorboard)
    wandb: bool = False  # Weights & Biases, files under RUN_DIR/wandb/ (needs wandb)
    wandb_project: str = "moetrain"  # the wandb project the run is logged to
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_run_name: Optional[str] = None  # null: wandb picks a name
    heatmap_every: int = 100  # wandb: one layer x expert load heatmap per this many steps, at the first logged step
                              # of each window (titled with its step); 0: none


@dataclass
class TrainerConfig:
    max_steps: int = 300  # optimizer steps to train for
    seed: int = 0  # seeds the initial weights and the data order
    log_every: int = 10  # steps between logged metrics (and console lines)
    eval_every: int = 100  # 0 disables periodic evaluation (a final one still runs)
    eval_batches: int = 8  # global validation batches (eval_batches * data.global_batch_size windows); 0: no eval
    checkpoint_every: int = 0  # 0 disables periodic checkpoints (a final one is still written)
    keep_checkpoints: int = 2  # the newest checkpoints kept; older ones are deleted
    max_bad_steps: int = 3  # stop after this many consecutive steps with a non-finite loss or gradient norm
    resume: str = "auto"  # auto | none | PATH to a checkpoint directory
    run_dir: str = "runs/${model.name}"  # config.yaml, metrics.jsonl, checkpoints/ (rank 0 creates it)
    device: str = "auto"  # auto | cpu | cuda
    dry_run: bool = False  # print parameter counts and exit
    dry_run_world_size: int = 0  # the world size the dry run plans memory for (0: the launched processes)
    activation_checkpointing: str = "none"  # none | full (recompute whole blocks in backward) | selective (recompute
                                            # attention, dense FFNs and the experts; never the all-to-all)
    progress: bool = True  # a progress bar with ETA when stdout is a terminal (rank 0); elsewhere (CI, SLURM
                           # logs) only the console logger's plain lines, which carry the ETA too


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    from moetrain.moe.routers import ROUTERS

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for name, router_cls in ROUTERS.items():  # configs/router/<name>.yaml extends `schema_<name>`
        cs.store(group="router", name=f"schema_{name}", node=router_cls.config_cls)
