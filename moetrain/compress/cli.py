"""moetrain-compress: fewer experts per MoE layer, by pruning or merging, from a trained run (docs/compression.md).

    moetrain-compress RUN_DIR --method M --keep R --out OUT [--tokens N] [--step N] [--seed S] [data.KEY=VALUE ...]

RUN_DIR is a run directory (its newest valid checkpoint, or --step) or a checkpoint directory inside one. --keep is a
fraction of each layer's experts (a number with a point: 0.75, 1.0), a count for every MoE layer (12) or one count
per MoE layer (12,10,8). Calibration reads --tokens tokens of the training split of the run's data, or of the data
given by data.* overrides (e.g. data.name=shards data.path=DIR), always with the run's tokenizer. OUT is an ordinary
run directory: `moetrain-train -cd OUT -cn config trainer.max_steps=200` fine-tunes it. A problem the user can fix
prints one line, `moetrain-compress: error: ...`, exits with status 2, and leaves nothing written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from moetrain.compress import CompressError

PROG = "moetrain-compress"


def _parser() -> argparse.ArgumentParser:
    from moetrain.compress.methods import METHODS

    p = argparse.ArgumentParser(prog=PROG, description="Prune or merge the routed experts of a trained run.",
                                epilog="data.KEY=VALUE: the calibration data, as in training (docs/compression.md).")
    p.add_argument("run", help="a moetrain run directory or a checkpoint directory inside one")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--keep", required=True, help="experts kept per MoE layer: a fraction (0.5, 1.0), a count (8) or "
                                                 "one count per MoE layer (12,10,8)")
    p.add_argument("--out", required=True, help="the run directory to write (must not hold a checkpoint)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--step", type=int, default=None, help="compress this step of the run (default: the newest)")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration windows and random pruning")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE")
    return p


def keep_counts(keep: str, experts: list[int], top_k: int, num_groups: int = 1) -> list[int]:
    """Experts kept in each MoE layer for --keep `keep` (module docstring), checked against each layer's E."""
    text = keep.strip()
    try:
        values = [int(v) for v in text.split(",")] if "." not in text else None
        frac = float(text) if values is None else None
    except ValueError:
        raise CompressError(f"--keep {keep} is not a fraction (0.5), a count (8) or counts per MoE layer "
                            f"(12,10,8)") from None
    if frac is not None:
        if not 0 < frac <= 1:
            raise CompressError(f"--keep {keep} is not a fraction in (0, 1]; e.g. --keep 0.5 keeps half of each "
                                f"layer's experts")
        counts = [max(1, math.floor(frac * E + 0.5)) for E in experts]
    elif len(values) == 1:
        counts = values * len(experts)
    elif len(values) != len(experts):
        raise CompressError(f"--keep {keep} gives {len(values)} counts for {len(experts)} MoE layers; give one per "
                            f"MoE layer or a single fraction or count")
    else:
        counts = values
    for j, (k, E) in enumerate(zip(counts, experts)):
        if k < 1:
            raise CompressError(f"--keep {keep} keeps no expert; keep at least router.top_k={top_k} experts per layer")
        if k > E:
            raise CompressError(f"--keep {keep} asks for {k} experts but MoE layer {j} has {E}; keep at most {E} "
                                f"(--keep 1.0 keeps all)")
        if k < top_k:
            raise CompressError(f"--keep {keep} leaves {k} experts in MoE layer {j}, fewer than router.top_k="
                                f"{top_k}; keep at least {top_k}")
        if k % num_groups:
            raise CompressError(f"--keep {keep} leaves {k} experts in MoE layer {j}, not divisible by "
                                f"router.num_groups={num_groups}; keep a multiple of {num_groups}")
    return counts


def calibration_data(cfg, overrides: Sequence[str]):
    """The data config calibration reads: the run's, with data.* overrides; the run's tokenizer only."""
    import copy

    from omegaconf import OmegaConf

    data = copy.deepcopy(cfg.data)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("data.") or not hasattr(data, key[5:]):
            raise CompressError(f"{item}: only data.KEY=VALUE overrides (the calibration data) are accepted, e.g. "
                                f"data.name=shards data.path=DIR")
        parsed = OmegaConf.create({"v": value}).v if value else None
        if key == "data.tokenizer" and str(parsed) != str(cfg.data.tokenizer):
            raise CompressError(f"calibration data.tokenizer={value} differs from the run's data.tokenizer="
                                f"{cfg.data.tokenizer}; calibrate with the tokenizer the model was trained with")
        setattr(data, key[5:], parsed)
    return data


def calibration_batches(data_cfg, num_tokens: int, seed: int, micro_batch: int = 8) -> Iterator[torch.Tensor]:
    """ceil(num_tokens / S) windows of S = data.seq_len tokens at seeded random offsets of the training split,
    in batches of `micro_batch` windows (int64 (B, S))."""
    from moetrain.data.corpus import stdlib_shards
    from moetrain.data.shards import load_shards
    from moetrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(data_cfg.tokenizer)
    if data_cfg.name == "stdlib":
        path = stdlib_shards(data_cfg.cache_dir, data_cfg.max_corpus_bytes, data_cfg.val_fraction, tokenizer)
    elif data_cfg.name == "shards" and data_cfg.path:
        path = data_cfg.path
        made_with = _shards_tokenizer(Path(path))
        if made_with is not None and made_with != tokenizer.identity:
            raise CompressError(f"the calibration shards {path} were tokenized with {made_with[:80]} but the run was "
                                f"trained with data.tokenizer={data_cfg.tokenizer} ({tokenizer.identity}); calibrate "
                                f"on data tokenized with the run's tokenizer")
    else:
        raise CompressError(f"data.name={data_cfg.name} needs data.path=DIR (shards made by moetrain-prepare)")
    train, _, _ = load_shards(path, tokenizer)  # shards of another tokenizer: a one-line DataError
    S = data_cfg.seq_len
    if len(train) < S + 1:
        raise CompressError(f"the calibration data has {len(train)} tokens, fewer than data.seq_len={S}")
    n = max(1, math.ceil(num_tokens / S))
    g = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(train) - S, (n,), generator=g).numpy()
    for i in range(0, n, micro_batch):
        rows = [torch.from_numpy(train[o:o + S].astype("int64")) for o in offsets[i:i + micro_batch]]
        yield torch.stack(rows)


def _shards_tokenizer(path: Path) -> Optional[str]:
    """The tokenizer identity a shard directory's meta.json records (None when unreadable: load_shards says why)."""
    import json

    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        return str(meta.get("tokenizer", "bytes")) if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


def compress_run(args) -> Path:
    from moetrain.compress.calibration import calibrate
    from moetrain.compress.writer import compress_model, experts_per_moe_layer, write_compressed
    from moetrain.interop.run_dir import find_run_checkpoint, load_run_model, read_run_config
    from moetrain.train import checkpoint as ckpt

    out = Path(args.out)
    if ckpt.find_latest(out / "checkpoints") is not None or out.is_file():
        raise CompressError(f"--out {out} already holds a checkpoint or is a file; choose a new --out directory")
    if args.tokens < 1:
        raise CompressError(f"--tokens {args.tokens}: calibrate on at least one token")
    run_dir, checkpoint = find_run_checkpoint(Path(args.run), args.step)
    cfg = read_run_config(run_dir)
    experts = experts_per_moe_layer(cfg)
    if not experts:
        raise CompressError(f"{run_dir} is a dense model (model.num_experts=0); there are no experts to compress")
    keep = keep_counts(args.keep, experts, cfg.router.top_k, cfg.router.num_groups)
    data_cfg = calibration_data(cfg, args.overrides)
    batches = list(calibration_batches(data_cfg, args.tokens, args.seed))  # data problems before the model loads
    cfg, model = load_run_model(checkpoint)
    try:
        stats = calibrate(model, batches, max_inputs=min(args.tokens, 4096))
        compressed = compress_model(cfg, model, stats, args.method, keep, args.seed)
    except ValueError as e:  # e.g. a router with virtual experts
        raise CompressError(str(e)) from None
    written = write_compressed(out, compressed, str(checkpoint))
    r = compressed.report
    print(f"{PROG}: {args.method} kept {keep} of {experts} experts per MoE layer; expert weights "
          f"{r['expert_bytes_before'] / 2**20:.2f} -> {r['expert_bytes_after'] / 2**20:.2f} MiB; wrote {written}")
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    from moetrain.config.validate import ConfigError
    from moetrain.data import DataError
    from moetrain.interop import ConvertError
    from moetrain.parallel.mesh import env_world
    from moetrain.train.checkpoint import CheckpointError

    args = _parser().parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        if env_world()[1] > 1:
            raise CompressError("moetrain-compress runs in one process (it loads every expert); run it without "
                                "torchrun; the result trains under any layout")
        compress_run(args)
    except (CompressError, ConvertError, ConfigError, CheckpointError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
