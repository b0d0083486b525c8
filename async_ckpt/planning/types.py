"""Plan data contracts: what each rank intends to write, as frozen, hashable values.

These mirror the shape of ``torch.distributed.checkpoint``'s planner types so
that code written against DCP's planning API reads naturally here, but they are
plain dataclasses with no torch dependency: a dtype is its name (``float32``)
with its item size, so the worker process plans without importing torch.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ChunkStorageMetadata",
    "MetadataIndex",
    "SavePlan",
    "TensorProperties",
    "TensorWriteData",
    "WriteItem",
    "WriteItemType",
    "tensor_properties",
    "write_item_for_tensor",
]


def _as_tuple(value: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


@dataclass(frozen=True, slots=True, init=False)
class MetadataIndex:
    """Names one saved piece: a flattened key plus, for shards, its chunk offset.

    ``index`` is only a position hint for lookups; it takes no part in equality
    or hashing, so the same piece found at another position is still equal.
    """

    fqn: str
    offset: tuple[int, ...] | None = None
    index: int | None = field(default=None, compare=False, hash=False)

    def __init__(self, fqn: str, offset: Sequence[int] | None = None, index: int | None = None) -> None:
        object.__setattr__(self, "fqn", fqn)
        object.__setattr__(self, "offset", _as_tuple(offset))
        object.__setattr__(self, "index", index)


class WriteItemType(enum.Enum):
    TENSOR = "tensor"
    SHARD = "shard"
    BYTE_IO = "byte_io"


@dataclass(frozen=True, slots=True, init=False)
class ChunkStorageMetadata:
    """A box inside a tensor's global shape: where it starts and how big it is."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __init__(self, offsets: Sequence[int], sizes: Sequence[int]) -> None:
        if len(offsets) != len(sizes):
            raise ValueError(f"chunk offsets {tuple(offsets)} and sizes {tuple(sizes)} differ in rank")
        object.__setattr__(self, "offsets", tuple(int(v) for v in offsets))
        object.__setattr__(self, "sizes", tuple(int(v) for v in sizes))

    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True, slots=True)
class TensorProperties:
    dtype: str
    """The dtype's name, as torch spells it without ``torch.``."""
    itemsize: int


@dataclass(frozen=True, slots=True, init=False)
class TensorWriteData:
    """The chunk a write item covers, its dtype and the tensor's global shape."""

    chunk: ChunkStorageMetadata
    properties: TensorProperties
    size: tuple[int, ...]

    def __init__(
        self,
        chunk: ChunkStorageMetadata,
        properties: TensorProperties | Any,
        size: Sequence[int],
    ) -> None:
        if not isinstance(properties, TensorProperties):
            properties = tensor_properties(properties)  # a torch.dtype
        object.__setattr__(self, "chunk", chunk)
        object.__setattr__(self, "properties", properties)
        object.__setattr__(self, "size", tuple(int(v) for v in size))

    @property
    def offsets(self) -> tuple[int, ...]:
        return self.chunk.offsets

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.chunk.sizes

    @property
    def dtype(self) -> str:
        return self.properties.dtype


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One thing a rank plans to write.

    ``value_hash`` is set for ``BYTE_IO`` items (non-tensor values, and tensors
    checked with ``verify_replicas``) so the coordinator can tell replicas that
    really are identical from values that merely share a key.
    """

    index: MetadataIndex
    type: WriteItemType
    tensor_data: TensorWriteData | None = None
    value_hash: str | None = None

    def tensor_storage_size(self) -> int | None:
        """Bytes this item occupies on disk, or ``None`` for a non-tensor."""
        if self.tensor_data is None:
            return None
        return self.tensor_data.chunk.numel() * self.tensor_data.properties.itemsize


@dataclass(frozen=True, slots=True)
class SavePlan:
    """The items one rank writes. Immutable: derive new plans with ``dataclasses.replace``."""

    items: Sequence[WriteItem]


def tensor_properties(dtype: Any) -> TensorProperties:
    """The properties of a ``torch.dtype`` (taken as given: this module never imports torch)."""
    return TensorProperties(str(dtype).removeprefix("torch."), int(dtype.itemsize))


def write_item_for_tensor(fqn: str, tensor: Any) -> WriteItem:
    """A ``TENSOR`` item covering the whole of ``tensor`` (a ``torch.Tensor``)."""
    shape = tuple(tensor.shape)
    chunk = ChunkStorageMetadata(offsets=(0,) * len(shape), sizes=shape)
    return WriteItem(
        index=MetadataIndex(fqn, chunk.offsets),
        type=WriteItemType.TENSOR,
        tensor_data=TensorWriteData(chunk, tensor_properties(tensor.dtype), shape),
    )
