"""Read DCP checkpoints without unpickling arbitrary objects.

`torch.distributed.checkpoint.FileSystemReader.read_metadata` calls `pickle.load` on the checkpoint's `.metadata`
file, so a tampered checkpoint could run arbitrary code on load. `SafeFileSystemReader` replaces that with a
restricted unpickler that only constructs the handful of types DCP metadata is made of (found by logging every
`find_class` request while saving tensors of several dtypes and shapes), and refuses every other global.

The two other ways DCP could execute pickled code on load are closed as well:

* tensor payloads are read by DCP with `torch.load(..., weights_only=True)` (checked by the tests), and
* non-tensor ("bytes") entries are loaded with `torch.load(..., weights_only=False)`; `SafeFileSystemReader.read_data`
  refuses to read any such entry, and `SafeLoadPlanner.load_bytes` refuses them too.

moetrain checkpoints only ever contain tensors (everything else goes into a JSON file), so nothing is lost.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem

__all__ = ["CheckpointError", "SafeFileSystemReader", "SafeLoadPlanner", "read_metadata_safely",
           "ALLOWED_GLOBALS", "one_line"]

METADATA_FILE = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or loaded; the message names the problem and the fix."""


def one_line(text: object) -> str:
    """The first non-empty line of `str(text)`, stripped: foreign error messages (torch's C++ errors carry
    backtraces, DCP's CheckpointException carries tracebacks) are cut down to it before they reach the user."""
    for line in str(text).splitlines():
        if line.strip():
            return line.strip()
    return ""


_DCP_METADATA = "torch.distributed.checkpoint.metadata"

# Every (module, name) global a DCP `.metadata` pickle needs, besides torch dtypes (see `_is_allowed`).
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
    # Present when a checkpoint holds non-tensor entries; allowed so that we can report them instead of failing
    # to parse. Their payloads are never loaded (see SafeFileSystemReader.read_data).
    (_DCP_METADATA, "BytesStorageMetadata"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # maps a layout name such as "torch.strided" to the layout object
    # StorageMeta.checkpoint_id is the path the writer was given, which may be a pathlib object.
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"),
    ("pathlib._local", "PurePosixPath"),
    ("pathlib._local", "WindowsPath"),
    ("pathlib._local", "PureWindowsPath"),
})


def _is_allowed(module: str, name: str) -> bool:
    if (module, name) in ALLOWED_GLOBALS:
        return True
    # Tensor dtypes pickle as the global `torch.<dtype name>`, e.g. torch.float32.
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class _MetadataUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` only resolves DCP metadata types."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if not _is_allowed(module, name):
            raise CheckpointError(
                f"refusing to unpickle {module}.{name} from {self._source}: not a checkpoint metadata type "
                "(the file is corrupt or was tampered with; do not load this checkpoint)")
        return super().find_class(module, name)


def _unpickle_metadata(stream: io.BufferedIOBase, source: str) -> Metadata:
    try:
        metadata = _MetadataUnpickler(stream, source).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not usable metadata
        raise CheckpointError(f"cannot read checkpoint metadata {source}: {type(e).__name__}: {one_line(e)}; "
                              "the checkpoint is corrupt or incomplete") from e
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint metadata {source} holds a {type(metadata).__name__}, not a DCP Metadata; "
                              "the checkpoint is corrupt or was tampered with")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name:
            raise CheckpointError(f"checkpoint metadata {source} points outside the checkpoint directory "
                                  f"({name!r}); the checkpoint is corrupt or was tampered with")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A DCP `FileSystemReader` that never unpickles arbitrary objects (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _unpickle_metadata(stream, str(path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner):
        for item in plan.items:
            _refuse_bytes(item, self.path)
        return super().read_data(plan, planner)


class SafeLoadPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` that refuses non-tensor entries (DCP would `torch.load` them with weights_only=False)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        _refuse_bytes(read_item, "<checkpoint>")


def _refuse_bytes(item: ReadItem, path: Any) -> None:
    if item.type == LoadItemType.BYTE_IO:
        raise CheckpointError(
            f"refusing to load non-tensor entry {item.dest_index.fqn!r} from {path}: it would be unpickled; "
            "moetrain checkpoints only hold tensors")


def read_metadata_safely(path: Path) -> Metadata:
    """The DCP metadata of the checkpoint directory `path`, read with the restricted unpickler."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a DCP checkpoint: it has no {METADATA_FILE} file")
    with open(file, "rb") as stream:
        return _unpickle_metadata(stream, str(file))
