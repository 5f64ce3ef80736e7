"""Reading DCP checkpoints without ever running code from a file.

torch's DCP reader unpickles `.metadata` with `pickle.load`, and loads any object entry with
`torch.load(weights_only=False)`: a crafted checkpoint runs whatever it likes on the machine that reads
it. Every moeyard path that reads a checkpoint goes through this module instead:

- `.metadata` is unpickled by an unpickler that admits only the classes DCP metadata is made of
  (dataclasses of sizes, offsets, dtypes and file names) and fails with a named error on anything else;
- the metadata is then checked: tensors only (moeyard never saves pickled objects), and every shard file
  a plain name inside the checkpoint folder;
- the load planner refuses object entries outright, so nothing is `torch.load`ed with weights_only=False.
Tensor shards are read by DCP's own `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo

from moeyard.errors import CheckpointError
from moeyard.trainer.checkpoint.store import is_plain_name

METADATA = ".metadata"

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # and the dtypes, below
    "torch.serialization": {"_get_layout"},  # maps a layout's name to torch's layout object, nothing else
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes of DCP metadata and torch's dtypes; any other global is refused."""

    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.where} asks to construct {module}.{name}, which DCP metadata never "
                              f"contains: refusing to load it (the file may be crafted to run code). Only load "
                              f"checkpoints from sources you trust, and get an unaltered copy of this one")


def _check(md: Any, where: Path) -> None:
    """Raise unless `md` is metadata of tensors whose shards are plain file names in the folder."""
    if not isinstance(md, dcp_metadata.Metadata) or not isinstance(md.state_dict_metadata, dict):
        raise CheckpointError(f"{where} is not DCP metadata (found {type(md).__name__})")
    for key, entry in md.state_dict_metadata.items():
        if not isinstance(entry, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(f"{where}: entry {key!r} is a pickled object, not a tensor; moeyard never "
                                  f"writes those and does not load them (loading one would run its code)")
    for index, info in (md.storage_data or {}).items():
        if not isinstance(info, _StorageInfo) or not is_plain_name(info.relative_path):
            path = getattr(info, "relative_path", info)
            raise CheckpointError(f"{where}: shard of {getattr(index, 'fqn', index)!r} is in {path!r}, which is "
                                  f"not a file inside the checkpoint folder")
        if info.transform_descriptors:
            raise CheckpointError(f"{where}: shard of {index.fqn!r} asks for load transforms "
                                  f"{list(info.transform_descriptors)}, which moeyard never writes")


def read_metadata(folder: Path) -> dcp_metadata.Metadata:
    """The checkpoint's DCP metadata, read without running code from it and checked."""
    where = folder / METADATA
    try:
        with where.open("rb") as f:
            md = _MetadataUnpickler(f, where).load()
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no {METADATA}: it is not a DCP checkpoint") from None
    except Exception as err:  # truncated or garbage: whatever the unpickler tripped on
        raise CheckpointError(f"{where} cannot be read ({type(err).__name__}: {err}): the file is damaged") from None
    _check(md, where)
    return md


class SafeReader(FileSystemReader):
    """DCP's file reader, with the metadata read by `read_metadata` above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank metadata files are not read by moeyard")
        md = read_metadata(Path(self.path))
        if md.storage_meta is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, minus unpickling object entries (the metadata check already refuses them)."""

    def load_bytes(self, read_item: Any, value: Any) -> None:
        raise CheckpointError(f"refusing to unpickle {read_item.dest_index.fqn!r}: moeyard loads tensors only")


def load(state: dict[str, Any], folder: Path, process_group: Optional[Any] = None) -> None:
    """dcp.load into `state` in place, through the safe reader and planner; without `process_group`, in
    this process alone."""
    reader, planner = SafeReader(str(folder)), SafeLoadPlanner()
    if process_group is not None:
        dcp.load(state, storage_reader=reader, planner=planner, process_group=process_group)
        return
    with warnings.catch_warnings():  # DCP warns that no process group exists: that is the point here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
