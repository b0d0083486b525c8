"""Load: match the target's leaves to saved chunks, read only the overlapping bytes, verify.

For every tensor in the target, this rank's chunk of it (the whole tensor, or a
DTensor's local shard) is intersected with the saved chunks. Where a saved
chunk coincides with the target chunk and the target is contiguous CPU memory,
bytes are read straight into the target; otherwise the smallest covering byte
range is read into a scratch buffer and the overlap copied out. Reads run on a
thread pool, checksums are verified per block, and nothing is unpickled unless
the caller allows it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ._dtensor import dtensor_class, is_dtensor
from .dist import Comm, run_collectively
from .errors import CheckpointError, CorruptCheckpointError
from .format.metadata import METADATA_FILE, Metadata, TensorRecord, decode_metadata
from .format.values import PickleRefusedError, decode_value
from .local_plan import local_chunk
from .planning import (
    ChunkStorageMetadata,
    MetadataIndex,
    PlanValidationError,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    validate_coverage,
)
from .planning.reshard import ChunkIndex, chunk_overlap
from .read_ops import Read, execute_reads
from .state_dict import LoadView, is_missing
from .storage.base import Storage

__all__ = ["load_collective", "read_checkpoint_metadata", "read_region"]


def read_checkpoint_metadata(storage: Storage, location: str) -> Metadata:
    md = decode_metadata(storage.read_metadata(location), where=f"{location}/{METADATA_FILE}")
    _validate_chunks(md, location)
    return md


def _validate_chunks(md: Metadata, location: str) -> None:
    items = []
    per_rank = set()
    for fqn, rec in md.tensors.items():
        if not rec.chunks and math.prod(rec.shape) > 0:
            raise CorruptCheckpointError(f"{location}/{METADATA_FILE}: tensor '{fqn}' has no saved chunks")
        if rec.per_rank:
            per_rank.add(fqn)
            _validate_per_rank(fqn, rec, location)
            continue
        if len(rec.chunks) == 1 and rec.chunks[0].sizes == rec.shape:
            continue  # one chunk as big as the tensor (in bounds: the parser checked) tiles it
        for c in rec.chunks:
            items.append(
                WriteItem(
                    MetadataIndex(fqn, c.offsets),
                    WriteItemType.SHARD,
                    TensorWriteData(ChunkStorageMetadata(c.offsets, c.sizes), rec.dtype, rec.shape),
                )
            )
    try:
        validate_coverage([SavePlan(items)], per_rank_fqns=frozenset(per_rank))
    except PlanValidationError as exc:
        raise CorruptCheckpointError(f"{location}/{METADATA_FILE}: {exc}") from None


def _validate_per_rank(fqn: str, rec: TensorRecord, location: str) -> None:
    """Each rank's copy of a per-rank tensor must be the whole tensor, once."""
    seen: set[int | None] = set()
    for c in rec.chunks:
        if c.rank in seen or c.sizes != rec.shape or any(c.offsets):
            raise CorruptCheckpointError(
                f"{location}/{METADATA_FILE}: per-rank tensor '{fqn}' has a partial or "
                f"duplicated copy for rank {c.rank}"
            )
        seen.add(c.rank)


def load_collective(
    comm: Comm,
    storage: Storage,
    location: str,
    state_dict: dict[str, Any],
    *,
    strict: bool,
    allow_pickle: bool,
    verify: bool,
) -> Metadata:
    def local() -> Metadata:
        md = read_checkpoint_metadata(storage, location)
        if md.pickled and not allow_pickle:
            raise PickleRefusedError(
                f"{location} holds pickled data, and unpickling runs code from the file. "
                "Pass allow_pickle=True to load() only if you trust this checkpoint."
            )
        view = LoadView(state_dict, md.tree)
        try:
            _load_into(
                view,
                md,
                comm.rank,
                comm.world_size,
                storage,
                location,
                strict=strict,
                allow_pickle=allow_pickle,
                verify=verify,
            )
        except BaseException:
            view.restore()
            raise
        view.finish()
        return md

    return run_collectively(comm, "load", local)


def _load_into(
    view: LoadView,
    md: Metadata,
    rank: int,
    world: int,
    storage: Storage,
    location: str,
    *,
    strict: bool,
    allow_pickle: bool,
    verify: bool,
) -> None:
    reads: list[Read] = []
    gpu_copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for fqn, target in list(view.leaves.items()):
            if fqn in md.tensors:
                rec = md.tensors[fqn]
                if not isinstance(target, torch.Tensor) and not is_missing(target):
                    raise CheckpointError(
                        f"key '{fqn}': checkpoint holds a tensor but the target is a "
                        f"{type(target).__qualname__}"
                    )
                if rec.per_rank and not _has_own_copy(
                    fqn, {c.rank for c in rec.chunks}, md.world_size, world, rank, strict, location
                ):
                    continue
                if is_missing(target):
                    # Sized by the checkpoint, not by the caller: prove the bytes exist first.
                    _check_backed(storage, location, md, rec, fqn)
                dest, new = _prepare_tensor(fqn, target, rec, location)
                if new is not None:
                    view.set(fqn, new, materialized=True)
                host = dest
                if dest.device.type != "cpu":
                    host = torch.empty(dest.shape, dtype=dest.dtype)
                    gpu_copies.append((dest, host))
                tgt_tensor = new if new is not None else target
                _, tchunk, _ = local_chunk(fqn, tgt_tensor)
                reads.extend(_plan_reads(fqn, rec, tchunk, host, rank))
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
            elif strict:
                raise CheckpointError(
                    f"key '{fqn}' is missing from checkpoint {location}; pass strict=False "
                    "to leave such keys untouched"
                )
        execute_reads(reads, storage, location, md, verify)
        for dest, host in gpu_copies:
            dest.copy_(host, non_blocking=False)


def _check_backed(storage: Storage, location: str, md: Metadata, rec: TensorRecord, fqn: str) -> None:
    for name in {c.file for c in rec.chunks}:
        reader = storage.open_reader(location, name)
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
    fqn: str, target: Any, rec: TensorRecord, location: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local tensor to fill, and a replacement when the target had no memory."""
    if is_missing(target):
        new = torch.empty(rec.shape, dtype=rec.dtype)
        return new, new
    assert isinstance(target, torch.Tensor)
    if target.dtype != rec.dtype:
        raise CheckpointError(
            f"key '{fqn}': dtype mismatch, target is {target.dtype} but {location} holds {rec.dtype}"
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


def _plan_reads(
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


def read_region(
    storage: Storage,
    location: str,
    md: Metadata,
    fqn: str,
    offsets: tuple[int, ...],
    out: torch.Tensor,
    *,
    verify: bool = True,
) -> None:
    """Fill ``out`` (a CPU tensor) with the box of tensor ``fqn`` starting at ``offsets``.

    The building block for streaming conversions: any region of any saved
    tensor, whatever layout it was saved in, read and verified.
    """
    rec = md.tensors.get(fqn)
    if rec is None:
        raise CheckpointError(f"key '{fqn}' is not a tensor in {location}")
    if rec.per_rank:
        raise CheckpointError(f"key '{fqn}' in {location} was saved per rank; read it with load()")
    if out.dtype != rec.dtype:
        raise CheckpointError(f"key '{fqn}': output dtype {out.dtype} differs from saved {rec.dtype}")
    target = ChunkStorageMetadata(offsets, tuple(out.shape))
    if any(o + s > d for o, s, d in zip(target.offsets, target.sizes, rec.shape, strict=True)):
        raise CheckpointError(f"key '{fqn}': region {offsets} + {tuple(out.shape)} exceeds {rec.shape}")
    reads = list(_plan_reads(fqn, rec, target, out, rank=0))
    execute_reads(reads, storage, location, md, verify)
