"""Workspace: the MoE hot path's large per-layer buffers, kept alive across steps on CPU.

Legend: n elements requested, N elements of a cached buffer (N >= n).

Why. glibc serves blocks above its mmap threshold (at most 32 MiB by default) with a fresh mmap and unmaps them on
free, so every large activation of a step (R x D rows at E=64, K=6, T=4096: 50 MB) is page-faulted in again by the
kernel, step after step (about 15x the cost of reusing the memory: bench/kernels_profile.py). Instead of asking users
for GLIBC_TUNABLES, the kernels ask this workspace for their large outputs and temporaries, and it hands out memory
it already owns.

    empty(name, shape, dtype, device)  ->  a tensor of `shape` on a cached buffer of key (name, dtype, device) that
                                           nothing else references, grown (with 1/8 headroom) when too small
    empty(..., exact=True)             ->  the same on a buffer of exactly n elements: for tensors that outlive the
                                           backward (a weight gradient becomes `.grad` and is what the optimizer,
                                           FSDP and the memory plan see), so no headroom or larger buffer rides along

Safety rule: a buffer is handed out only when no tensor anywhere references its storage (the storage's use count
says so): a tensor saved for backward, the next micro-batch's activations under gradient accumulation, a
recomputed forward, a pipeline chunk in flight, a gradient stored as `.grad`, a tensor a user kept - each keeps its
buffer busy for exactly as long as it lives, and a request that finds every buffer of its key busy gets another
one (kept for later reuse up to `max_buffers` per key, beyond that a plain allocation). So reuse never changes a
result; it only removes page faults. Contents are uninitialised, like torch.empty. The handed-out tensor is not a
view (it is set_ onto the buffer), so autograd and in-place ops treat it like any fresh tensor.

On CUDA (and any non-CPU device) `empty` is torch.empty: PyTorch's caching allocator already keeps freed blocks for
reuse, so the same calls cost nothing extra there. One code path; the device picks the allocator.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch


def _use_count(storage: torch.UntypedStorage) -> int:
    return torch._C._storage_Use_Count(storage._cdata)


class Workspace:
    """Buffers keyed by (name, dtype, device); see the module docstring."""

    def __init__(self, max_buffers: int = 64, headroom: float = 0.125):
        self.max_buffers, self.headroom = max_buffers, headroom
        self._buffers: dict[tuple, list[torch.UntypedStorage]] = {}
        self._lock = threading.Lock()

    def empty(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
              exact: bool = False) -> torch.Tensor:
        device = torch.device(device)
        if device.type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = math.prod(shape) * itemsize
        key = (name, dtype, device)
        with self._lock:
            pool = self._buffers.setdefault(key, [])
            free = [s for s in pool if _use_count(s) == 1]  # the pool's own reference only
            fits = [s for s in free if (s.nbytes() == nbytes if exact else s.nbytes() >= nbytes)]
            if fits:
                storage = min(fits, key=lambda s: s.nbytes())
            else:
                for s in free:  # superseded by the buffer below
                    pool.remove(s)
                if len(pool) >= self.max_buffers:
                    return torch.empty(shape, dtype=dtype, device=device)
                size = nbytes if exact else int(nbytes * (1 + self.headroom)) // itemsize * itemsize + itemsize
                storage = torch.UntypedStorage(size, device=device)
                pool.append(storage)
            return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, tuple(shape))

    def nbytes(self) -> int:
        """Bytes held by the cached buffers."""
        with self._lock:
            return sum(s.nbytes() for pool in self._buffers.values() for s in pool)

    def clear(self) -> None:
        """Forget every cached buffer (tensors handed out stay valid: they keep their storage alive)."""
        with self._lock:
            self._buffers.clear()


WORKSPACE = Workspace()


def empty(name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device | str,
          exact: bool = False) -> torch.Tensor:
    """WORKSPACE.empty: uninitialised memory for a large hot-path tensor, reused across steps on CPU."""
    return WORKSPACE.empty(name, shape, dtype, device, exact)
