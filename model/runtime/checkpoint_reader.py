"""Reading a DCP checkpoint as data only: ``--resume`` must not run code a run folder brings.

``torch.distributed.checkpoint`` reads a checkpoint's ``.metadata`` with ``pickle.load`` and any item it
marks as bytes with ``torch.load(weights_only=False)``: a folder handed to ``moeplan launch --resume`` could
execute anything. ``DataOnlyReader`` unpickles the metadata with ``MetadataUnpickler``, which resolves only
what DCP's metadata is made of (its own dataclasses and enums, ``torch.Size``, dtypes, the layout lookup,
paths) and refuses every other global, so no callable outside that set can be reached. ``TensorsOnlyPlanner``
refuses bytes items: moeplan's checkpoints hold tensors only (``checkpoint._state``).
"""

from __future__ import annotations

import contextlib
import pickle
from collections import OrderedDict
from pathlib import Path, PosixPath, PurePosixPath

import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.distributed.checkpoint.metadata as dcp_metadata
import torch.distributed.checkpoint.planner as dcp_planner
import torch.distributed.checkpoint.storage as dcp_storage
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

_DCP_MODULES = {m.__name__: m for m in (dcp_metadata, dcp_filesystem, dcp_planner, dcp_storage)}
_NAMED = {("torch", "Size"): torch.Size, ("pathlib", "PosixPath"): PosixPath,
          ("pathlib", "PurePosixPath"): PurePosixPath, ("collections", "OrderedDict"): OrderedDict}


_REFUSED = "is not checkpoint metadata"


class UnsafeCheckpointError(ValueError):
    """A checkpoint whose metadata names something that is not checkpoint metadata."""


class MetadataUnpickler(pickle.Unpickler):
    """Resolves DCP metadata's own classes and a few value types; any other global is refused."""

    def find_class(self, module: str, name: str):
        if (module, name) in _NAMED:
            return _NAMED[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":  # a layout by its name
            return torch.serialization._get_layout
        if module in _DCP_MODULES:
            obj = getattr(_DCP_MODULES[module], name, None)
            if isinstance(obj, type) and obj.__module__ == module:  # a dataclass or enum defined there
                return obj
        raise UnsafeCheckpointError(f"checkpoint metadata names {module}.{name}, which {_REFUSED}")


class _RestrictedPickle:
    """Stands in for the ``pickle`` module inside DCP's reader while it reads the metadata."""

    @staticmethod
    def load(file):
        return MetadataUnpickler(file).load()


class DataOnlyReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with _restricted():
            return super().read_metadata(*args, **kwargs)


@contextlib.contextmanager
def _restricted():
    saved = dcp_filesystem.pickle
    dcp_filesystem.pickle = _RestrictedPickle
    try:
        yield
    finally:
        dcp_filesystem.pickle = saved


class TensorsOnlyPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise UnsafeCheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} is a pickled object; "
                                    "moeplan checkpoints hold tensors only")


def load_data_only(state: dict[str, torch.Tensor], path: str, **kwargs) -> None:
    """``dcp.load`` of ``state`` from ``path`` through the two guards; ``UnsafeCheckpointError`` (also when DCP's
    collectives wrapped it in a ``CheckpointException``) for a folder that is not data."""
    metadata = Path(path) / ".metadata"
    if metadata.is_file():  # checked here too: DCP's loader turns a failed metadata read into another error
        with open(metadata, "rb") as f:
            MetadataUnpickler(f).load()
    try:
        dcp.load(state, checkpoint_id=path, storage_reader=DataOnlyReader(path), planner=TensorsOnlyPlanner(),
                 **kwargs)
    except CheckpointException as exc:
        for error, _ in exc.failures.values():
            if isinstance(error, UnsafeCheckpointError):
                raise error from None
            if _REFUSED in str(error):  # a rank-local metadata file refused, reported inside DCP's own error
                raise UnsafeCheckpointError(str(error).splitlines()[0][:300]) from None
        raise
