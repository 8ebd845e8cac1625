"""Reading and writing Hugging Face safetensors checkpoints one tensor at a time.

A Hugging Face model directory holds `config.json` and either `model.safetensors` or shards listed in
`model.safetensors.index.json` (`{"weight_map": {tensor name: shard file}}`). `HFCheckpoint` opens the files with
safetensors' `safe_open` (memory mapped) and reads one tensor, or one row of a stacked tensor (one expert), when asked:
a conversion never holds a second copy of the model, and a rank that holds some experts reads only those.
`write_safetensors` writes tensors as they come, cutting a new shard when the current one would exceed the limit.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from moetrain.interop import ConvertError

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _safe_open():
    try:
        from safetensors import safe_open
    except ImportError:
        raise ConvertError("reading Hugging Face checkpoints needs the safetensors package; install moetrain with "
                           "`pip install -e .[hf]`") from None
    return safe_open


def read_hf_config(src: Path) -> dict:
    """The parsed `src/config.json`."""
    path = Path(src) / CONFIG_FILE
    if not path.is_file():
        raise ConvertError(f"{src} is not a Hugging Face model directory (no {CONFIG_FILE})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


class HFCheckpoint:
    """The tensors of a Hugging Face model directory, read lazily (see the module docstring)."""

    def __init__(self, src: Path):
        src = Path(src)
        self.src = src
        index, single = src / INDEX_FILE, src / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{index} is not a safetensors index (no weight_map): {e}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ConvertError(f"{index} lists shard {missing[0]}, which is missing from {src}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                   + "; download every shard")
            self.file_of = {key: src / f for key, f in weight_map.items()}
        elif single.is_file():
            self.file_of = None  # filled from the file's own keys below
        else:
            other = [p.name for p in src.glob("*.bin")] + [p.name for p in src.glob("*.pt")]
            hint = f" (found {other[0]}: convert it to safetensors first)" if other else ""
            raise ConvertError(f"{src} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        self._handles: dict[Path, object] = {}
        if self.file_of is None:
            self.file_of = {key: single for key in self._handle(single).keys()}
        else:  # a key the index names must be in its shard
            for path in sorted(set(self.file_of.values())):
                present = set(self._handle(path).keys())
                absent = sorted(k for k, f in self.file_of.items() if f == path and k not in present)
                if absent:
                    raise ConvertError(f"{INDEX_FILE} places {absent[0]} in {path.name}, which does not hold it; "
                                       f"the index and its shards do not match")

    def _handle(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = _safe_open()(str(path), framework="pt", device="cpu")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ConvertError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
                    from None
            self._handles[path] = handle
        return handle

    def keys(self) -> list[str]:
        return sorted(self.file_of)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._handle(self.file_of[key]).get_tensor(key)

    def get_row(self, key: str, row: int) -> torch.Tensor:
        """`tensor[row]` of a stacked tensor, reading only that row."""
        return self._handle(self.file_of[key]).get_slice(key)[row]

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_hf_state(src: Path) -> HFCheckpoint:
    """The checkpoint of the Hugging Face model directory `src` (safetensors, sharded or not), read lazily."""
    return HFCheckpoint(Path(src))


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of "5GB" (10^9), "500MiB" (2^20), or a plain number of bytes, as transformers reads max_shard_size."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ConvertError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ConvertError(f"--max-shard-size {text!r} must be positive")
    return value


def write_safetensors(out: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
                      metadata: Optional[dict] = None) -> list[Path]:
    """Write `(name, tensor)` pairs into `out/model.safetensors`, or, when they exceed `max_shard_bytes`, into
    `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` (the layout transformers writes).
    A shard is written as soon as the next tensor would overflow it; a tensor larger than the limit gets a shard of
    its own. Returns the files written."""
    from safetensors.torch import save_file

    out = Path(out)
    meta = {"format": "pt", **(metadata or {})}
    shards: list[Path] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            path = out / f".shard-{len(shards):05d}.tmp"
            save_file(current, str(path), metadata=meta)
            shards.append(path)
            current, size = {}, 0

    for name, tensor in _checked(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        weight_map[name] = len(shards)
        size += nbytes
        total += nbytes
    flush()
    if len(shards) == 1:
        final = [out / SINGLE_FILE]
    else:
        final = [out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for tmp, path in zip(shards, final):
        os.replace(tmp, path)
    if len(final) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: final[i].name for name, i in sorted(weight_map.items())}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        final.append(out / INDEX_FILE)
    return final


def _checked(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    seen = set()
    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"tensor {name} is written twice")
        seen.add(name)
        yield name, tensor
