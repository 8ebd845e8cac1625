"""Decoder-only transformer LM whose FFN is dense SwiGLU or MoE per layer.

Legend: B batch, S sequence, D model dim, V vocabulary.

Layer i is MoE when i >= first_k_dense and (i - first_k_dense) % moe_every == 0, dense otherwise. Every MoE layer has
num_experts routed experts, or with experts_per_layer the j-th MoE layer has experts_per_layer[j] (`layer_num_experts`).
Weights: dense parameters from the global RNG (seeded identically on every rank), experts from per-expert generators
(see moe/experts.py), so a model split over any number of expert-parallel ranks holds the same weights as one process.
Output projections are scaled by 1/sqrt(2 * n_layers) (GPT-2 style).

Activation checkpointing (`activation_checkpointing`, trainer.activation_checkpointing), one of:
    none       every block keeps its activations for backward;
    full       each whole block is recomputed in backward from its input: for an MoE block that repeats the router,
               the all-to-all dispatch and combine (communication) and the experts;
    selective  recompute what is cheap and local, keep what communicates: the attention sub-block
               (attn_norm + attention) is recomputed from the block input; in an MoE block the router, the
               all-to-all results and the combine are kept and only each chunk's expert computation is recomputed
               from its saved all-to-all result (MoELayer.recompute_experts: the R x F SwiGLU hidden activations are
               not kept); a dense block recomputes its FFN (ffn_norm + SwiGLU) from the attention sub-block output.
               Backward never repeats communication.
Each MoE layer's RoutingRecord comes from the forward only (a recomputation's record reaches nobody), so the
balancing statistics count every token once in every mode.

Attention is grouped-query (model/attention.py: head_dim, qkv_bias, qk_norm, clip_qkv) or Multi-head Latent
Attention (model.attention=mla, model/mla.py); rope tables (plain or yarn) come from model/rope.py. With a KV cache
(model/kv_cache.py, generation: eval mode, no gradients) `forward(tokens_BS, cache=cache)` continues the cached
sequences: positions cache.pos .. cache.pos+S-1, no activation checkpointing.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moetrain.config.schema import ModelConfig, RouterConfig
from moetrain.model.attention import Attention
from moetrain.model.kv_cache import KVCache, LayerKV
from moetrain.model.mla import MLAttention
from moetrain.model.mlp import SwiGLU
from moetrain.model.norm import RMSNorm
from moetrain.model.rope import rope_tables
from moetrain.moe.layer import MoELayer
from moetrain.moe.routers import router_class

ACTIVATION_CHECKPOINTING = ("none", "full", "selective")  # trainer.activation_checkpointing (see module docstring)


def check_tokens(tokens_BS: torch.Tensor, cfg: ModelConfig, cache: Optional[KVCache] = None) -> None:
    """Raise a one-line ValueError unless `tokens_BS` is a non-empty (B, S) batch of integer token ids with
    S <= model.max_seq_len (with a cache: cache.pos + S <= the cache's length <= model.max_seq_len, B = the cache's
    batch size) and, on the CPU, every id in [0, model.vocab_size).

    The id range is read only on the CPU, where it is one cheap reduction; on an accelerator it would cost a
    device-to-host sync per forward. The training data path needs no check there: shards are read only with the
    tokenizer that wrote them (ids below its vocabulary) and the config validator requires model.vocab_size >= that
    vocabulary.
    """
    if tokens_BS.dim() != 2:
        raise ValueError(f"tokens must have shape (batch, sequence), got shape {tuple(tokens_BS.shape)}")
    if tokens_BS.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 or int32 token ids, got dtype {tokens_BS.dtype}")
    B, S = tokens_BS.shape
    if B == 0 or S == 0:
        raise ValueError(f"empty batch of shape ({B}, {S}): give at least one sequence of at least one token")
    if S > cfg.max_seq_len:
        raise ValueError(f"sequence length {S} exceeds model.max_seq_len={cfg.max_seq_len}; "
                         f"shorten the sequences or raise model.max_seq_len")
    if cache is not None:
        if B != cache.batch_size:
            raise ValueError(f"batch of {B} sequences for a KV cache of {cache.batch_size}; create the cache for "
                             f"this batch size")
        if cache.pos + S > min(cache.max_len, cfg.max_seq_len):
            raise ValueError(f"{cache.pos} cached positions + {S} new tokens exceed the KV cache length "
                             f"{cache.max_len} (model.max_seq_len={cfg.max_seq_len}); generate fewer tokens")
    if tokens_BS.device.type == "cpu":
        lo, hi = (int(v) for v in torch.aminmax(tokens_BS))
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}) (model.vocab_size={cfg.vocab_size}), "
                             f"got ids from {lo} to {hi}")


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    return cfg.num_experts > 0 and i >= cfg.first_k_dense and (i - cfg.first_k_dense) % cfg.moe_every == 0


def moe_layer_ids(cfg: ModelConfig) -> list[int]:
    """The indices of the MoE layers, in order."""
    return [i for i in range(cfg.n_layers) if is_moe_layer(cfg, i)]


def layer_num_experts(cfg: ModelConfig, i: int) -> int:
    """E of layer i: model.experts_per_layer[j] for the j-th MoE layer when set (layers may differ, e.g. after
    moetrain-compress), else model.num_experts; 0 for a dense layer."""
    if not is_moe_layer(cfg, i):
        return 0
    if cfg.experts_per_layer is None:
        return cfg.num_experts
    return int(cfg.experts_per_layer[moe_layer_ids(cfg).index(i)])


# (dim, hidden, E, shared, layer_id, shared_hidden=0, shared_gate=False) -> MoE layer (moetrain/moe/layer.py)
MoELayerFactory = Callable[..., nn.Module]


class Block(nn.Module):
    selective = False  # recompute the attention sub-block and a dense FFN in backward (set by TransformerLM)

    def __init__(self, cfg: ModelConfig, layer_id: int, moe_layer: MoELayerFactory):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if is_moe_layer(cfg, layer_id):
            self.ffn = moe_layer(cfg.dim, cfg.moe_hidden, layer_num_experts(cfg, layer_id), cfg.num_shared_experts,
                                 layer_id, shared_hidden=cfg.shared_expert_hidden, shared_gate=cfg.shared_expert_gate)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, carry: Optional[torch.Tensor] = None,
                kv: Optional[LayerKV] = None):
        """(x_BSD, the MoE layer's RoutingRecord or None for a dense block); `carry` is the previous MoE layer's
        `RoutingRecord.carry`, passed to this block's router; `kv` this layer's KV cache (generation). Under
        `selective` (with grad enabled, no cache) the attention sub-block and a dense FFN are checkpointed: only
        their inputs are kept for backward."""
        recompute = self.selective and torch.is_grad_enabled() and kv is None
        if recompute:
            x_BSD = x_BSD + checkpoint(self._attention, x_BSD, cos, sin, use_reentrant=False)
        else:
            x_BSD = x_BSD + self._attention(x_BSD, cos, sin, kv)
        if isinstance(self.ffn, MoELayer):  # selective: the layer itself recomputes only its experts
            y_BSD, record = self.ffn(self.ffn_norm(x_BSD), return_record=True, carry=carry)
            return x_BSD + y_BSD, record
        if recompute:
            return x_BSD + checkpoint(self._dense_ffn, x_BSD, use_reentrant=False), None
        return x_BSD + self._dense_ffn(x_BSD), None

    def _attention(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   kv: Optional[LayerKV] = None) -> torch.Tensor:
        return self.attn(self.attn_norm(x_BSD), cos, sin, kv)

    def _dense_ffn(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.ffn_norm(x_BSD))


class TransformerLM(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, moe_layer: Optional[MoELayerFactory] = None,
                 activation_checkpointing: str = "none"):
        """`moe_layer` builds each MoE layer (moetrain.parallel.moe_layer.moe_layer_factory gives one per parallel
        layout); by default every expert lives on this rank. `activation_checkpointing`: none | full | selective
        (module docstring); it may be changed later by assigning the attribute."""
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        if moe_layer is None:
            def moe_layer(dim, hidden, num_experts, num_shared, layer_id, **shared):
                return MoELayer(dim, hidden, num_experts, num_shared, router_cfg, layer_id, **shared)
        self.layers = nn.ModuleList(Block(cfg, i, moe_layer) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.activation_checkpointing = activation_checkpointing

    @property
    def activation_checkpointing(self) -> str:
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str) -> None:
        """Set the mode on the blocks and MoE layers. A boolean (the former setting) is refused, not mapped: the
        caller picks between full and selective."""
        if not isinstance(mode, str) or mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing={mode!r} is unknown; use none, full or selective "
                             f"(the former true is full, false is none)")
        self._activation_checkpointing = mode
        for block in self.layers:
            block.selective = mode == "selective"
        for moe in self.moe_layers():
            moe.recompute_experts = mode == "selective"

    def moe_layers(self) -> Iterator[MoELayer]:
        return (m for m in self.modules() if isinstance(m, MoELayer))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic initialisation; identical for every expert-parallel split (see module docstring)."""
        cfg = self.cfg
        std, out_std = cfg.init_std, cfg.init_std / math.sqrt(2 * cfg.n_layers)
        cpu_rng = torch.random.get_rng_state()
        torch.manual_seed(seed)
        nn.init.normal_(self.tok_embeddings.weight, std=1.0 if not cfg.tie_embeddings else std)
        for block in self.layers:
            block.attn_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
            block.attn.reset_parameters(std, out_std)
            if isinstance(block.ffn, MoELayer):
                block.ffn.reset_parameters(std, out_std, seed)
            else:
                block.ffn.reset_parameters(std, out_std)
        self.norm.reset_parameters()
        if not cfg.tie_embeddings:
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)
        torch.random.set_rng_state(cpu_rng)

    def forward(self, tokens_BS: torch.Tensor, return_records: bool = False, cache: Optional[KVCache] = None):
        """Logits (B, S, V) in fp32, or (logits, [RoutingRecord of each MoE layer]) with return_records; a malformed
        batch raises a one-line ValueError (see `check_tokens`). With `cache` (model/kv_cache.py) tokens_BS are the
        next S tokens of the cached sequences (positions cache.pos .. cache.pos+S-1): their keys and values are
        appended and cache.pos advances by S."""
        check_tokens(tokens_BS, self.cfg, cache)
        S = tokens_BS.shape[1]
        start = cache.pos if cache is not None else 0
        cos, sin = rope_tables(self.cfg, S, start, tokens_BS.device)
        h_BSD = self.tok_embeddings(tokens_BS)
        records, carry = [], None
        for i, block in enumerate(self.layers):
            if cache is not None:
                h_BSD, record = block(h_BSD, cos, sin, carry, cache.layer(i))
            elif self.activation_checkpointing == "full" and torch.is_grad_enabled():
                h_BSD, record = checkpoint(block, h_BSD, cos, sin, carry, use_reentrant=False)
            else:
                h_BSD, record = block(h_BSD, cos, sin, carry)
            if record is not None:
                records.append(record)
                carry = record.carry
        if cache is not None:
            cache.pos += S
        logits_BSV = self.output(self.norm(h_BSD)).float()
        return (logits_BSV, records) if return_records else logits_BSV


def count_parameters(cfg: ModelConfig, router_cfg: RouterConfig) -> dict[str, int]:
    """Total and active (per token) parameter counts, computed on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = TransformerLM(cfg, router_cfg)
    total = active = 0
    router = router_class(router_cfg)
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if getattr(p, "expert_ids", None) is not None:  # dim 0: the layer's E experts (layers may differ)
            E = p.shape[0]
            n = round(n / E * router.experts_per_token(router_cfg, E))
        active += n
    embedding = model.tok_embeddings.weight.numel()
    return {"total": total, "active": active, "embedding": embedding,
            "total_non_embedding": total - embedding, "active_non_embedding": active - embedding}
