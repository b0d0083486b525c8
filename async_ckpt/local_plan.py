"""From one rank's flattened state dict to its local plan and the bytes behind it."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import xxhash

from ._dtensor import is_dtensor, is_sharded_tensor, local_shape_and_offset, outside_mesh
from .buffer_layout import PAGE_ALIGNED_MIN
from .format.dtypes import dtype_name
from .format.values import encode_value
from .planning import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    tensor_properties,
)

__all__ = [
    "LocalPlan",
    "build_local_plan",
    "byte_addresses",
    "byte_sources",
    "check_key",
    "check_tensor",
    "local_chunk",
    "raw_bytes",
    "split_boxes",
    "tensor_bytes",
]

Key = tuple[str, tuple[int, ...] | None]
Pieces = tuple[tuple[Key, tuple[slice, ...]], ...]


@dataclass(frozen=True, slots=True)
class LocalPlan:
    plan: SavePlan
    tensors: dict[Key, torch.Tensor]
    """The local data of each tensor item, by (fqn, offsets)."""
    values: dict[str, Any]
    """Each non-tensor value, already JSON-encoded."""
    pieces: Mapping[str, Pieces] = field(default_factory=dict)
    """For each tensor split into several chunks (``split_bytes``): each chunk's key and its
    slice of the local data, so a later save of the same layout slices its tensors alike."""


def check_key(fqn: str) -> None:
    """Refuse a key UTF-8 cannot encode: shard headers are UTF-8 JSON that other readers parse."""
    try:
        fqn.encode("utf-8")
    except UnicodeEncodeError as exc:
        shown = fqn.encode("utf-8", "backslashreplace").decode("utf-8")
        raise ValueError(
            f"cannot save key '{shown}': UTF-8 cannot encode it (character {exc.start} is a lone "
            "surrogate), and shard headers are UTF-8 JSON; rename the key"
        ) from None


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def check_tensor(fqn: str, value: torch.Tensor) -> None:
    """Refuse, naming the key, a tensor whose data is not one strided block of memory.

    Caught here, before anything is written; the writer and the staging copy
    would otherwise fail deep down with an error that names no key.
    """
    if type(value) in _PLAIN_TENSOR_TYPES and value.layout is torch.strided and not value.is_nested:
        return
    problem = _storage_problem(value)
    if problem is not None:
        raise TypeError(f"cannot save key '{fqn}': {problem}")


def _storage_problem(value: torch.Tensor) -> str | None:
    if is_sharded_tensor(value):
        return (
            "ShardedTensor is not supported; convert it to a DTensor "
            "(torch.distributed.tensor), which async_ckpt saves and reshards on load"
        )
    if is_dtensor(value):
        problem = _storage_problem(value.to_local())  # type: ignore[attr-defined]
        return None if problem is None else f"its local shard: {problem}"
    if value.is_nested:
        return (
            "nested tensors are not supported; save its components (list(t.unbind())) "
            "or a padded tensor (t.to_padded_tensor(0.0))"
        )
    if value.layout is not torch.strided:
        return f"{value.layout} tensors are not supported; save t.to_dense() instead"
    if getattr(type(value), "__torch_dispatch__", None) is not torch.Tensor.__torch_dispatch__:
        # A wrapper subclass (FakeTensor, quantised or lazy tensors) computes its
        # data on demand; it has no storage of its own to copy.
        return (
            f"tensor subclass {type(value).__qualname__} has no plain storage to save; "
            "convert it to a plain tensor first"
        )
    return None


def local_chunk(fqn: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ChunkStorageMetadata, tuple[int, ...]]:
    """``(local data, chunk in the global tensor, global shape)`` of a tensor or DTensor.

    A rank outside a DTensor's mesh gets an empty chunk (zero sizes) at the origin.
    """
    if is_dtensor(tensor):
        dt: Any = tensor
        if outside_mesh(tensor):
            ndim = len(tensor.shape)
            return dt.to_local(), ChunkStorageMetadata((0,) * ndim, (0,) * ndim), tuple(tensor.shape)
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


def byte_sources(tensors: Mapping[Key, torch.Tensor]) -> dict[Key, Callable[[], memoryview]]:
    """Each tensor's bytes, taken when the writer reaches it (``save_flow.RankData``)."""
    return {key: partial(tensor_bytes, t) for key, t in tensors.items()}


def byte_addresses(tensors: Mapping[Key, torch.Tensor]) -> dict[Key, int]:
    """Where each tensor whose bytes ``tensor_bytes`` takes in place lies (``save_flow.RankData``)."""
    # Only sources the writer may send without a copy (buffer_layout.PAGE_ALIGNED_MIN and up):
    # the checks cost a few calls a tensor, thousands of times for small ones that never qualify.
    return {
        key: t.data_ptr()
        for key, t in tensors.items()
        if t.nbytes >= PAGE_ALIGNED_MIN
        and t.device.type == "cpu"
        and t.is_contiguous()
        and not t.is_conj()
        and not t.is_neg()
    }


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy)."""
    flat = t.reshape(-1).view(torch.uint8).numpy()
    return memoryview(flat).cast("B")  # type: ignore[arg-type]


def value_hash(encoded: Any) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(encoded, sort_keys=True).encode())


def split_boxes(
    sizes: tuple[int, ...], itemsize: int, cap: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes ``(offsets, sizes)`` of at most ``cap`` bytes that tile a chunk of ``sizes``, in row-major order.

    Each box is a run of whole rows along one dimension, at fixed indices in
    the dimensions before it, so it is one contiguous block of a contiguous
    tensor. A chunk within ``cap`` is one box.
    """
    total = math.prod(sizes) * itemsize
    if total <= cap or not sizes:
        return [((0,) * len(sizes), tuple(sizes))]
    cap = max(cap, itemsize)
    # d: the first dimension one index of which (the dimensions after it) fits the cap.
    d, inner = 0, total // sizes[0]
    while inner > cap:
        d += 1
        inner //= sizes[d]
    rows = cap // inner
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    tail = tuple(sizes[d + 1 :])
    for outer in itertools.product(*(range(n) for n in sizes[:d])):
        for start in range(0, sizes[d], rows):
            boxes.append(
                (outer + (start,) + (0,) * len(tail), (1,) * d + (min(rows, sizes[d] - start),) + tail)
            )
    return boxes


@torch.no_grad()  # DTensor.to_local() records no autograd node (layout_cache.LayoutCache.prepare)
def build_local_plan(
    entries: Mapping[str, Any], *, allow_pickle: bool, verify_replicas: bool, split_bytes: int | None = None
) -> LocalPlan:
    """The rank's write items and the data behind them.

    ``split_bytes``: a tensor (or local shard) larger than this is saved as
    several chunks of at most that size (``split_boxes``), as a sharded tensor
    is, so that a staging budget holds whole items (``staged_rounds.py``).
    """
    items: list[WriteItem] = []
    tensors: dict[Key, torch.Tensor] = {}
    values: dict[str, Any] = {}
    pieces: dict[str, Pieces] = {}
    for fqn, value in entries.items():
        check_key(fqn)
        if isinstance(value, torch.Tensor):
            check_tensor(fqn, value)
            try:
                dtype_name(value.dtype)
            except TypeError as exc:
                raise TypeError(f"cannot save key '{fqn}': {exc}") from None
            if is_dtensor(value) and outside_mesh(value):
                continue  # this rank holds no part of it; the mesh's ranks write it
            if value.is_meta or (is_dtensor(value) and value.to_local().is_meta):  # type: ignore[attr-defined]
                raise TypeError(
                    f"cannot save key '{fqn}': it is a meta-device tensor and holds no data; "
                    "materialise it (e.g. model.to_empty(device=...) and initialise) first"
                )
            local, chunk, shape = local_chunk(fqn, value)
            kind = WriteItemType.SHARD if is_dtensor(value) else WriteItemType.TENSOR
            properties = tensor_properties(value.dtype)
            boxes = [((0,) * len(chunk.sizes), tuple(chunk.sizes))]
            if split_bytes is not None:
                boxes = split_boxes(tuple(chunk.sizes), properties.itemsize, split_bytes)
            split: list[tuple[Key, tuple[slice, ...]]] = []
            for at, sizes in boxes:
                offsets = tuple(o + a for o, a in zip(chunk.offsets, at, strict=True))
                if len(boxes) == 1:
                    data = local
                else:
                    where = tuple(slice(a, a + n) for a, n in zip(at, sizes, strict=True))
                    data = local[where]
                    split.append(((fqn, offsets), where))
                digest = None
                if verify_replicas and not is_dtensor(value):
                    digest = xxhash.xxh3_64_hexdigest(tensor_bytes(data))
                items.append(
                    WriteItem(
                        index=MetadataIndex(fqn, offsets),
                        type=kind,
                        tensor_data=TensorWriteData(ChunkStorageMetadata(offsets, sizes), properties, shape),
                        value_hash=digest,
                    )
                )
                tensors[(fqn, offsets)] = data
            if split:
                pieces[fqn] = tuple(split)
        else:
            encoded = encode_value(value, fqn=fqn, allow_pickle=allow_pickle)
            values[fqn] = encoded
            items.append(
                WriteItem(
                    index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO, value_hash=value_hash(encoded)
                )
            )
    return LocalPlan(plan=SavePlan(items), tensors=tensors, values=values, pieces=pieces)
