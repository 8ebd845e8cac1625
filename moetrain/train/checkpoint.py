"""Atomic, reshardable training checkpoints built on torch.distributed.checkpoint (DCP).

Layout of one checkpoint directory `root/step_<8 digits>/`:

* DCP files (`.metadata`, `__<rank>_<n>.distcp`) holding a flat dict of tensors:
    - `model/<fqn>`                              dense parameters and persistent buffers (`model.state_dict()` keys),
    - `model/<fqn>/expert/<global id>`           one entry per expert row of an expert parameter,
    - `optim/<fqn>/<state key>`                  optimizer state of dense parameters (AdamW: exp_avg, exp_avg_sq,
                                                 step) and the unsplit state of expert parameters (0-dim `step`),
    - `optim/<fqn>/<state key>/expert/<id>`      per-expert rows of expert-parameter optimizer state,
    - `extra/<name>`                             caller tensors (trainer step, data position, RNG states, ...).
* `moetrain.json` (rank 0): optimizer param_groups hyper-parameters (lr, betas, ...), scheduler state and the
  caller's `trainer_state` (plain JSON). No pickles.
* `checksums.json` (rank 0): size and CRC-32 of every other file, gathered from the ranks that wrote them.
* `COMPLETE`: written last, before the directory gets its final name.

Expert parameters are the parameters with an `expert_ids: list[int]` attribute: dim 0 indexes experts and
`expert_ids[i]` is the global id of row i. Entries are keyed by global id, so a checkpoint written under one expert
placement (ep=2, ep=4, arbitrary ids) loads under any other that covers the same experts. Ranks holding the same
key (dense replicas, replicated experts) write it once: DCP's save planner deduplicates identical keys.
Under FSDP2 (parallel/fsdp.py) parameters and their optimizer state are DTensors: dense ones are saved as DTensors
(DCP stores the global tensor, so they load as plain tensors or under another sharding and back); an expert
DTensor is sharded on dim 0 only (whole experts), and each rank saves and loads the rows of its local shard under
their global ids, so expert entries are the same whatever the layout.

Saving is atomic: all ranks write `step_N.tmp/` and checksum the files they wrote, then rank 0 writes the manifest,
marks the directory COMPLETE, renames it to `step_N/`, points `root/latest` at it and prunes old checkpoints. An
interrupted save leaves only a `.tmp` directory, which `find_latest` ignores and the next successful save removes; a
failed write (disk full, I/O error) removes it at once. Non-finite model weights are refused before anything is written.

`verify_checkpoint` re-reads every file against the manifest (ranks share the work); `load_checkpoint` verifies
before loading, and `find_latest_valid` returns the newest checkpoint that verifies. Every failure reaches every rank
as the same one-line CheckpointError. See docs/checkpoints.md.

Loading never unpickles arbitrary objects; see `moetrain.train.safe_metadata`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import sys
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from moetrain.train.safe_metadata import (METADATA_FILE, CheckpointError, SafeFileSystemReader, SafeLoadPlanner,
                                          one_line, read_metadata_safely)

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "find_latest", "find_latest_valid",
           "verify_checkpoint", "read_trainer_state", "checkpoint_dir_name", "file_checksum"]

COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
META_FILE = "moetrain.json"
CHECKSUMS_FILE = "checksums.json"
CHECKSUM = "crc32"  # zlib.crc32: the fastest stdlib checksum measured here (docs/checkpoints.md)
CHUNK_BYTES = 16 << 20  # files are checksummed in chunks of this size, so memory use stays flat
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_EXPERT = "/expert/"


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_dir_name(step: int) -> str:
    """Directory name of the checkpoint of `step`, e.g. `step_00001000`."""
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scheduler: Any = None, extra: dict[str, torch.Tensor] | None = None, keep: int = 2, *,
                    trainer_state: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of `step` to `root/step_<8 digits>` atomically and return its path.

    Collective: every rank of the default process group (if one is initialised) must call it. Dense entries must
    have the same keys on all ranks; expert entries exist only on the ranks holding that expert. `extra` tensors are
    treated like dense entries: a name present on several ranks is written once, so give per-rank values
    (e.g. per-rank RNG states) per-rank names such as `rng/cpu/rank3`. An optimizer without state is initialised
    (DCP's `get_optimizer_state_dict` takes a zero-lr step) so that its state can be written. `trainer_state` (rank
    0's copy) is stored as JSON in moetrain.json; read it back with `read_trainer_state`.

    Before anything is written, every rank checks that its model state is finite; a NaN/inf anywhere raises
    CheckpointError on every rank. Every rank checksums the files it wrote and rank 0 records them in
    `checksums.json` before marking the directory COMPLETE. A failed write (disk full included) removes the partial
    `.tmp` directory and raises CheckpointError on every rank; older checkpoints are never touched by a failed save.

    After the write, rank 0 keeps the newest `keep` complete checkpoints (by step) plus the one just written and
    deletes the others, and removes `.tmp` directories left by interrupted saves. Checkpoints this process found
    damaged (`verify_checkpoint`, `find_latest_valid`) do not count towards `keep`.
    """
    if keep < 1:
        raise CheckpointError(f"keep={keep} would delete the checkpoint just written; pass keep >= 1")
    if step < 0:
        raise CheckpointError(f"step={step} is negative; checkpoints are named by a non-negative training step")
    root = Path(root)
    name = checkpoint_dir_name(step)
    final, tmp = root / name, root / f"{name}.tmp"

    def prepare() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        bad = _first_non_finite(model)
        if bad is not None:
            raise CheckpointError(f"refusing to write checkpoint {final}: model weight {bad} holds NaN/inf; "
                                  f"{_previous_note(root)}")
        osd = get_optimizer_state_dict(model, optimizer) if optimizer is not None else None
        state = _model_entries(model)
        if osd is not None:
            state.update(_optim_entries(osd, _expert_ids(model)))
        state.update(_extra_entries(extra))
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "param_groups": None if osd is None else [
                _to_json(group, f"optimizer param_groups[{i}]") for i, group in enumerate(osd["param_groups"])],
            "scheduler": None if scheduler is None else _to_json(scheduler.state_dict(), "scheduler state"),
            "extra": sorted(extra or {}),
            "trainer": _check_trainer_state(trainer_state),
            "checksums": CHECKSUMS_FILE,
        }
        return state, meta

    state, meta = _run_on_all_ranks(f"preparing checkpoint {final}", prepare)
    # Start from an empty directory; the other ranks wait for rank 0 here.
    _run_on_all_ranks(f"preparing checkpoint {final}", lambda: _fresh_directory(tmp, final, root))
    try:
        sums = _write_shards(state, tmp, final, root)
        _collect_on_all_ranks(f"finalizing checkpoint {final}", lambda: _seal(tmp, final, root, meta, sums))
    except CheckpointError:
        if _rank() == 0:  # the other ranks have left DCP: nothing writes into tmp any more
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _run_on_all_ranks(f"finalizing checkpoint {final}", lambda: _publish(tmp, final, root, keep))
    return final


def find_latest(root: Path, verify: bool = False) -> Path | None:
    """The newest complete checkpoint under `root`, or None if there is none.

    The `root/latest` pointer wins when it names a complete checkpoint; otherwise (missing, stale or corrupt
    pointer) the complete checkpoint with the highest step is returned. `.tmp` directories are never returned.
    Nothing is read but directory entries and the pointer; `verify=True` is `find_latest_valid(root)`.
    """
    if verify:
        return find_latest_valid(root)
    root = Path(root)
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and (root / name / COMPLETE_FILE).is_file():
        return root / name
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def find_latest_valid(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` that passes `verify_checkpoint`, or None if there is none.

    Candidates are tried in `find_latest`'s order (the `latest` pointer's target first, then by step, newest
    first). Rank 0 prints one `moetrain: ` line to stderr for a stale or unreadable pointer and for every damaged
    checkpoint it skips. Collective under a process group (the ranks share the verification); every rank gets the
    same answer. Raises CheckpointError when complete checkpoints exist but none verifies: starting from scratch
    is then the user's decision, not a silent fallback.
    """
    root = Path(root)
    candidates, notes = _collect_on_all_ranks(f"looking for checkpoints in {root}",
                                              lambda: _candidates(root) if _rank() == 0 else None)[0]
    for note in notes:
        _say(note)
    newest_problem = None
    for i, path in enumerate(candidates):
        reason = _verify(path)
        if reason is None:
            return path
        newest_problem = newest_problem or f"{path}: {reason}"
        then = "falling back to an older one" if i + 1 < len(candidates) else "no older checkpoint is left"
        _say(f"skipping checkpoint {path}: {reason}; {then}")
    if candidates:
        raise CheckpointError(f"no intact checkpoint in {root}: all {len(candidates)} complete checkpoints are "
                              f"damaged (newest: {newest_problem}); move them away to start from scratch")
    return None


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint directory `path` is intact, else one line: `PATH: what is wrong`.

    Checks the COMPLETE marker, that `.metadata` and `moetrain.json` parse, and every file's size and CRC-32
    against `checksums.json`. Checkpoints written before checksums existed (no manifest, and moetrain.json does
    not announce one) are checked structurally only: every file `.metadata` names exists and is long enough.
    Collective under a process group: rank r checksums the files with index % world_size == r and the verdicts are
    combined, so every rank returns the same answer.
    """
    path = Path(path)
    reason = _verify(path)
    return None if reason is None else f"{path}: {reason}"


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The `trainer_state` stored with the checkpoint `path` (an empty dict if it was saved without one)."""
    path = Path(path)
    state = _read_meta(path).get("trainer")
    if state is not None and not isinstance(state, dict):
        raise CheckpointError(f"{path / META_FILE} holds a {type(state).__name__} as trainer state, not an object; "
                              "the checkpoint is corrupt")
    return state or {}


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, extra: dict[str, torch.Tensor] | None = None, *,
                    verify: bool = True) -> None:
    """Load the checkpoint directory `path` in place into `model` (and `optimizer`, `scheduler`, `extra`).

    Collective when a process group is initialised. Expert rows are looked up by global id, so any expert
    placement that the checkpoint covers can be loaded. Only the parts passed are loaded (e.g. optimizer=None
    loads the weights only); everything asked for must be in the checkpoint, or CheckpointError names the first
    missing entry and the checkpoint.

    With `verify` (the default) the checkpoint is first checked with `verify_checkpoint` (which re-reads it once;
    pass verify=False right after `find_latest_valid`, which has just done so). A damaged checkpoint, or any error
    while DCP reads it, raises the same one-line CheckpointError on every rank.

    `extra` maps names to destination tensors. A destination with the stored shape and dtype is filled in place;
    any other destination (e.g. an empty tensor for a variable-size RNG state) is *replaced in the dict* by a new
    tensor with the stored shape and dtype, so read the results from the dict after the call.
    """
    path = Path(path)

    def prepare() -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, Any]]:
        osd = get_optimizer_state_dict(model, optimizer) if optimizer is not None else None
        if path.name.endswith(".tmp") or not (path / COMPLETE_FILE).is_file():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_FILE} marker): its save was "
                                  "interrupted or it is not a checkpoint directory; use find_latest(root)")
        metadata = read_metadata_safely(path)
        meta = _read_meta(path)
        state = _model_entries(model)
        if osd is not None:
            if meta["param_groups"] is None:
                raise CheckpointError(f"checkpoint {path} was saved without an optimizer; "
                                      "pass optimizer=None to load the model only")
            state.update(_optim_entries(osd, _expert_ids(model)))
            _apply_param_groups(osd, meta["param_groups"], path)
        if scheduler is not None and meta["scheduler"] is None:
            raise CheckpointError(f"checkpoint {path} has no scheduler state; pass scheduler=None")
        if extra:
            _fit_extra_destinations(extra, metadata)
            state.update(_extra_entries(extra))
        _check_entries(state, metadata, path)
        return state, osd, meta

    try:
        state, osd, meta = _run_on_all_ranks(f"loading checkpoint {path}", prepare)
    except CheckpointError as error:
        if verify:  # a damaged .metadata can look like a model mismatch: say so if it is damaged
            _raise_if_damaged(path, str(error))
        raise
    if verify:
        _raise_if_damaged(path)
        if not (path / CHECKSUMS_FILE).is_file():
            _say(f"checkpoint {path} predates checksums: its files were checked to exist, their contents were "
                 "not verified")
    _read_shards(state, path)
    if osd is not None:
        set_optimizer_state_dict(model, optimizer, osd)
    if scheduler is not None:
        scheduler.load_state_dict(_from_json(meta["scheduler"]))


# ----------------------------------------------------------------------------------------------------------------
# State dict entries
# ----------------------------------------------------------------------------------------------------------------


def _expert_ids(model: nn.Module) -> dict[str, list[int]]:
    """fqn -> global expert ids of the dim-0 rows, for every parameter carrying `expert_ids`."""
    out: dict[str, list[int]] = {}
    for fqn, param in model.named_parameters(remove_duplicate=False):
        ids = getattr(param, "expert_ids", None)
        if ids is None:
            continue
        if type(param.data) is not torch.Tensor and not _rows_sharded(param):
            raise CheckpointError(f"expert parameter {fqn!r} is a {type(param.data).__name__}; expert parameters "
                                  "must be plain local tensors or DTensors sharded on dim 0 only (whole experts)")
        ids = [int(i) for i in ids]
        if param.dim() == 0 or len(ids) != param.shape[0]:
            raise CheckpointError(f"expert parameter {fqn!r} has shape {list(param.shape)} but {len(ids)} "
                                  "expert_ids; expert_ids must give the global id of every dim-0 row")
        if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
            raise CheckpointError(f"expert parameter {fqn!r} has invalid expert_ids {ids}: "
                                  "ids must be distinct non-negative global expert ids")
        out[fqn] = ids
    return out


def _rows_sharded(value: Any) -> bool:
    """Whether `value` is a DTensor whose placements shard dim 0 only (and replicate otherwise)."""
    placements = getattr(value, "placements", None)
    return (placements is not None and hasattr(value, "to_local")
            and all(p.is_replicate() or (p.is_shard() and p.dim == 0) for p in placements))


def _local_rows(value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows, the global index of the first): a plain tensor is all rows; a DTensor sharded on dim 0
    gives its local shard (no copy) and where the shard starts."""
    if not hasattr(value, "to_local"):
        return value, 0
    if not _rows_sharded(value):
        raise CheckpointError(f"expert tensor sharded as {list(value.placements)}; expert tensors may only be "
                              "sharded on dim 0 (whole experts)")
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
    return value.to_local(), int(offset[0]) if len(offset) else 0


def _split(prefix: str, value: torch.Tensor, ids: list[int] | None, out: dict[str, torch.Tensor]) -> None:
    """Add `value` under `prefix`, or one row view per expert under `prefix/expert/<id>` for expert tensors (of a
    DTensor sharded by rows, the rows of this rank's shard)."""
    if ids is None or value.dim() == 0:
        out[prefix] = value
        return
    if value.shape[0] != len(ids):
        raise CheckpointError(f"{prefix!r} has {value.shape[0]} rows but its parameter has {len(ids)} expert_ids")
    local, first = _local_rows(value)
    for row in range(local.shape[0]):
        out[f"{prefix}{_EXPERT}{ids[first + row]}"] = local[row]


def _model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    experts = _expert_ids(model)
    out: dict[str, torch.Tensor] = {}
    for fqn, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"model state {fqn!r} is a {type(value).__name__}; only tensors can be "
                                  "checkpointed (store other state as a buffer or pass it in `extra`)")
        _split(f"model/{fqn}", value.detach(), experts.get(fqn), out)
    return out


def _first_non_finite(model: nn.Module) -> str | None:
    """Name of the first floating-point tensor of `model.state_dict()` (this rank's part) holding NaN or inf."""
    for fqn, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue
        local = value.to_local() if hasattr(value, "to_local") else value  # DTensor: check this rank's shard
        if (local.is_floating_point() or local.is_complex()) and not bool(torch.isfinite(local).all()):
            return fqn
    return None


def _optim_entries(osd: dict[str, Any], experts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for fqn, param_state in osd["state"].items():
        for key, value in param_state.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"optimizer state {fqn!r}[{key!r}] is a {type(value).__name__}; only tensor "
                                      "optimizer state can be checkpointed")
            _split(f"optim/{fqn}/{key}", value, experts.get(fqn), out)
    return out


def _extra_entries(extra: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in (extra or {}).items():
        if not isinstance(name, str) or not name or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"extra[{name!r}] must be a tensor under a non-empty string name, "
                                  f"got {type(value).__name__}; wrap numbers with torch.tensor(...)")
        out[f"extra/{name}"] = value.detach()
    return out


def _fit_extra_destinations(extra: dict[str, torch.Tensor], metadata: Metadata) -> None:
    """Replace `extra` destinations whose shape or dtype differ from the stored entry by fresh tensors."""
    for name, value in extra.items():
        md = metadata.state_dict_metadata.get(f"extra/{name}")
        if not isinstance(md, TensorStorageMetadata) or not isinstance(value, torch.Tensor):
            continue  # reported by _check_entries / _extra_entries
        if value.shape != md.size or value.dtype != md.properties.dtype:
            extra[name] = torch.empty(md.size, dtype=md.properties.dtype)


def _check_entries(state: dict[str, torch.Tensor], metadata: Metadata, path: Path) -> None:
    stored = metadata.state_dict_metadata
    hints = {"model": "was it written by a different model config?",
             "optim": "was it written with a different optimizer or model config?",
             "extra": f"it holds extra entries {sorted(k[6:] for k in stored if k.startswith('extra/'))}"}
    for key, value in state.items():
        kind = key.split("/", 1)[0]
        md = stored.get(key)
        if md is None:
            hint = hints[kind]
            if _EXPERT in key:
                prefix = key.rsplit(_EXPERT, 1)[0] + _EXPERT
                held = sorted(int(k[len(prefix):]) for k in stored if k.startswith(prefix))
                hint = f"it holds experts {held} of this tensor; was it written with a different number of experts?"
            raise CheckpointError(f"{kind} mismatch: checkpoint {path} has no entry for {key!r}; {hint}")
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{kind} mismatch: entry {key!r} of checkpoint {path} is not a tensor; "
                                  "moetrain checkpoints only hold tensors (was it written by another tool?)")
        if md.size != value.shape:
            raise CheckpointError(f"{kind} mismatch: entry {key!r} has shape {list(md.size)} in checkpoint {path} "
                                  f"but {list(value.shape)} here; was it written by a different model config?")


# param_groups keys that choose how this run's optimizer computes, not what: kept from the optimizer being loaded
# into (a run whose FSDP layout mixes DTensors and plain tensors cannot use the foreach kernels another layout saved).
_IMPLEMENTATION_KEYS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def _apply_param_groups(osd: dict[str, Any], saved: list[dict[str, Any]], path: Path) -> None:
    """Overwrite the hyper-parameters of `osd`'s param_groups with the saved ones (groups matched by position),
    except the implementation choices (`_IMPLEMENTATION_KEYS`)."""
    groups = osd["param_groups"]
    if len(saved) != len(groups):
        raise CheckpointError(f"optimizer mismatch: checkpoint {path} has {len(saved)} param groups, the optimizer "
                              f"has {len(groups)}; build the optimizer with the same parameter groups")
    for i, (group, saved_group) in enumerate(zip(groups, saved)):
        if set(group["params"]) != set(saved_group["params"]):
            raise CheckpointError(f"optimizer mismatch: param group {i} of checkpoint {path} holds different "
                                  "parameters than the optimizer's; build the optimizer with the same groups")
        group.update({k: _from_json(v) for k, v in saved_group.items()
                      if k != "params" and k not in _IMPLEMENTATION_KEYS})


# ----------------------------------------------------------------------------------------------------------------
# JSON side file (hyper-parameters, scheduler state)
# ----------------------------------------------------------------------------------------------------------------


def _to_json(value: Any, where: str) -> Any:
    """JSON-compatible form of `value`; tuples and tensors are tagged so that they come back as such."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"__tensor__": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, where) for v in value]}
    if isinstance(value, list):
        return [_to_json(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _to_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    raise CheckpointError(f"{where} holds a {type(value).__name__}, which cannot be checkpointed; only numbers, "
                          "strings, lists, tuples, string-keyed dicts and tensors are supported")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if "__tuple__" in value:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if "__tensor__" in value:
            dtype = getattr(torch, value["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"unknown tensor dtype {value['dtype']!r} in {META_FILE}")
            return torch.tensor(value["__tensor__"], dtype=dtype)
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / META_FILE}: {one_line(e)}; the checkpoint is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META_FILE} is not a format-{FORMAT_VERSION} moetrain checkpoint file")
    return meta


def _check_trainer_state(state: dict[str, Any] | None) -> dict[str, Any] | None:
    """`state` unchanged if it is plain JSON (it is stored as such and must come back equal), else CheckpointError."""
    if state is None:
        return None
    if not isinstance(state, dict):
        raise CheckpointError(f"trainer_state is a {type(state).__name__}; pass a dict of plain JSON values")
    _check_plain_json(state, "trainer_state")
    return state


def _check_plain_json(value: Any, where: str) -> None:
    """Raise CheckpointError naming the first part of `value` that would not survive a JSON round trip."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{where} is {value}, which JSON cannot store; store a finite number or None")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where} has the {type(key).__name__} key {key!r}; JSON keys are strings, "
                                      "so convert it with str()")
            _check_plain_json(item, f"{where}[{key!r}]")
        return
    raise CheckpointError(f"{where} is a {type(value).__name__}, which cannot be stored as JSON; use dicts with "
                          "string keys, lists, strings, numbers, booleans and None")


# ----------------------------------------------------------------------------------------------------------------
# Files and directories
# ----------------------------------------------------------------------------------------------------------------


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint directory under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _candidates(root: Path) -> tuple[list[Path], list[str]]:
    """Complete checkpoints in `find_latest` order (pointer target first, then newest step first), and a note when
    a `latest` pointer exists but names no complete checkpoint."""
    order = [path for _, path in reversed(_complete_checkpoints(root))]
    pointer = root / LATEST_FILE
    if not pointer.exists():
        return order, []
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        return order, [f"ignoring {pointer}: it is unreadable ({type(e).__name__}); using the newest step"]
    target = root / name if _STEP_DIR.match(name) else None
    if target not in order:
        return order, [f"ignoring {pointer}: it names {name[:80]!r}, which is not a complete checkpoint; "
                       "using the newest step"]
    order.remove(target)
    return [target, *order], []


def _previous_note(root: Path) -> str:
    """'the previous checkpoint step_N is intact' for the checkpoint `find_latest` would resume from."""
    previous = find_latest(root)
    if previous is None:
        return "there is no previous checkpoint"
    return f"the previous checkpoint {previous.name} is intact"


def _mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path` (or the nearest existing parent of it)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _no_space_message(final: Path, root: Path) -> str:
    return (f"no space left on {_mount_point(root)} while writing checkpoint {final}; {_previous_note(root)}; "
            "free space there (or lower keep) and save again")


@contextlib.contextmanager
def _disk_full_is_reported(final: Path, root: Path) -> Iterator[None]:
    """Turn an OSError(ENOSPC) raised in the block into the one-line CheckpointError of a full disk."""
    try:
        yield
    except OSError as e:
        if _has_errno(e, errno.ENOSPC):
            raise CheckpointError(_no_space_message(final, root)) from e
        raise


def _fresh_directory(tmp: Path, final: Path, root: Path) -> None:
    """Rank 0: create `tmp` empty (removing what an interrupted save left there)."""
    if _rank() != 0:
        return
    with _disk_full_is_reported(final, root):
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()


def _publish(tmp: Path, final: Path, root: Path, keep: int) -> None:
    """Rank 0: rename the sealed `tmp` to `final`, point `latest` at it and prune. A previous copy of the same step
    is moved aside first and put back if the rename fails."""
    _DAMAGED.discard(_key(final))
    if _rank() != 0:
        return
    old = None
    if final.exists():  # re-saving a step: move the old copy out of the way (a .tmp name is never loaded)
        old = root / f"{final.name}.replaced.tmp"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    _fsync_dir(root)
    _write_synced(root / f"{LATEST_FILE}.tmp", f"{final.name}\n")
    os.replace(root / f"{LATEST_FILE}.tmp", root / LATEST_FILE)
    _fsync_dir(root)
    _prune(root, keep, final)


def _prune(root: Path, keep: int, current: Path) -> None:
    """Delete complete checkpoints other than `current` and the newest `keep` intact ones, and stale `.tmp`
    directories. Checkpoints this process found damaged do not count towards `keep` (so pruning after a fallback
    never leaves fewer intact checkpoints than asked for) and are deleted once they fall outside it."""
    complete = [path for _, path in _complete_checkpoints(root)]
    intact = [path for path in complete if path == current or _key(path) not in _DAMAGED]
    protected = {current, *intact[-keep:]}
    for path in complete:
        if path not in protected:
            doomed = path.with_name(f"{path.name}.deleting.tmp")  # a crash mid-delete leaves an ignored .tmp dir
            os.replace(path, doomed)
    for entry in root.iterdir():
        if entry.name.startswith("step_") and entry.name.endswith(".tmp") and entry.is_dir():
            shutil.rmtree(entry)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync directories; the data files are synced anyway
        pass
    finally:
        os.close(fd)


def _say(message: str) -> None:
    """Print `moetrain: message` to stderr on rank 0."""
    if _rank() == 0:
        print(f"moetrain: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Checksums and verification
# ----------------------------------------------------------------------------------------------------------------

# Checkpoints (resolved paths) that verification found damaged in this process; `_prune` does not count them.
_DAMAGED: set[str] = set()
_NOT_COMPLETE = f"it has no {COMPLETE_FILE} marker (its save was interrupted or it is not a checkpoint)"


def _key(path: Path) -> str:
    return str(Path(path).resolve())


def file_checksum(path: Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of the file `path`, read in CHUNK_BYTES chunks into one reused buffer."""
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    size = crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, crc


def _checksum_entry(path: Path) -> dict[str, int]:
    size, crc = file_checksum(path)
    return {"size": size, CHECKSUM: crc}


def _own_files(directory: Path, rank: int) -> list[str]:
    """The files DCP's FileSystemWriter wrote on `rank`: `__<rank>_<n>.distcp`, and `.metadata` on rank 0."""
    names = [p.name for p in directory.iterdir() if p.name.startswith(f"__{rank}_") and p.name.endswith(".distcp")]
    return sorted(names) + ([METADATA_FILE] if rank == 0 else [])


def _seal(tmp: Path, final: Path, root: Path, meta: dict[str, Any], sums: list[dict[str, Any]]) -> None:
    """Rank 0: write moetrain.json, then the manifest of every file (the ranks' checksums, plus rank 0's of any file
    none of them reported), then COMPLETE; all synced."""
    if _rank() != 0:
        return
    with _disk_full_is_reported(final, root):
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=1))
        files = {name: entry for rank_sums in sums for name, entry in rank_sums.items()}
        for entry in sorted(tmp.iterdir()):
            if entry.is_file() and entry.name not in files:
                files[entry.name] = _checksum_entry(entry)
        manifest = {"format": 1, "algorithm": CHECKSUM, "files": dict(sorted(files.items()))}
        _write_synced(tmp / CHECKSUMS_FILE, json.dumps(manifest, indent=1))
        _write_synced(tmp / COMPLETE_FILE, f"{final.name}\n")
        _fsync_dir(tmp)


def _verify(path: Path) -> str | None:
    """Collective core of `verify_checkpoint`: what is wrong with `path` (same on every rank), or None."""

    def check() -> tuple[str | None, tuple[int, str] | None]:
        try:
            problem, files = _check_structure(path)
        except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be checked is not intact
            return f"it cannot be checked ({_describe(e)})", None
        if problem is not None:
            return problem, None
        world = dist.get_world_size() if _distributed() else 1
        for index, (name, expected) in enumerate(files):
            if index % world == _rank():
                problem = _check_file(path, name, expected)
                if problem is not None:
                    return None, (index, problem)
        return None, None

    results = _collect_on_all_ranks(f"verifying checkpoint {path}", check)
    structural = [problem for problem, _ in results if problem is not None]
    files = sorted(found for _, found in results if found is not None)
    reason = structural[0] if structural else (files[0][1] if files else None)
    if reason is None:
        _DAMAGED.discard(_key(path))
    else:
        _DAMAGED.add(_key(path))
    return reason


def _check_structure(path: Path) -> tuple[str | None, list[tuple[str, dict[str, int]]]]:
    """(problem, []) or (None, the manifest's data files to checksum). Checks the marker, the manifest, and that
    `.metadata` and moetrain.json are intact and parse; without a manifest, that the files .metadata names exist."""
    if not path.is_dir():
        return "it is not a directory", []
    if path.name.endswith(".tmp") or not (path / COMPLETE_FILE).is_file():
        return _NOT_COMPLETE, []
    manifest, problem = _read_manifest(path)
    if problem is not None:
        return problem, []
    for name in (METADATA_FILE, META_FILE) if manifest is not None else ():
        if name not in manifest:
            return f"{CHECKSUMS_FILE} does not list {name}", []
        problem = _check_file(path, name, manifest[name])
        if problem is not None:
            return problem, []
    if not (path / METADATA_FILE).is_file():
        return f"it has no {METADATA_FILE} file", []
    try:
        metadata = read_metadata_safely(path)
        meta = _read_meta(path)
    except CheckpointError as e:
        return one_line(e), []
    if manifest is None:
        if meta.get("checksums"):
            return f"no checksums manifest: {CHECKSUMS_FILE} is missing", []
        return _check_named_files(path, metadata), []
    for name in sorted({info.relative_path for info in (metadata.storage_data or {}).values()}):
        if name not in manifest:
            return f"{CHECKSUMS_FILE} does not list {name}, which {METADATA_FILE} names", []
    return None, [(n, e) for n, e in manifest.items() if n not in (METADATA_FILE, META_FILE)]


def _read_manifest(path: Path) -> tuple[dict[str, dict[str, int]] | None, str | None]:
    """(file name -> {"size", "crc32"}, None), (None, None) without a manifest, or (None, what is wrong with it)."""
    file = path / CHECKSUMS_FILE
    if not file.exists():
        return None, None
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        return None, f"{CHECKSUMS_FILE} is unreadable ({type(e).__name__}: {one_line(e)})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("algorithm") != CHECKSUM:
        return None, f"{CHECKSUMS_FILE} is not a {CHECKSUM} manifest"
    for name, entry in files.items():
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            return None, f"{CHECKSUMS_FILE} names a file outside the checkpoint ({name[:80]!r})"
        if (not isinstance(entry, dict) or not all(type(entry.get(k)) is int for k in ("size", CHECKSUM))
                or entry["size"] < 0):
            return None, f"{CHECKSUMS_FILE} has a malformed entry for {name}"
    return dict(sorted(files.items())), None


def _check_file(path: Path, name: str, expected: dict[str, int]) -> str | None:
    """What is wrong with file `name` of `path` against its manifest entry, or None."""
    file = path / name
    try:
        size = file.stat().st_size
        if size == expected["size"]:
            size, crc = file_checksum(file)
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} is unreadable ({e.strerror or type(e).__name__})"
    if size < expected["size"]:
        return f"{name} is truncated ({size} of {expected['size']} bytes)"
    if size > expected["size"]:
        return f"{name} has {size} bytes, {expected['size']} expected"
    if crc != expected[CHECKSUM]:
        return f"checksum mismatch in {name}"
    return None


def _check_named_files(path: Path, metadata: Metadata) -> str | None:
    """For checkpoints without a manifest: every file `.metadata` names exists and holds the bytes it points at."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, length in sorted(needed.items()):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} is unreadable ({e.strerror or type(e).__name__})"
        if size < length:
            return f"{name} is truncated ({size} of at least {length} bytes)"
    return None


def _raise_if_damaged(path: Path, error: str | None = None) -> None:
    """Collective: raise CheckpointError on every rank if `path` does not verify. With `error` (a failure the damage
    may explain) the damage is appended to it; a checkpoint that is merely incomplete adds nothing to `error`."""
    reason = _verify(path)
    if reason is None or (error is not None and reason == _NOT_COMPLETE):
        return
    advice = "resume from an older one (find_latest_valid(root) picks the newest intact checkpoint)"
    if error is None:
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}; {advice}")
    raise CheckpointError(f"{error}; checkpoint {path} is damaged: {reason}; {advice}")


# ----------------------------------------------------------------------------------------------------------------
# DCP writes and reads
# ----------------------------------------------------------------------------------------------------------------


_LONG_MESSAGE = 160  # characters of a foreign error message kept whole


class _RecordingFileSystem(FileSystem):
    """DCP's local file system, remembering every exception raised while one of its streams was open.

    DCP hands a failure to the other ranks as a pickled copy, which drops `__context__`: the OSError(ENOSPC) behind
    torch's "unexpected pos" RuntimeError survives only in the original exception, recorded here.
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        try:
            with super().create_stream(path, mode) as stream:
                yield stream
        except BaseException as e:
            self.errors.append(e)
            raise


class _Secondhand(CheckpointError):
    """A failure this rank only learnt of from another rank; `_collect_on_all_ranks` prefers first-hand reports."""


def _write_shards(state: dict[str, torch.Tensor], tmp: Path, final: Path, root: Path) -> list[dict[str, Any]]:
    """Collective: DCP-save `state` into `tmp`; every rank then checksums the files it wrote. Returns each rank's
    {file name: manifest entry}."""

    def write() -> dict[str, Any]:
        writer = FileSystemWriter(str(tmp))
        writer.fs = recorder = _RecordingFileSystem()
        try:
            with _quiet_single_process():
                dcp.save(state, storage_writer=writer, no_dist=not _distributed())
        except (Exception, CheckpointException) as e:
            rank, cause, firsthand = _first_cause(e, recorder.errors)
            if _has_errno(cause, errno.ENOSPC):
                message = _no_space_message(final, root)
            else:
                message = (f"writing checkpoint {final} failed{_on_rank(rank)}: {_describe(cause)}; "
                           f"{_previous_note(root)}")
            raise (CheckpointError if firsthand else _Secondhand)(message) from e
        return {name: _checksum_entry(tmp / name) for name in _own_files(tmp, _rank())}

    return _collect_on_all_ranks(f"writing checkpoint {final}", write)


def _read_shards(state: dict[str, torch.Tensor], path: Path) -> None:
    """Collective: DCP-load `state` in place from `path`; any failure is the same one-line error on every rank."""

    def read() -> None:
        reader = SafeFileSystemReader(str(path))
        reader.fs = recorder = _RecordingFileSystem()
        try:
            with _quiet_single_process():
                dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(), no_dist=not _distributed())
        except (Exception, CheckpointException) as e:
            rank, cause, firsthand = _first_cause(e, recorder.errors)
            message = (f"loading checkpoint {path} failed{_on_rank(rank)}: {_describe(cause)}; the checkpoint is "
                       "damaged or unreadable: check it with verify_checkpoint and resume from an older one")
            raise (CheckpointError if firsthand else _Secondhand)(message) from e

    _collect_on_all_ranks(f"loading checkpoint {path}", read)


def _first_cause(error: BaseException, recorded: list[BaseException]) -> tuple[int | None, BaseException, bool]:
    """(rank, exception, seen on this rank) behind a DCP failure: this rank's own (recorded by the file system
    with its full chain, else from DCP's per-rank failures), else the lowest failing rank's."""
    failures = _unwrap(error)
    mine = [exc for rank, exc in failures if rank == _rank() or rank is None]
    if recorded or mine:
        return _rank(), (recorded or mine)[0], True
    rank, exc = failures[0]
    return rank, exc, False


def _unwrap(error: BaseException) -> list[tuple[int | None, BaseException]]:
    """(rank, exception) of every per-rank failure inside DCP's CheckpointException (nested ones unwrapped),
    lowest rank first; (None, error) for anything else."""
    if not isinstance(error, CheckpointException):
        return [(None, error)]
    out = []
    for rank in sorted(error.failures):
        inner = error.failures[rank][0]
        out += [(rank if r is None else r, exc) for r, exc in _unwrap(inner)]
    return out or [(None, error)]


def _has_errno(error: BaseException, code: int) -> bool:
    """Whether `error` or an exception in its __cause__/__context__ chain is an OSError with errno `code`."""
    seen, todo = set(), [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno == code:
            return True
        todo += [exc.__cause__, exc.__context__]
    return False


def _describe(error: BaseException) -> str:
    """`Type: first line of the message` (a CheckpointError's own message needs no type). torch's weights-only
    unpickling failure is replaced by the error behind it, and a long line is cut after its first sentence."""
    text = one_line(error)
    if isinstance(error, CheckpointError):
        return text
    if text.startswith("Weights only load failed") and error.__context__ is not None:
        return f"{type(error).__name__}: tensor data does not unpickle ({_describe(error.__context__)})"
    if len(text) > _LONG_MESSAGE and ". " in text[:_LONG_MESSAGE]:
        text = text[:text.index(". ") + 1]  # e.g. torch's "... not a ZIP archive. This is an internal miniz error..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _on_rank(rank: int | None) -> str:
    return f" on rank {rank}" if _distributed() and rank is not None else ""


# ----------------------------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------------------------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Silence DCP's "torch.distributed is ... uninitialized, assuming ... a single process" warning, which is
    exactly our intent when no process group exists."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _exchange(item: Any) -> list[Any]:
    """Every rank's `item`, in rank order (all_gather_object; just [item] without a process group)."""
    if not _distributed():
        return [item]
    items: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(items, item)
    return items


def _run_on_all_ranks(what: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if it fails anywhere, raise CheckpointError on every rank (so none is left waiting):
    a failing rank raises its own error, the others `rank R failed: ...`.

    Acts as a barrier when a process group exists.
    """
    try:
        result, error = fn(), None
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        result, error = None, e
    message = None if error is None else (str(error) if isinstance(error, CheckpointError)
                                          else f"{what}: {_describe(error)}")
    messages = _exchange(message)
    if error is not None:
        raise error if isinstance(error, CheckpointError) else CheckpointError(message) from error
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        raise CheckpointError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return result


def _collect_on_all_ranks(what: str, fn: Callable[[], Any]) -> list[Any]:
    """Run `fn` on every rank and return every rank's result, in rank order. If it fails anywhere, every rank raises
    the same one-line CheckpointError: the lowest rank's that saw its cause first-hand (not as a `_Secondhand`).

    Acts as a barrier when a process group exists.
    """
    error: BaseException | None = None
    try:
        item = (fn(), None, False)
    except CheckpointError as e:
        item, error = (None, one_line(e), not isinstance(e, _Secondhand)), e
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        item, error = (None, f"{what}: {_describe(e)}", True), e
    items = _exchange(item)
    failures = [(message, firsthand) for _, message, firsthand in items if message is not None]
    if failures:
        message = next((m for m, firsthand in failures if firsthand), failures[0][0])
        raise CheckpointError(message) from error
    return [result for result, _, _ in items]
