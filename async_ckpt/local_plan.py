"""From one rank's flattened state dict to its local plan and the bytes behind it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ._dtensor import is_dtensor, local_shape_and_offset
from .format.dtypes import dtype_name
from .format.values import encode_value
from .planning import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

__all__ = ["LocalPlan", "build_local_plan", "local_chunk", "raw_bytes", "tensor_bytes"]

Key = tuple[str, tuple[int, ...] | None]


@dataclass(frozen=True, slots=True)
class LocalPlan:
    plan: SavePlan
    tensors: dict[Key, torch.Tensor]
    """The local data of each tensor item, by (fqn, offsets)."""
    values: dict[str, Any]
    """Each non-tensor value, already JSON-encoded."""


def local_chunk(fqn: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ChunkStorageMetadata, tuple[int, ...]]:
    """``(local data, chunk in the global tensor, global shape)`` of a tensor or DTensor."""
    if is_dtensor(tensor):
        dt: Any = tensor
        if any(p.is_partial() for p in dt.placements):
            raise ValueError(
                f"key '{fqn}': DTensor has Partial placements {dt.placements}; "
                "redistribute it to Shard/Replicate before saving"
            )
        shape = tuple(tensor.shape)
        local_shape, offsets = local_shape_and_offset(tensor)
        local = dt.to_local()
        if tuple(local.shape) != tuple(local_shape):
            raise ValueError(
                f"key '{fqn}': local shard shape {tuple(local.shape)} differs from the "
                f"{tuple(local_shape)} its placements imply"
            )
        return local, ChunkStorageMetadata(offsets, local_shape), shape
    shape = tuple(tensor.shape)
    return tensor, ChunkStorageMetadata((0,) * len(shape), shape), shape


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor in row-major order, on the CPU (copies only when needed)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    # Lazy conjugate/negation flags must be applied before reinterpreting bytes.
    t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return raw_bytes(t)


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(flat).cast("B")  # type: ignore[arg-type]


def value_hash(encoded: Any) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(encoded, sort_keys=True).encode())


def build_local_plan(entries: Mapping[str, Any], *, allow_pickle: bool, verify_replicas: bool) -> LocalPlan:
    items: list[WriteItem] = []
    tensors: dict[Key, torch.Tensor] = {}
    values: dict[str, Any] = {}
    for fqn, value in entries.items():
        if isinstance(value, torch.Tensor):
            try:
                dtype_name(value.dtype)
            except TypeError as exc:
                raise TypeError(f"cannot save key '{fqn}': {exc}") from None
            if value.is_meta or (is_dtensor(value) and value.to_local().is_meta):  # type: ignore[attr-defined]
                raise TypeError(
                    f"cannot save key '{fqn}': it is a meta-device tensor and holds no data; "
                    "materialise it (e.g. model.to_empty(device=...) and initialise) first"
                )
            local, chunk, shape = local_chunk(fqn, value)
            digest = None
            if verify_replicas and not is_dtensor(value):
                digest = xxhash.xxh3_64_hexdigest(tensor_bytes(local))
            kind = WriteItemType.SHARD if is_dtensor(value) else WriteItemType.TENSOR
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn, chunk.offsets),
                    type=kind,
                    tensor_data=TensorWriteData(chunk, TensorProperties(value.dtype), shape),
                    value_hash=digest,
                )
            )
            tensors[(fqn, chunk.offsets)] = local
        else:
            encoded = encode_value(value, fqn=fqn, allow_pickle=allow_pickle)
            values[fqn] = encoded
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO, value_hash=value_hash(encoded)
                )
            )
    return LocalPlan(plan=SavePlan(items), tensors=tensors, values=values)
