"""One training step of a model config on a cluster: time, its breakdown, and per-rank memory.

Legend: W world size, ep expert-parallel size (mode=ep; W under FSSDP), B micro-batch, S sequence length, T = B*S
tokens per rank and micro-batch, D model dim, V vocabulary, n_micro = global batch / (B * W) micro-batches per step.

Per micro-batch, forward + backward (backward = 2 x forward FLOPs) of every block, computed with the roofline
(moetrain/sim/compute.py) from the shapes of the model the trainer would build (a meta-device model, as the dry
run builds it):
    attention   projections 2*T*P_attn + scores 2*B*S^2*(Dqk + Dv)/2 (causal)
    dense FFN   2*T*P_ffn;  head 2*T*D*V
    MoE layer   moetrain/sim/layer.py: router and permutations, experts, shared experts, token all-to-alls, FSSDP's
                spAG/spRS, with the pipelining schedule
Activation checkpointing adds the recomputed forward: every block under `full`, the experts under `selective`.
Gradient synchronisation (alpha-beta ring collectives, moetrain/sim/comm.py):
    ddp   all-reduce of fp32 gradients: dense over W, experts over their W/ep replicas (mode=ep), overlapped with the
          last micro-batch's backward; what does not fit under it is exposed
    fsdp  per micro-batch and block: all-gather of the parameters in forward and again in backward (b bytes each),
          reduce-scatter of fp32 gradients; prefetching hides them behind the blocks' compute except the first
          gather, and whatever exceeds the compute
Optimizer: AdamW over the rank's local parameter elements, memory-bound (`Cluster.optimizer_bytes_per_element`).
Memory: `moetrain.train.memory_plan.plan_memory` for the same config and world size, the dry run's plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from moetrain.config.schema import TrainConfig
from moetrain.sim.cluster import Cluster
from moetrain.sim.comm import all_gather_time, all_reduce_time
from moetrain.sim.compute import matmul_time, roofline, sharing_factor, stream_time
from moetrain.sim.layer import LayerPrediction, moe_layer
from moetrain.sim.routing import RoutingLoad
from moetrain.train.memory_plan import MemoryPlan, plan_memory

FP32 = 4
BREAKDOWN = ("attention", "dense_ffn", "experts", "router_permute", "all_to_all", "sparse_gather", "fsdp_sync",
             "optimizer", "exposed_comm")


@dataclass
class StepPrediction:
    layout: str
    world: int
    cluster: str
    step: float  # seconds per optimizer step
    parts: dict  # BREAKDOWN -> seconds per step (communication parts as if alone on the wire)
    memory: MemoryPlan
    fits: bool  # the plan's total fits the device memory
    micro_batches: int
    moe: list[LayerPrediction] = field(default_factory=list)  # per MoE layer, one micro-batch

    @property
    def tokens_per_s(self) -> float:
        return self.world * self.micro_batches * self.memory.micro_batch * self.memory.seq_len / self.step


def for_cluster(cfg: TrainConfig, cluster: Cluster) -> TrainConfig:
    """parallel.mixed_precision=auto resolved for the cluster's devices (bf16 on GPU presets, fp32 on the CPU)."""
    if cfg.parallel.mixed_precision != "auto":
        return cfg
    precision = "bf16" if cluster.dtype_bytes == 2 else "fp32"
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, mixed_precision=precision))


_SHAPES: dict[str, tuple] = {}


def _shapes(cfg: TrainConfig):
    """Per-block shapes read from the meta-device model the dry run builds (cached per model and router config)."""
    key = repr((cfg.model, cfg.router))
    if key not in _SHAPES:
        _SHAPES[key] = _read_shapes(cfg)
    return _SHAPES[key]


def _read_shapes(cfg: TrainConfig):
    from moetrain.model.transformer import is_moe_layer
    from moetrain.moe.layer import MoELayer
    from moetrain.train.memory_plan import _meta_model

    model = _meta_model(cfg)
    blocks = []
    for i, blk in enumerate(model.layers):
        attn = blk.attn
        p_attn = sum(p.numel() for p in attn.parameters() if p.dim() == 2)
        H = attn.n_heads
        if hasattr(attn, "wq"):
            d_qk = d_v = attn.wq.weight.shape[0]
        else:  # mla
            d_qk, d_v = H * (attn.nope_dim + attn.rope_dim), H * attn.v_dim
        ffn = blk.ffn
        if isinstance(ffn, MoELayer):
            shared = ffn.shared_hidden if ffn.shared_experts is not None else 0
            E = ffn.experts.w1_EDF.shape[0]
            blocks.append(dict(attn=p_attn, d_qk=d_qk, d_v=d_v, moe=True, E=E, F=ffn.experts.w1_EDF.shape[-1],
                               shared=shared, layer_id=i))
        else:
            blocks.append(dict(attn=p_attn, d_qk=d_qk, d_v=d_v, moe=False,
                               ffn=sum(p.numel() for p in ffn.parameters() if p.dim() == 2)))
        assert is_moe_layer(cfg.model, i) == blocks[-1]["moe"]
    block_params = [sum(p.numel() for p in blk.parameters()) for blk in model.layers]
    dense_block_params = [sum(p.numel() for p in blk.parameters() if getattr(p, "expert_ids", None) is None)
                          for blk in model.layers]
    return blocks, block_params, dense_block_params


def layout_name(cfg: TrainConfig) -> str:
    par = cfg.parallel
    if par.mode == "fssdp":
        text = f"fssdp budget={par.fssdp.budget}" + (" remat" if par.fssdp.rematerialize else "")
    else:
        text = f"ep={par.ep} degree={par.pipeline_degree}"
    return f"{text} {par.data_parallel}"


def simulate(cfg: TrainConfig, world: int, cluster: Cluster, routing: RoutingLoad, step: int = 0,
             hierarchical: bool = False, degree: Optional[int] = None, prefetch_gather: bool = False
             ) -> StepPrediction:
    """Predict one optimizer step of `cfg` on `world` devices of `cluster` (module docstring). Raises ConfigError
    (one line per problem) when the layout does not fit the world size, as the dry run does. `degree` overrides
    parallel.pipeline_degree (`auto` is simulated as degree 1: compare the degrees with `--compare`);
    `prefetch_gather` hides FSSDP's spAG/spRS behind compute as Hecate does (moetrain does not)."""
    from moetrain.moe.routers import router_class

    cfg = for_cluster(cfg, cluster)
    memory = plan_memory(cfg, world)  # validates the layout for the world size first
    m, par, d = cfg.model, cfg.parallel, cfg.data
    b = 2 if memory.precision == "bf16" else FP32
    B, S, D, V = d.micro_batch_size, d.seq_len, m.dim, m.vocab_size
    T = B * S
    n_micro = max(1, d.global_batch_size // (B * world))
    blocks, block_params, dense_block_params = _shapes(cfg)
    share = sharing_factor(world, cluster.cores)
    fssdp = par.mode == "fssdp"
    group = world if fssdp else par.ep
    K = router_class(cfg.router).experts_per_token(cfg.router, m.num_experts) if m.num_experts else 0.0
    if degree is None:
        degree = 1 if par.pipeline_degree == "auto" else int(par.pipeline_degree)

    attention = dense_ffn = 0.0
    moe: list[LayerPrediction] = []
    layers: dict[tuple, LayerPrediction] = {}
    moe_index = 0
    for blk in blocks:
        proj = matmul_time(T, D, blk["attn"] // D, cluster)
        scores = roofline(2.0 * B * S * S * (blk["d_qk"] + blk["d_v"]) / 2, 0, cluster.dense_flops, 1.0)
        attention += 3 * (proj + scores) * share
        if blk["moe"]:
            load = routing.for_layer(step, moe_index)
            if load.numel() != blk["E"]:
                raise ValueError(f"routing load has {load.numel()} experts, layer {blk['layer_id']} has {blk['E']}")
            key = (tuple(load.tolist()), blk["F"], blk["shared"])
            if key not in layers:  # layers with the same shapes and load have the same prediction
                layers[key] = moe_layer(cluster, group, blk["E"], K, D, blk["F"], T, load, mode=par.mode,
                                        degree=degree, budget=par.fssdp.budget,
                                        rematerialize=par.fssdp.rematerialize, reshard=par.fssdp.reshard_every > 0,
                                        shared_hidden=blk["shared"], payload_bytes=b, hierarchical=hierarchical,
                                        sharing_ranks=world, prefetch_gather=prefetch_gather,
                                        split=par.pipeline_split, flops_per_byte=par.fssdp.flops_per_byte)
            moe.append(layers[key])
            moe_index += 1
        else:
            dense_ffn += 3 * matmul_time(T, D, blk["ffn"] // D, cluster) * share
    head = 3 * matmul_time(T, D, V, cluster) * share
    dense_ffn += head + sum(x.shared for x in moe)
    experts = sum(x.experts for x in moe)
    recompute = 0.0
    if cfg.trainer.activation_checkpointing == "full":
        recompute = (attention + dense_ffn - head) / 3 + sum(x.forward for x in moe)
    elif cfg.trainer.activation_checkpointing == "selective":
        recompute = experts / 3
    micro = attention + dense_ffn + sum(x.total for x in moe) + recompute
    backward_compute = 2 / 3 * (attention + dense_ffn + experts)

    # ---- gradient synchronisation / FSDP
    dense_elems = memory.param_elements.dense
    expert_elems_total = memory.param_elements.expert  # local
    dp = world // group if not fssdp else 1
    if par.data_parallel == "fsdp" and world > 1:
        N_d = world // par.dp_replicate
        gathers = sum(2 * all_gather_time(b * p, N_d, cluster) for p in dense_block_params)
        scatters = sum(all_gather_time(FP32 * p, N_d, cluster) for p in dense_block_params)
        if not fssdp and dp > 1:  # experts FSDP-sharded over their dp ranks (stride ep)
            e_bytes = [p - q for p, q in zip(block_params, dense_block_params)]
            e_bytes = [x // par.ep for x in e_bytes]
            gathers += sum(2 * all_gather_time(b * x, dp, cluster, stride=par.ep) for x in e_bytes)
            scatters += sum(all_gather_time(FP32 * x, dp, cluster, stride=par.ep) for x in e_bytes)
        sync = n_micro * (gathers + scatters)
        first = 2 * all_gather_time(b * max(dense_block_params), N_d, cluster)
        exposed_sync = n_micro * max(0.0, gathers + scatters - (attention + dense_ffn + experts)) + first
    else:
        sync = all_reduce_time(FP32 * dense_elems, world, cluster)
        if not fssdp and dp > 1:
            sync += all_reduce_time(FP32 * expert_elems_total, dp, cluster, stride=par.ep)
        exposed_sync = max(0.0, sync - backward_compute) + sync / max(1, len(blocks))
    optimizer = stream_time(cluster.optimizer_bytes_per_element * memory.param_elements.total, cluster) * share

    parts = dict(attention=n_micro * attention, dense_ffn=n_micro * dense_ffn, experts=n_micro * (experts + recompute),
                 router_permute=n_micro * sum(x.router_permute for x in moe),
                 all_to_all=n_micro * sum(x.all_to_all for x in moe),
                 sparse_gather=n_micro * sum(x.sparse for x in moe),
                 fsdp_sync=sync, optimizer=optimizer,
                 exposed_comm=n_micro * sum(x.exposed_comm for x in moe) + exposed_sync)
    total = n_micro * micro + exposed_sync + optimizer
    return StepPrediction(layout_name(cfg), world, cluster.name, total, parts, memory,
                          memory.total.total <= cluster.memory_bytes, n_micro, moe)
