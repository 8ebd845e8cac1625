"""moetrain-prepare INPUT [INPUT ...] --out DIR [--val-fraction F] [--extensions .txt,.md] [--tokenizer SPEC]

Turns text files or folders (walked recursively, sorted) into token shards for `data=shards data.path=DIR`.
Without --extensions every file that decodes as UTF-8 is used. --tokenizer is `bytes` (the default) or a
tokenizer.json / Hugging Face tokenizer directory; train on the shards with the same `data.tokenizer=SPEC`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from moetrain.data import DataError
from moetrain.data.shards import is_shard_dir, load_shards, write_shards
from moetrain.data.tokenizer import load_tokenizer


def collect_files(inputs: Sequence[str], extensions: Optional[list[str]]) -> list[Path]:
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input {raw} does not exist")
        candidates = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        files += [q for q in candidates if extensions is None or q.suffix in extensions]
    return files


def _utf8_docs(files: list[Path]) -> Iterator[bytes]:
    for f in files:
        data = f.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if data:
            yield data


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moetrain-prepare", description=__doc__.splitlines()[2])
    parser.add_argument("inputs", nargs="+", help="text files or folders")
    parser.add_argument("--out", required=True, help="output shard directory")
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--extensions", default=None, help="comma-separated suffixes, e.g. .txt,.md")
    parser.add_argument("--tokenizer", default="bytes",
                        help="bytes (default) or a tokenizer.json file or Hugging Face tokenizer directory")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        if out.exists() and not is_shard_dir(out):
            raise DataError(f"--out {out} exists and is not a shard directory; choose a new path")
        if not 0 < args.val_fraction < 1:
            raise DataError(f"--val-fraction {args.val_fraction} must be in (0, 1)")
        exts = [e if e.startswith(".") else f".{e}" for e in args.extensions.split(",")] if args.extensions else None
        files = collect_files(args.inputs, exts)
        if not files:
            raise DataError(f"no input files found in {' '.join(args.inputs)}"
                            + (f" with extensions {args.extensions}" if exts else ""))
        if is_shard_dir(out):
            raise DataError(f"--out {out} already holds shards; remove it or choose a new path")
        tokenizer = load_tokenizer(args.tokenizer, option="--tokenizer")
        write_shards(_utf8_docs(files), out, args.val_fraction, tokenizer=tokenizer)
        _, _, meta = load_shards(out, tokenizer)
    except DataError as e:
        print(f"moetrain-prepare: error: {e}", file=sys.stderr)
        return 2
    print(f"prepared {meta['sources']} files: {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens "
          f"({meta['tokenizer']}, vocabulary {meta['vocab_size']:,}, {meta['dtype']}) -> {out}")
    return 0
