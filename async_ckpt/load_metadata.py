"""The metadata a load reads: decoded, checked against itself, and still naming one save.

``read_checkpoint_metadata`` is the checked decode every reader uses (load,
verify, convert, ``read_metadata``). The rest proves a reader read one save
of a path that another process may be saving to again: ``same_checkpoint``
and ``unchanged_while`` for readers that read the metadata once and then
shards by path (verify, convert); ``check_same_save`` for the ranks of one
load, each of which reads ``metadata.json`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from .dist import Comm
from .errors import CheckpointError, CorruptCheckpointError
from .format.metadata import METADATA_FILE, Metadata, TensorRecord, decode_metadata
from .planning import (
    ChunkStorageMetadata,
    MetadataIndex,
    PlanValidationError,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    validate_coverage,
)
from .storage.base import Storage
from .storage.source import replaced_error

__all__ = [
    "check_same_save",
    "decode_checked",
    "read_checkpoint_metadata",
    "same_checkpoint",
    "unchanged_while",
    "validate_chunks",
]


def read_checkpoint_metadata(storage: Storage, location: str) -> Metadata:
    return decode_checked(storage.read_metadata(location), location)


def same_checkpoint(storage: Storage, location: str, md: Metadata) -> bool:
    """Whether ``location`` still holds the save ``md`` was read from.

    For ``verify`` and ``convert``, which read the metadata once, then shards by
    path: a read that failed its checksums is damage only if this holds.
    """
    try:
        now = read_checkpoint_metadata(storage, location)
    except CheckpointError:
        return False  # un-committed, deleted, or replaced by something unreadable
    # Every save has its own token; checkpoints from before tokens compare whole.
    return now.token == md.token if md.token is not None else now == md


@contextmanager
def unchanged_while(storage: Storage, location: str, md: Metadata) -> Iterator[None]:
    """Verified reads by path inside the block: a save replacing ``md``'s is CheckpointReplacedError.

    Bytes that passed ``md``'s checksums are ``md``'s save's, wherever they were
    read from, so only a failed read needs the check (never call it damage).
    """
    try:
        yield
    except CorruptCheckpointError as exc:
        if not same_checkpoint(storage, location, md):
            raise replaced_error(location) from exc
        raise


def decode_checked(raw: bytes, location: str) -> Metadata:
    where = f"{location}/{METADATA_FILE}"
    md = decode_metadata(raw, where=where)
    validate_chunks(md.tensors, where)
    return md


def validate_chunks(tensors: Mapping[str, TensorRecord], where: str) -> None:
    """Every tensor's saved chunks tile it exactly (per-rank tensors: one whole copy per rank).

    Shared by our metadata and DCP's translated metadata; ``where`` names the file.
    """
    items = []
    per_rank = set()
    for fqn, rec in tensors.items():
        if not rec.chunks and math.prod(rec.shape) > 0:
            raise CorruptCheckpointError(f"{where}: tensor '{fqn}' has no saved chunks")
        if rec.per_rank:
            per_rank.add(fqn)
            _validate_per_rank(fqn, rec, where)
            continue
        if len(rec.chunks) == 1 and rec.chunks[0].sizes == rec.shape:
            continue  # one chunk as big as the tensor (in bounds: the parser checked) tiles it
        for c in rec.chunks:
            items.append(
                WriteItem(
                    MetadataIndex(fqn, c.offsets),
                    WriteItemType.SHARD,
                    TensorWriteData(
                        ChunkStorageMetadata(c.offsets, c.sizes),
                        TensorProperties(rec.dtype_name, rec.itemsize),
                        rec.shape,
                    ),
                )
            )
    try:
        validate_coverage([SavePlan(items)], per_rank_fqns=frozenset(per_rank))
    except PlanValidationError as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def _validate_per_rank(fqn: str, rec: TensorRecord, where: str) -> None:
    """Each rank's copy of a per-rank tensor must be the whole tensor, once."""
    seen: set[int | None] = set()
    for c in rec.chunks:
        if c.rank in seen or c.sizes != rec.shape or any(c.offsets):
            raise CorruptCheckpointError(
                f"{where}: per-rank tensor '{fqn}' has a partial or duplicated copy for rank {c.rank}"
            )
        seen.add(c.rank)


def check_same_save(comm: Comm, md: Metadata, location: str) -> None:
    """Every rank read its own metadata.json: they must all be one save's."""
    if comm.world_size == 1:
        return
    tokens = comm.gather(md.token)
    differ = comm.broadcast(None if tokens is None else sorted({str(t) for t in tokens}))
    if len(differ) > 1:
        raise replaced_error(location, f"the ranks read different saves: {', '.join(differ)}")
