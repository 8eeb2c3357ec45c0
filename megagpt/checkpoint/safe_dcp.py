"""Reading torch.distributed.checkpoint files without unpickling arbitrary objects.

DCP stores its index (`.metadata`) as a pickle and reads it with `pickle.load`, and
loads non-tensor entries (optimizer hyperparameters) with
`torch.load(weights_only=False)`: a crafted checkpoint could run code on load. Here
the index is read by an unpickler that admits only DCP's own metadata classes, and
non-tensor entries with `weights_only=True`.
"""

from __future__ import annotations

import io
import pathlib
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_ALLOWED = {
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
}
for _name in (
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "Metadata",
    "MetadataIndex",
    "StorageMeta",
    "TensorProperties",
    "TensorStorageMetadata",
    "_MEM_FORMAT_ENCODING",
):
    _ALLOWED[("torch.distributed.checkpoint.metadata", _name)] = getattr(dcp_metadata, _name)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(
            f"checkpoint index refers to {module}.{name}, which a checkpoint index never "
            "needs; refusing to load it (the file may have been tampered with)"
        )


def read_index(path: str | pathlib.Path) -> Metadata:
    """Read a DCP `.metadata` file with the restricted unpickler."""
    with open(pathlib.Path(path) / ".metadata", "rb") as f:
        return _MetadataUnpickler(f).load()


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_index(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)
