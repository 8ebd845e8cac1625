"""Scheduled chunk exchange: the pipelined all-to-all of an MoE layer, with a backward that overlaps too.

Legend: D model dim, R rows leaving this rank (send order: chunk, destination, expert), n pipeline chunks;
a_c the rows of chunk c arriving here, s_c the rows chunk c sends back, y_c chunk c's rows of y_RD.

Per chunk the routed experts are a local function s_c = local_c(a_c, W) between two all-to-alls, dispatch_comm
(x_RD -> a_c) and combine_comm (s_c -> y_c). Torch's autograd all-to-all waits inside its backward node, and autograd
runs nodes one at a time in reverse creation order, so with it a degree-n backward moves chunk n-1's gradient,
differentiates chunk n-1, moves the next gradient, ..., and only then sends the dispatch gradients home, one blocking
all-to-all each: nothing overlaps. Here every collective is issued asynchronously when its data exists and waited for
where its result is first needed (every rank issues the same collectives in the same order):

    forward                                            backward (dy_RD: the gradient of y_RD)
    send:      issue a_c = dispatch_comm(x_RD, c), all c   gather:  issue g_c = combine_comm_grad(dy_RD, c), all c
    [shared experts run: the tokens are in flight]              (c = n-1 first: autograd visits that chunk first)
    for c:  arrival:  wait a_c                           for c = n-1 .. 0:
            s_c = local_c(a_c, W)                            send_back: wait g_c
            send_back: issue y_c = combine_comm(s_c, c)      d local_c (autograd, in the ordinary graph)
    gather:    y_RD = cat_c wait(y_c)                        arrival:  issue e_c = dispatch_comm_grad(da_c, c)
                                                         [shared experts' backward: the e_c are in flight]
                                                         send:     dx_RD = cat_c wait(e_c)

Chunk c's gradient leaves for its sources as soon as it exists, while chunk c-1 is differentiated. The four steps are
autograd Functions around the ordinary graph of each chunk's local computation. Autograd passes a gradient only
when a node returns, so `gather` and `arrival` return a placeholder (a zero broadcast to the right shape, no memory)
and the real gradient travels in this module's state, picked up by `send_back` and `send`. The order follows from
autograd's (reverse creation order): the chunks' nodes run after `gather`, chunk n-1 first, each chunk's local nodes
right after its `send_back`; `send` runs after all of them and after the shared experts' backward. Everything else is
the ordinary graph, so weight gradients reach the parameters (expert parallelism) or the gathered weights (FSSDP,
whose backward reduce-scatters them to the owners), saved-tensor hooks (FSSDP re-materialization, activation
checkpointing) see every saved tensor, and a checkpointed forward is recomputed once.

The two transposes are the dispatcher's `dispatch_comm_grad` (chunk c's arrival gradient back to its sources: the
all-to-all of dispatch_comm with its splits swapped) and `combine_comm_grad` (chunk c's rows of dy_RD to the ranks
that computed them). Collectives go to the dispatcher's one process group. Measured on gloo (2 ranks, 4 async
all-to-alls of 4 MB issued at once over loopback limited to 2 Gbit/s, median of 4): on one group they complete one after another (first 42 ms,
last 134 ms); on four groups they share the wire (first 64 ms, last 128 ms). Pipelining wants the first chunk early
and the wire busy, which one group in issue order gives, and every collective here is issued when its data exists,
so none queues behind one that is not ready. NCCL likewise runs one group's collectives in issue order.
"""

from __future__ import annotations

import torch


def _wait(t):
    """The tensor of a functional collective's result (waiting for it), or t itself."""
    return t.wait() if hasattr(t, "trigger_wait") else t


def _placeholder(shape, dtype, device) -> torch.Tensor:
    """A gradient of that shape, dtype and device costing no memory (the real one travels in the exchange)."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


class ChunkExchange:
    """One forward of one layer's chunked region (see the module docstring):

        ex = ChunkExchange(dispatcher, plan)
        token = ex.send(x_RD)                  # every chunk starts moving
        ...                                    # e.g. the shared experts
        for c in range(ex.num_chunks):
            a_c = ex.arrival(token, c)
            ex.send_back(local_c(a_c), c)
        y_RD = ex.gather()
    """

    def __init__(self, dispatcher, plan):
        self.d, self.plan = dispatcher, plan
        self.num_chunks = plan.num_chunks
        self.in_flight: list = [None] * self.num_chunks  # forward: a_c, then y_c
        self.grads: list = [None] * self.num_chunks  # backward: g_c, then e_c
        self.sent: list[torch.Tensor] = []  # s_c (for the placeholder gradients' shapes)

    def send(self, x_RD: torch.Tensor) -> torch.Tensor:
        """Issue every chunk's dispatch; returns an empty tensor standing for the rows in flight."""
        return _Send.apply(self, x_RD)

    def arrival(self, token: torch.Tensor, c: int) -> torch.Tensor:
        """a_c: wait for chunk c's rows (in dispatch_comm's output layout)."""
        return _Arrival.apply(self, c, token)

    def send_back(self, s_c: torch.Tensor, c: int) -> None:
        """Issue chunk c's combine."""
        self.sent.append(_SendBack.apply(self, c, s_c))

    def gather(self) -> torch.Tensor:
        """y_RD: wait for every chunk's combine; rows in send order."""
        sent, self.sent = self.sent, []
        return _Gather.apply(self, *sent)


class _Send(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ex: ChunkExchange, x_RD):
        ctx.ex = ex
        ex.in_flight = [ex.d.dispatch_comm(x_RD, ex.plan, c) for c in range(ex.num_chunks)]
        return x_RD.new_empty(0)

    @staticmethod
    def backward(ctx, _):
        ex = ctx.ex
        parts = [_wait(e) for e in ex.grads]  # dx_RD rows, chunk by chunk (send order)
        ex.grads = [None] * ex.num_chunks
        return None, parts[0] if len(parts) == 1 else torch.cat(parts)


class _Arrival(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ex: ChunkExchange, c: int, token):
        ctx.ex, ctx.c = ex, c
        a_c = _wait(ex.in_flight[c])
        ex.in_flight[c] = None
        return a_c

    @staticmethod
    def backward(ctx, da_c):
        ex, c = ctx.ex, ctx.c
        ex.grads[c] = ex.d.dispatch_comm_grad(da_c.contiguous(), ex.plan, c)  # chunk c's gradient goes home now
        return None, None, da_c.new_zeros(0)


class _SendBack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ex: ChunkExchange, c: int, s_c):
        ctx.ex, ctx.c = ex, c
        ex.in_flight[c] = ex.d.combine_comm(s_c.contiguous(), ex.plan, c)
        return s_c.view_as(s_c)

    @staticmethod
    def backward(ctx, _placeholder_grad):
        ex, c = ctx.ex, ctx.c
        g_c = _wait(ex.grads[c])
        ex.grads[c] = None
        return None, None, g_c


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ex: ChunkExchange, *sent):
        ctx.ex = ex
        ctx.shapes = [(s.shape, s.dtype, s.device) for s in sent]
        parts = [_wait(y) for y in ex.in_flight]
        ex.in_flight = [None] * ex.num_chunks
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def backward(ctx, dy_RD):
        ex = ctx.ex
        dy_RD = dy_RD.contiguous()
        for c in reversed(range(ex.num_chunks)):  # the order autograd will differentiate the chunks in
            ex.grads[c] = ex.d.combine_comm_grad(dy_RD, ex.plan, c)
        return (None, *(_placeholder(*meta) for meta in ctx.shapes))
