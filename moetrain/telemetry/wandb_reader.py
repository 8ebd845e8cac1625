"""Read the history of an offline wandb run back from its `run-<id>.wandb` file.

wandb 0.31 has no public offline reader, so this parses the file directly. Layout (checked against files written by
wandb 0.31; it matches the LevelDB log format that wandb's former `sdk/internal/datastore.py` implemented):

    file header, 7 bytes:   b":W&B"  magic u16 = 0xBEE1  version u8 = 0            (little endian)
    then 32 KiB blocks; the first block's 7 header bytes count towards it. Each block holds records:
    record header, 7 bytes: crc u32, length u16, type u8                         (little endian)
        crc  = zlib.crc32(bytes([type]) + payload)   (plain IEEE CRC-32, not LevelDB's masked CRC-32C)
        type = FULL 1 | FIRST 2 | MIDDLE 3 | LAST 4  (a message split over blocks is FIRST MIDDLE* LAST)
    a block tail shorter than a record header is zero padding.
    A reassembled payload is one serialized `wandb.proto.wandb_internal_pb2.Record`.

History records (`record.history`) carry `item`s with `key` (or `nested_key`, a path) and `value_json`. Each history
record becomes one dict with values decoded from JSON and `_step` always present. A dict value is stored flattened,
one item per leaf with the path in `nested_key`; it is rebuilt as a nested dict, so media values come back as their
JSON descriptions, e.g. `row["moe/layer0/tokens_per_expert"] == {"_type": "histogram", "values": [...], "bins": [...]}`.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Iterator, Union

__all__ = ["read_offline_history", "find_wandb_file", "iter_records", "wait_until_finished"]

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1, 0
RECORD_HEADER = struct.Struct("<IHB")
BLOCK_LEN = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_wandb_file(path: Union[str, Path]) -> Path:
    """The `.wandb` file for a file path, an `offline-run-*` dir, a `wandb/` dir, or a run dir holding `wandb/`.

    Several offline runs under one directory: the most recently modified file wins.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no such wandb file or directory: {path}")
    for pattern in ("run-*.wandb", "offline-run-*/run-*.wandb", "wandb/offline-run-*/run-*.wandb"):
        found = sorted(path.glob(pattern), key=lambda p: (p.stat().st_mtime, p.name))
        if found:
            return found[-1]
    raise FileNotFoundError(f"no wandb/offline-run-*/run-*.wandb under {path}")


def _payloads(data: bytes, name: str) -> Iterator[bytes]:
    """Reassembled record payloads; a truncated last record (a run still writing, or killed) ends the iteration."""
    if len(data) < FILE_HEADER.size:
        raise ValueError(f"{name}: too short for a wandb file header")
    ident, magic, version = FILE_HEADER.unpack_from(data, 0)
    if ident != FILE_IDENT or magic != FILE_MAGIC or version != FILE_VERSION:
        raise ValueError(f"{name}: not a wandb offline run file (header {ident!r} {magic:#x} v{version})")
    off, parts = FILE_HEADER.size, None
    while off + RECORD_HEADER.size <= len(data):
        block_left = BLOCK_LEN - off % BLOCK_LEN
        if block_left < RECORD_HEADER.size:
            off += block_left  # zero padding at the end of a block
            continue
        crc, length, rtype = RECORD_HEADER.unpack_from(data, off)
        start = off + RECORD_HEADER.size
        if rtype == 0 and length == 0 and crc == 0:  # zero padding (preallocated or block tail)
            off += block_left
            continue
        if start + length > len(data):
            return
        chunk = data[start : start + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([rtype]))) != crc:
            raise ValueError(f"{name}: CRC mismatch in the record at byte {off}")
        off = start + length
        if rtype == FULL:
            parts = None
            yield chunk
        elif rtype == FIRST:
            parts = [chunk]
        elif rtype == MIDDLE and parts is not None:
            parts.append(chunk)
        elif rtype == LAST and parts is not None:
            parts.append(chunk)
            yield b"".join(parts)
            parts = None
        elif rtype not in (MIDDLE, LAST):
            raise ValueError(f"{name}: unknown record type {rtype} at byte {off}")


def iter_records(wandb_file: Union[str, Path]):
    """All `wandb_internal_pb2.Record` messages of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    path = Path(wandb_file)
    for payload in _payloads(path.read_bytes(), str(path)):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def wait_until_finished(wandb_file: Union[str, Path], timeout_s: float = 60.0) -> bool:
    """Poll until the run's `exit` record is on disk (wandb's writer may lag `finish()` under load); True if seen."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if any(r.WhichOneof("record_type") == "exit" for r in iter_records(wandb_file)):
                return True
        except (OSError, ValueError):
            pass  # partially written: try again
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def read_offline_history(run_dir_or_wandb_file: Union[str, Path]) -> list[dict]:
    """One dict per history row (`{"_step": ..., "_runtime": ..., "loss": ..., ...}`) of an offline wandb run."""
    rows = []
    for record in iter_records(find_wandb_file(run_dir_or_wandb_file)):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            path = [item.key] if item.key else list(item.nested_key)
            node = row
            for part in path[:-1]:  # a dict value (media, nested dict) arrives flattened into one item per leaf
                node = node.setdefault(part, {})
            node[path[-1]] = json.loads(item.value_json)
        row.setdefault("_step", int(record.history.step.num))
        rows.append(row)
    return rows
