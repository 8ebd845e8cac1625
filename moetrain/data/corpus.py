"""The embedded default corpus: the Python standard library's own .py sources, present on every Python install.

Files are taken in sorted relative-path order (deterministic), joined with NUL separators, truncated to max_bytes and
prepared once into shards under <cache_dir or ~/.cache/moetrain>/stdlib-py<X.Y>-<max_bytes>-<val_fraction>/.
With a Hugging Face tokenizer (data.tokenizer) the same text is tokenized once, cached in a directory whose name
ends with the tokenizer's identity (`...-hf-<sha256 prefix>-<vocab>`).
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from moetrain.data import DataError
from moetrain.data.shards import is_shard_dir, write_shards
from moetrain.data.tokenizer import Tokenizer

SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo",
             "ensurepip", "venv", "tkinter", "pydoc_data"}


def stdlib_files() -> list[Path]:
    """The corpus files. The walk prunes SKIP_DIRS instead of filtering afterwards, so it never enters
    site-packages: a package being installed or removed meanwhile can neither change nor break it."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docs(files: list[Path]) -> Iterator[bytes]:
    for f in files:
        try:
            yield f.read_bytes()
        except OSError:
            continue


def stdlib_shards(cache_dir: Optional[str], max_bytes: int, val_fraction: float,
                  tokenizer: Optional[Tokenizer] = None) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "moetrain"
    out = base / f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{max_bytes}-{val_fraction}"
    if tokenizer is not None and tokenizer.identity != "bytes":
        out = out.with_name(out.name + "-" + tokenizer.identity.replace(":", "-"))
    if is_shard_dir(out):
        return out
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the corpus cache {base} ({e.strerror}); set data.cache_dir=WRITABLE_DIR") from None
    files = stdlib_files()
    if not files:
        raise DataError("no standard-library sources found on this Python; use data=shards data.path=DIR")
    return write_shards(_docs(files), out, val_fraction, max_bytes=max_bytes, tokenizer=tokenizer)
