"""The dispatcher interface (local pre-processing, communication, local post-processing, for both directions) and
the dispatcher without communication, used when every expert lives on this rank.

Legend: T tokens on this rank, D model dim, R rows leaving this rank, Rr rows arriving, C copies computed (per chunk),
L local experts.

    plan  = plan(topk_idx_TK, gates_TK, keep_TK)   # local routing plan, destinations, count exchange, chunks
    x_RD  = dispatch_preprocess(x_TD, plan)        # the rows to send, in send order (local)
    for each chunk c:
        x_c = dispatch_comm(x_RD, plan, c)         # send the chunk's rows (returns before the transfer is done)
    for each chunk c:
        x_CD, tokens_per_expert_c, experts_c = dispatch_postprocess(x_c, plan, c)  # wait; copies grouped by expert
        y_CD = experts[experts_c](x_CD)                # weight gradients of all chunks built in one buffer
        y_c = combine_comm(combine_preprocess(y_CD, plan, c), plan, c)            # send results back (async)
    y_TD  = combine_postprocess(cat(y_c), plan)    # wait, sum into tokens
The gates are applied in combine_preprocess or combine_postprocess, whichever side sums a token's copies: the local
dispatcher sends nothing (rows = copies, combine_postprocess weights and sums them); the all-to-all dispatcher sends
each token once per destination rank, expands it into its copies in dispatch_postprocess and sums the weighted
copies in combine_preprocess (parallel/dispatch/alltoall.py).

Splitting the steps lets the layer compute shared experts while the dispatch is in flight, and lets the pipeline
overlap the transfer of chunk c+1 and the combine of chunk c-1 with the expert compute of chunk c. Every step is
autograd-correct. For the backward the layer schedules the chunks' gradient all-to-alls itself (moe/overlap.py) with
the transposes of the two comms, `dispatch_comm_grad(grad_c, plan, c)` (chunk c's arrival gradient back to its
sources) and `combine_comm_grad(grad_RD, plan, c)` (chunk c's rows of the send-order gradient to the experts'
ranks): asynchronous, no autograd.

Besides the data path a dispatcher has per-step hooks (every rank, same order): `degree` (the pipeline chunks it
uses now), `expert_location_E()` (the rank that computes each expert, for routers that limit how many ranks or
nodes a token reaches), `after_step(step, global_tokens_per_expert_E, optimizer)`, `step_metrics(prefix)` and a JSON-able
`run_state()` / `load_run_state(state)` for checkpoints. Communicating dispatchers and their tuners live in
`moetrain.parallel`; the MoE layer only talks to this interface.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from moetrain.moe.plan import RoutingPlan, build_plan, permute, unpermute


class Dispatcher(Protocol):
    num_local_experts: int

    @property
    def degree(self) -> int: ...

    def plan(self, topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor, keep_TK: Optional[torch.Tensor] = None): ...

    def dispatch_preprocess(self, x_TD: torch.Tensor, plan) -> torch.Tensor: ...

    def dispatch_comm(self, x_RD: torch.Tensor, plan, chunk: int = 0) -> torch.Tensor: ...

    def dispatch_postprocess(self, x_RrD: torch.Tensor, plan, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, slice]: ...

    def combine_preprocess(self, y_RrD: torch.Tensor, plan, chunk: int = 0) -> torch.Tensor: ...

    def combine_comm(self, y_RrD: torch.Tensor, plan, chunk: int = 0) -> torch.Tensor: ...

    def combine_postprocess(self, y_RD: torch.Tensor, plan) -> torch.Tensor: ...

    # The transposes of the two comms, without autograd, asynchronous (waitable): the scheduled backward of
    # moe/overlap.py sends each chunk's gradients with them.
    def dispatch_comm_grad(self, grad_RrD: torch.Tensor, plan, chunk: int = 0) -> torch.Tensor: ...

    def combine_comm_grad(self, grad_RD: torch.Tensor, plan, chunk: int = 0) -> torch.Tensor: ...

    def after_step(self, step: int, global_tokens_per_expert_E: torch.Tensor,
                   optimizer: Optional[torch.optim.Optimizer]) -> None: ...

    def step_metrics(self, prefix: str) -> dict: ...

    def expert_location_E(self) -> Optional[torch.Tensor]: ...  # rank computing each expert now; None: this rank

    def run_state(self) -> dict: ...

    def load_run_state(self, state: dict) -> bool: ...


class NoStepState:
    """The per-step hooks of a part (dispatcher or experts) that has no state beyond its parameters."""

    def after_step(self, step: int, global_tokens_per_expert_E: Optional[torch.Tensor], optimizer=None) -> None:
        pass

    def step_metrics(self, prefix: str) -> dict:
        return {}

    def run_state(self) -> dict:
        return {}

    def load_run_state(self, state: dict) -> bool:
        return True


class LocalDispatcher(NoStepState):
    """Every expert on this rank: communication is the identity, one chunk, no per-step state."""

    degree = 1

    def __init__(self, num_experts: int, capacity_factor=None, pad_to_capacity: bool = False):
        self.num_experts = self.num_local_experts = num_experts
        self.capacity_factor, self.pad_to_capacity = capacity_factor, pad_to_capacity

    def expert_location_E(self) -> None:
        return None

    def plan(self, topk_idx_TK: torch.Tensor, gates_TK: torch.Tensor,
             keep_TK: Optional[torch.Tensor] = None) -> RoutingPlan:
        return build_plan(topk_idx_TK, gates_TK, self.num_experts, self.capacity_factor, self.pad_to_capacity, keep_TK)

    def dispatch_preprocess(self, x_TD, plan):
        return permute(x_TD, plan)

    def dispatch_comm(self, x_RD, plan, chunk: int = 0):
        return x_RD

    def dispatch_postprocess(self, x_RD, plan, chunk: int = 0):
        return x_RD, plan.tokens_per_expert_E, slice(None)

    def combine_preprocess(self, y_RD, plan, chunk: int = 0):
        return y_RD

    def combine_comm(self, y_RD, plan, chunk: int = 0):
        return y_RD

    def combine_postprocess(self, y_RD, plan):
        return unpermute(y_RD, plan)

    def dispatch_comm_grad(self, grad_RD, plan, chunk: int = 0):
        return grad_RD

    def combine_comm_grad(self, grad_RD, plan, chunk: int = 0):
        return grad_RD
