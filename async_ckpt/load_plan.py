"""Planning a load on one rank: match each target leaf with the checkpoint, plan its reads. Writes nothing.

For a tensor leaf: check its dtype and shape, make a tensor where the target
has no memory (meta, missing), and intersect its chunk (the whole tensor, or a
DTensor's local shard) with the saved chunks: each overlap is one ``Read``.
GPU and cast targets get a host buffer copied over at finish. A value leaf is
decoded (never unpickled unless allowed); per-rank keys load only on the
world size that saved them. ``load_flow.py`` runs the plan.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ._dtensor import dtensor_class, is_dtensor
from ._tree import is_numpy_leaf, node_parts, tensor_to_numpy
from .errors import CheckpointError, CorruptCheckpointError
from .format.metadata import METADATA_FILE, Metadata, TensorRecord
from .format.values import decode_value
from .load_view import LoadView, assemble_saved, is_missing
from .local_plan import local_chunk
from .planning import ChunkStorageMetadata
from .planning.reshard import ChunkIndex, Overlap, chunk_overlap
from .read_ops import replaced_as_such
from .read_units import Read
from .storage.base import CheckpointSource, Storage

__all__ = ["LoadPlan", "plan_load", "plan_reads"]


@dataclass(slots=True)
class LoadPlan:
    reads: list[Read] = field(default_factory=list)
    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(target, host buffer) pairs copied in the finish step: GPU targets and casts."""
    fills: list[tuple[Any, Any]] = field(default_factory=list)
    """(target ndarray, loaded ndarray) pairs copied in the finish step."""


def plan_load(
    view: LoadView,
    md: Metadata,
    rank: int,
    world: int,
    storage: Storage,
    location: str,
    *,
    strict: bool,
    allow_pickle: bool,
    cast: bool,
    source: CheckpointSource | None = None,
) -> LoadPlan:
    """Match every leaf of the view with the checkpoint; record values, plan reads. Writes nothing."""
    plan = LoadPlan()
    made: dict[str, torch.Tensor] = {}  # tensors created for meta or missing targets, by fqn
    with torch.no_grad():
        for fqn, target in list(view.leaves.items()):
            if fqn in md.tensors:
                rec = md.tensors[fqn]
                # An array saved from numpy, or a numpy target, is loaded as a numpy array.
                as_numpy = not isinstance(target, torch.Tensor) and (
                    is_numpy_leaf(view.saved_node(fqn)) or _is_ndarray(target)
                )
                if not isinstance(target, torch.Tensor) and not is_missing(target) and not as_numpy:
                    raise CheckpointError(
                        f"key '{fqn}': checkpoint holds a tensor but the target is a "
                        f"{type(target).__qualname__}"
                    )
                if rec.per_rank and not _has_own_copy(
                    fqn, {c.rank for c in rec.chunks}, md.world_size, world, rank, strict, location
                ):
                    continue
                if is_missing(target) or as_numpy:
                    # Sized by the checkpoint, not by the caller: prove the bytes exist first.
                    _check_backed(storage, location, md, rec, fqn, source)
                if as_numpy:
                    _plan_numpy(view, plan, fqn, target, rec, rank, location)
                    continue
                dest, new = _prepare_tensor(fqn, target, rec, location, cast)
                if new is not None:
                    tied = made.get(view.tie_root(fqn))
                    if tied is not None:  # tied meta tensors stay one tensor, read once
                        view.set(fqn, tied, materialized=True)
                        continue
                    made[fqn] = new
                    view.set(fqn, new, materialized=True)
                host = dest
                if dest.device.type != "cpu" or dest.dtype != rec.dtype:
                    host = torch.empty(dest.shape, dtype=rec.dtype)
                    plan.copies.append((dest, host))
                tgt_tensor = new if new is not None else target
                whole = _whole_read(fqn, rec, tgt_tensor, host)
                if whole is not None:
                    plan.reads.append(whole)
                    continue
                _, tchunk, _ = local_chunk(fqn, tgt_tensor)
                plan.reads.extend(plan_reads(fqn, rec, tchunk, host, rank))
            elif fqn in md.values:
                rec_v = md.values[fqn]
                if rec_v.per_rank is not None:
                    holders: set[int | None] = {
                        r for r, enc in enumerate(rec_v.per_rank) if not _is_absent(enc)
                    }
                    if not _has_own_copy(fqn, holders, md.world_size, world, rank, strict, location):
                        continue
                value = _value_for(fqn, md, rank, allow_pickle, target)
                if isinstance(target, torch.Tensor):
                    raise CheckpointError(
                        f"key '{fqn}': target is a tensor but the checkpoint holds a "
                        f"{type(value).__qualname__}"
                    )
                view.set(fqn, value)
            elif is_missing(target):
                raise CorruptCheckpointError(
                    f"{location}/{METADATA_FILE}: the tree names '{fqn}', "
                    "which is neither a tensor nor a value"
                )
            elif not isinstance(target, torch.Tensor) and _set_per_index_value(
                view, fqn, md, rank, world, allow_pickle
            ):
                continue
            elif strict:
                raise CheckpointError(
                    f"key '{fqn}' is missing from checkpoint {location}; pass strict=False "
                    "to leave such keys untouched"
                )
    return plan


def _is_ndarray(value: object) -> bool:
    np = sys.modules.get("numpy")  # an ndarray exists only if numpy was imported
    return np is not None and isinstance(value, np.ndarray)


def _plan_numpy(
    view: LoadView, plan: LoadPlan, fqn: str, target: Any, rec: TensorRecord, rank: int, location: str
) -> None:
    """Read a saved tensor as a numpy array: into ``target`` at finish if it fits, else in its place."""
    host = torch.empty(rec.shape, dtype=rec.dtype)
    if _is_ndarray(target) and not is_numpy_leaf(view.saved_node(fqn)):
        try:
            host.numpy()
        except TypeError as exc:
            raise CheckpointError(
                f"key '{fqn}': target is a numpy array but {location} holds a {rec.dtype} tensor"
            ) from exc
    loaded = tensor_to_numpy(host, fqn, location)  # shares host's memory, which the reads fill
    if (
        _is_ndarray(target)
        and target.shape == loaded.shape
        and target.dtype == loaded.dtype
        and target.flags.writeable
    ):
        plan.fills.append((target, loaded))
    else:
        view.set(fqn, loaded)
    _, tchunk, _ = local_chunk(fqn, host)
    plan.reads.extend(plan_reads(fqn, rec, tchunk, host, rank))


class _NotAValue(Exception):
    pass


def _set_per_index_value(
    view: LoadView, fqn: str, md: Metadata, rank: int, world: int, allow_pickle: bool
) -> bool:
    """A plain list saved per index (format version 1) into a target that holds it as one value."""
    saved = view.saved_node(fqn)
    if node_parts(saved)[0] not in ("l", "t", "n"):
        return False

    def value_of(leaf: str) -> Any:
        rec = md.values.get(leaf)
        if rec is None:
            raise _NotAValue
        if rec.per_rank is not None and (world != md.world_size or _is_absent(rec.per_rank[rank])):
            raise _NotAValue
        return _value_for(leaf, md, rank, allow_pickle, None)

    try:
        view.set(fqn, assemble_saved(saved, fqn, value_of))
    except _NotAValue:
        return False
    return True


def _check_backed(
    storage: Storage,
    location: str,
    md: Metadata,
    rec: TensorRecord,
    fqn: str,
    source: CheckpointSource | None = None,
) -> None:
    for name in {c.file for c in rec.chunks}:
        if source is None:
            reader = storage.open_reader(location, name)
        else:
            with replaced_as_such(source, location):
                reader = source.open_reader(name)
        try:
            if reader.size() != md.files[name].size:
                raise CorruptCheckpointError(
                    f"{location}/{name}: size is {reader.size()} bytes, metadata says "
                    f"{md.files[name].size} (key '{fqn}')"
                )
        finally:
            reader.close()


def _is_absent(enc: Any) -> bool:
    return isinstance(enc, dict) and enc.get("$absent") is True


def _value_for(fqn: str, md: Metadata, rank: int, allow_pickle: bool, target: Any) -> Any:
    rec = md.values[fqn]
    enc = rec.value if rec.per_rank is None else rec.per_rank[rank]
    # The target's value lets an enum member come back as a member of its enum.
    return decode_value(enc, fqn=fqn, allow_pickle=allow_pickle, like=target)


def _has_own_copy(
    fqn: str, holders: set[int | None], saved_world: int, world: int, rank: int, strict: bool, location: str
) -> bool:
    """Whether this rank can load its own copy of a per-rank key; raises when strict and it cannot."""
    if world != saved_world:
        if not strict:
            return False
        raise CheckpointError(
            f"key '{fqn}' in {location} holds a different value on each of the "
            f"{saved_world} ranks that saved it; it can only be loaded with that world "
            f"size (now {world}). Drop the key from the target or load with strict=False."
        )
    if rank not in holders:
        if not strict:
            return False
        raise CheckpointError(f"key '{fqn}' was not saved by rank {rank} in {location}")
    return True


def _prepare_tensor(
    fqn: str, target: Any, rec: TensorRecord, location: str, cast: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local tensor to fill, and a replacement when the target had no memory."""
    if is_missing(target):
        new = torch.empty(rec.shape, dtype=rec.dtype)
        return new, new
    assert isinstance(target, torch.Tensor)
    if target.dtype != rec.dtype and (not cast or (rec.dtype.is_complex and not target.dtype.is_complex)):
        hint = (
            "; a complex tensor is not cast to a real one"
            if cast
            else ". Pass cast=True to load() to convert saved values to the target's dtype"
        )
        raise CheckpointError(
            f"key '{fqn}': dtype mismatch, target is {target.dtype} but {location} holds {rec.dtype}{hint}"
        )
    if tuple(target.shape) != rec.shape:
        raise CheckpointError(
            f"key '{fqn}': shape mismatch, target is {tuple(target.shape)} but {location} holds {rec.shape}"
        )
    if is_dtensor(target):
        dt: Any = target
        local = dt.to_local()
        if local.is_meta:
            fresh = torch.empty(local.shape, dtype=local.dtype, device=dt.device_mesh.device_type)
            new = dtensor_class().from_local(
                fresh,
                dt.device_mesh,
                dt.placements,
                run_check=False,
                shape=dt.shape,
                stride=dt.stride(),
            )
            return fresh, new
        return local, None
    if target.is_meta:
        new = torch.empty(target.shape, dtype=target.dtype)
        return new, new
    return target, None


def _whole_read(fqn: str, rec: TensorRecord, target: torch.Tensor, dest: torch.Tensor) -> Read | None:
    """The read of a tensor saved whole into a plain tensor: no chunk intersection to compute.

    The common case, met thousands of times per load; the general path's
    chunk objects and overlap cost ~10 us a tensor.
    """
    if rec.per_rank or len(rec.chunks) != 1 or is_dtensor(target):
        return None
    (chunk,) = rec.chunks
    if chunk.sizes != rec.shape or any(chunk.offsets):
        return None
    zeros = (0,) * len(rec.shape)
    return Read(fqn, chunk, Overlap(zeros, zeros, rec.shape), dest, rec.dtype)


def plan_reads(
    fqn: str,
    rec: TensorRecord,
    target: ChunkStorageMetadata,
    dest: torch.Tensor,
    rank: int,
) -> Iterator[Read]:
    chunks = rec.chunks
    if rec.per_rank:
        chunks = tuple(c for c in chunks if c.rank == rank)
    if len(chunks) == 1:
        # The common case (a whole tensor saved once): no index to build.
        ov = chunk_overlap(ChunkStorageMetadata(chunks[0].offsets, chunks[0].sizes), target)
        if ov is not None:
            yield Read(fqn, chunks[0], ov, dest, rec.dtype)
        return
    index = ChunkIndex([ChunkStorageMetadata(c.offsets, c.sizes) for c in chunks])
    for i, ov in index.overlapping(target):
        yield Read(fqn, chunks[i], ov, dest, rec.dtype)
