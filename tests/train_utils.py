"""Helpers for end-to-end training tests: a very small model config and metrics.jsonl readers."""

import json
from pathlib import Path

SMALL = [
    "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=64",
    "model.num_experts=4", "model.moe_hidden=32", "model.first_k_dense=0", "router.top_k=2",
    "data.seq_len=32", "data.global_batch_size=8", "data.micro_batch_size=2", "data.max_corpus_bytes=300000",
    "optim.warmup_steps=2", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=2",
    "trainer.progress=false", "logger.console=false",
]


def overrides(run_dir, cache_dir, *extra):
    return SMALL + [f"trainer.run_dir={run_dir}", f"data.cache_dir={cache_dir}", *extra]


def read_metrics(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}


class SavedTensorBytes:
    """Context manager summing the bytes of the distinct storages autograd saves for backward inside it, the
    storages of `exclude` (e.g. the model's parameters) left out: `with SavedTensorBytes(params) as saved: ...`,
    then `saved.total`; `saved.add(t)` counts a tensor held outside autograd too (e.g. the logits)."""

    def __init__(self, exclude=()):
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages: dict[int, int] = {}

    def _pack(self, t):
        if t.untyped_storage().data_ptr() not in self._exclude:
            self.add(t)
        return t

    def add(self, t) -> None:
        self._storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    @property
    def total(self) -> int:
        return sum(self._storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)
