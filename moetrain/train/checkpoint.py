"""Atomic, reshardable training checkpoints built on torch.distributed.checkpoint (DCP).

Layout of one checkpoint directory `root/step_<8 digits>/`:

* DCP files (`.metadata`, `__<rank>_<n>.distcp`) holding a flat dict of tensors:
    - `model/<fqn>`                              dense parameters and persistent buffers (`model.state_dict()` keys),
    - `model/<fqn>/expert/<global id>`           one entry per expert row of an expert parameter,
    - `optim/<fqn>/<state key>`                  optimizer state of dense parameters (AdamW: exp_avg, exp_avg_sq,
                                                 step) and the unsplit state of expert parameters (0-dim `step`),
    - `optim/<fqn>/<state key>/expert/<id>`      per-expert rows of expert-parameter optimizer state,
    - `extra/<name>`                             caller tensors (trainer step, data position, RNG states, ...).
* `moetrain.json` (rank 0): optimizer param_groups hyper-parameters (lr, betas, ...) and scheduler state. No pickles.
* `COMPLETE`: written last, before the directory gets its final name.

Expert parameters are the parameters with an `expert_ids: list[int]` attribute: dim 0 indexes experts and
`expert_ids[i]` is the global id of row i. Entries are keyed by global id, so a checkpoint written under one expert
placement (ep=2, ep=4, arbitrary ids) loads under any other that covers the same experts. Ranks holding the same
key (dense replicas, replicated experts) write it once: DCP's save planner deduplicates identical keys.

Saving is atomic: all ranks write `step_N.tmp/`, then rank 0 marks it COMPLETE, renames it to `step_N/`, points
`root/latest` at it and prunes old checkpoints. An interrupted save leaves only a `.tmp` directory, which
`find_latest` ignores and the next successful save removes.

Loading never unpickles arbitrary objects; see `moetrain.train.safe_metadata`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from moetrain.train.safe_metadata import CheckpointError, SafeFileSystemReader, SafeLoadPlanner, read_metadata_safely

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "find_latest", "checkpoint_dir_name"]

COMPLETE_FILE = "COMPLETE"
LATEST_FILE = "latest"
META_FILE = "moetrain.json"
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
                    scheduler: Any = None, extra: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write the checkpoint of `step` to `root/step_<8 digits>` atomically and return its path.

    Collective: every rank of the default process group (if one is initialised) must call it. Dense entries must
    have the same keys on all ranks; expert entries exist only on the ranks holding that expert. `extra` tensors are
    treated like dense entries: a name present on several ranks is written once, so give per-rank values
    (e.g. per-rank RNG states) per-rank names such as `rng/cpu/rank3`. An optimizer without state is initialised
    (DCP's `get_optimizer_state_dict` takes a zero-lr step) so that its state can be written.

    After the write, rank 0 keeps the newest `keep` complete checkpoints (by step) plus the one just written and
    deletes the others, and removes `.tmp` directories left by interrupted saves.
    """
    if keep < 1:
        raise CheckpointError(f"keep={keep} would delete the checkpoint just written; pass keep >= 1")
    if step < 0:
        raise CheckpointError(f"step={step} is negative; checkpoints are named by a non-negative training step")
    root = Path(root)
    name = checkpoint_dir_name(step)
    final, tmp = root / name, root / f"{name}.tmp"

    def prepare() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
        }
        if _rank() == 0:  # start from an empty directory; the other ranks wait for this in _run_on_all_ranks
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        return state, meta

    state, meta = _run_on_all_ranks(f"preparing checkpoint {final}", prepare)
    with _quiet_single_process():
        dcp.save(state, storage_writer=FileSystemWriter(str(tmp)), no_dist=not _distributed())
    _barrier()

    def finalize() -> None:
        if _rank() != 0:
            return
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=1))
        _write_synced(tmp / COMPLETE_FILE, f"{name}\n")
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old copy out of the way (a .tmp name is never loaded)
            old = root / f"{name}.replaced.tmp"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_synced(root / f"{LATEST_FILE}.tmp", f"{name}\n")
        os.replace(root / f"{LATEST_FILE}.tmp", root / LATEST_FILE)
        _fsync_dir(root)
        _prune(root, keep, final)

    _run_on_all_ranks(f"finalizing checkpoint {final}", finalize)
    return final


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None if there is none.

    The `root/latest` pointer wins when it names a complete checkpoint; otherwise (missing, stale or corrupt
    pointer) the complete checkpoint with the highest step is returned. `.tmp` directories are never returned.
    """
    root = Path(root)
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    if _STEP_DIR.match(name) and (root / name / COMPLETE_FILE).is_file():
        return root / name
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Load the checkpoint directory `path` in place into `model` (and `optimizer`, `scheduler`, `extra`).

    Collective when a process group is initialised. Expert rows are looked up by global id, so any expert
    placement that the checkpoint covers can be loaded. Only the parts passed are loaded (e.g. optimizer=None
    loads the weights only); everything asked for must be in the checkpoint, or CheckpointError names the first
    missing entry and the checkpoint.

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

    state, osd, meta = _run_on_all_ranks(f"loading checkpoint {path}", prepare)
    with _quiet_single_process():
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
                 no_dist=not _distributed())
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
        if type(param.data) is not torch.Tensor:
            raise CheckpointError(f"expert parameter {fqn!r} is a {type(param.data).__name__}; expert parameters "
                                  "must be plain local tensors (shard experts with expert_ids, not DTensor)")
        ids = [int(i) for i in ids]
        if param.dim() == 0 or len(ids) != param.shape[0]:
            raise CheckpointError(f"expert parameter {fqn!r} has shape {list(param.shape)} but {len(ids)} "
                                  "expert_ids; expert_ids must give the global id of every dim-0 row")
        if len(set(ids)) != len(ids) or min(ids, default=0) < 0:
            raise CheckpointError(f"expert parameter {fqn!r} has invalid expert_ids {ids}: "
                                  "ids must be distinct non-negative global expert ids")
        out[fqn] = ids
    return out


def _split(prefix: str, value: torch.Tensor, ids: list[int] | None, out: dict[str, torch.Tensor]) -> None:
    """Add `value` under `prefix`, or one row view per expert under `prefix/expert/<id>` for expert tensors."""
    if ids is None or value.dim() == 0:
        out[prefix] = value
        return
    if value.shape[0] != len(ids):
        raise CheckpointError(f"{prefix!r} has {value.shape[0]} rows but its parameter has {len(ids)} expert_ids")
    for row, expert in enumerate(ids):
        out[f"{prefix}{_EXPERT}{expert}"] = value[row]


def _model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    experts = _expert_ids(model)
    out: dict[str, torch.Tensor] = {}
    for fqn, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"model state {fqn!r} is a {type(value).__name__}; only tensors can be "
                                  "checkpointed (store other state as a buffer or pass it in `extra`)")
        _split(f"model/{fqn}", value.detach(), experts.get(fqn), out)
    return out


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


def _apply_param_groups(osd: dict[str, Any], saved: list[dict[str, Any]], path: Path) -> None:
    """Overwrite the hyper-parameters of `osd`'s param_groups with the saved ones (groups matched by position)."""
    groups = osd["param_groups"]
    if len(saved) != len(groups):
        raise CheckpointError(f"optimizer mismatch: checkpoint {path} has {len(saved)} param groups, the optimizer "
                              f"has {len(groups)}; build the optimizer with the same parameter groups")
    for i, (group, saved_group) in enumerate(zip(groups, saved)):
        if set(group["params"]) != set(saved_group["params"]):
            raise CheckpointError(f"optimizer mismatch: param group {i} of checkpoint {path} holds different "
                                  "parameters than the optimizer's; build the optimizer with the same groups")
        group.update({k: _from_json(v) for k, v in saved_group.items() if k != "params"})


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
        raise CheckpointError(f"cannot read {path / META_FILE}: {e}; the checkpoint is corrupt") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path / META_FILE} is not a format-{FORMAT_VERSION} moetrain checkpoint file")
    return meta


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


def _prune(root: Path, keep: int, current: Path) -> None:
    """Delete complete checkpoints older than the newest `keep` (never `current`) and stale `.tmp` directories."""
    complete = _complete_checkpoints(root)
    protected = {current} | {p for _, p in complete[-keep:]}
    for _, path in complete:
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


def _run_on_all_ranks(what: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` on every rank; if it fails anywhere, raise CheckpointError on every rank (so none is left waiting).

    Acts as a barrier when a process group exists.
    """
    try:
        result, error = fn(), None
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        result, error = None, e
    message = None if error is None else (str(error) if isinstance(error, CheckpointError)
                                          else f"{what}: {type(error).__name__}: {error}")
    messages = [message]
    if _distributed():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
    if error is not None:
        raise error if isinstance(error, CheckpointError) else CheckpointError(message) from error
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        raise CheckpointError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return result
