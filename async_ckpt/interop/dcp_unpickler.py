"""Unpickling DCP's ``.metadata`` with an allow-list, so that reading it runs no code from the file.

DCP writes ``.metadata`` with ``pickle.dump`` and reads it back with a bare
``pickle.load``: whoever can write the file can run any command in the
reader. Here every global the pickle names must be on a short list: DCP's
own metadata classes, ``torch.Size``, dtypes, layouts and paths. DCP's
classes are not even imported: each maps to an inert :class:`Record` that
only stores its state, so no constructor or ``__setstate__`` of torch runs.
Anything else is refused with ``CheckpointError`` naming the global.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError

__all__ = ["Record", "unpickle_metadata"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_CLASSES = {
    (_DCP_METADATA, "Metadata"),
    (_DCP_METADATA, "TensorStorageMetadata"),
    (_DCP_METADATA, "BytesStorageMetadata"),
    (_DCP_METADATA, "ChunkStorageMetadata"),
    (_DCP_METADATA, "TensorProperties"),
    (_DCP_METADATA, "MetadataIndex"),
    (_DCP_METADATA, "StorageMeta"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
}
_LAYOUTS = {"torch.strided": torch.strided, "torch.sparse_coo": torch.sparse_coo}


class Record:
    """An inert stand-in for one of DCP's metadata classes: its name and pickled state."""

    kind = ""

    def __init__(self, *args: Any) -> None:
        self.state: Any = {"__args__": args}

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def field(self, name: str, default: Any = None) -> Any:
        """A dataclass field from the pickled ``__dict__`` state (absent -> ``default``)."""
        state = getattr(self, "state", None)
        if isinstance(state, dict):
            return state.get(name, default)
        return default


# One inert subclass per DCP class: pickle's NEWOBJ needs a real type to call __new__ on.
_RECORD_TYPES: dict[tuple[str, str], type[Record]] = {
    key: type(key[1], (Record,), {"kind": key[1]}) for key in _DCP_CLASSES
}


def _enum_value(value: Any = None) -> Any:
    return value


def _size(dims: Any = ()) -> tuple[Any, ...]:
    return tuple(dims)


def _path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def _layout(name: Any) -> torch.layout:
    if name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"refused layout {str(name)[:60]!r}")
    return _LAYOUTS[name]


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _RECORD_TYPES:
            return _RECORD_TYPES[(module, name)]
        if (module, name) == (_DCP_METADATA, "_MEM_FORMAT_ENCODING"):
            return _enum_value
        if module == "torch" and name == "Size":
            return _size
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return _layout
        if module in ("pathlib", "pathlib._local") and name in ("PosixPath", "WindowsPath", "PurePosixPath"):
            return _path
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


class _Refused(pickle.UnpicklingError):
    pass


def unpickle_metadata(raw: bytes, *, where: str) -> Any:
    """The object pickled in DCP's ``.metadata``, built only from allowed globals."""
    try:
        return _MetadataUnpickler(io.BytesIO(raw)).load()
    except _Refused as exc:
        raise CheckpointError(
            f"{where}: refused to unpickle the global {exc}: DCP metadata holds only DCP's "
            "metadata classes, torch sizes, dtypes and paths, so this file is not DCP metadata "
            "or was tampered with"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure of a pickle stream is damage
        raise CorruptCheckpointError(
            f"{where}: cannot read DCP metadata ({type(exc).__name__}: {exc})"
        ) from None
