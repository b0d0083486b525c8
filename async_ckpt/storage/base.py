"""What a storage backend must do. Backends move bytes; they never see tensors.

Writing a checkpoint is a small protocol, the same on every backend:
``begin_save`` (coordinator) -> ``open_shard`` / write / ``finish`` (every
rank) -> ``commit`` (coordinator, after every rank's shards are durable), or
``abort_save`` on failure. ``commit`` makes ``metadata.json`` visible last and
atomically, so a reader either sees a complete checkpoint or none.

Reading is the same backwards, through one :class:`CheckpointSource` per
load: the metadata and every shard come from the same committed save, or the
load fails with CheckpointReplacedError. A backend without
:class:`CheckpointOpener`, a third-party backend for instance, is read by path
(``storage/source.py``), which relies on this contract: a save that will
replace a committed checkpoint changes or removes its ``metadata.json`` before
it changes any shard the old one names, and every save's ``metadata.json``
differs from every other's (it holds the save's token).

What a backend must implement: :class:`Storage`, whose ``open_shard`` returns
a :class:`ShardSink` and ``open_reader`` a :class:`ShardReader`. Everything
else is optional, declared below as a small protocol of its own; the library
checks for each with ``isinstance`` and does without it where it is missing:

* :class:`CheckpointOpener` (Storage): without it a load reads by path and
  proves afterwards that it read one save;
* :class:`PrefetchingSource` (CheckpointSource): without it the disk waits
  while a load decodes the metadata and plans;
* :class:`ReadThreadsHint` (Storage): without it a load keeps 8 reads in flight;
* :class:`FilesPerRankHint` (Storage): without it a rank writes up to 4 shard
  files at once;
* :class:`ReservingSink` (ShardSink): without it nothing is reserved first;
* :class:`VectoredSink` (ShardSink): without it small pieces are written one
  call each;
* :class:`VectoredReader` (ShardReader): without it adjacent chunks are read
  one call each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "CheckpointOpener",
    "CheckpointSource",
    "FilesPerRankHint",
    "PrefetchingSource",
    "ReadThreadsHint",
    "ReservingSink",
    "ShardReader",
    "ShardSink",
    "Storage",
    "VectoredReader",
    "VectoredSink",
]


@runtime_checkable
class ShardSink(Protocol):
    """An open shard file being written, sequentially.

    Optional: :class:`ReservingSink`, :class:`VectoredSink`.
    """

    async def write(self, data: memoryview) -> None: ...

    async def finish(self) -> None:
        """Flush and make the file durable (fsync where the backend has it), then close."""
        ...

    async def abort(self) -> None: ...


@runtime_checkable
class ShardReader(Protocol):
    """Random-access reads of one committed file; safe to call from several threads.

    Optional: :class:`VectoredReader`.
    """

    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; raise CorruptCheckpointError on a short read."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class CheckpointSource(Protocol):
    """One committed checkpoint, held for reading: what ``Storage.open_checkpoint`` returns.

    A load reads :meth:`metadata` first, then opens every shard it needs with
    :meth:`open_reader` at once, reads, and finally, unless the source is
    ``pinned`` or the load verified every byte against the metadata's
    checksums, asks :meth:`replaced`: a source read by path cannot tell that a
    shard was overwritten between the metadata read and the data read until
    then. A read that fails (a missing or short file, a checksum mismatch) is
    also checked with :meth:`replaced`, so a checkpoint replaced during the
    load is reported as such, never as damaged.
    """

    pinned: bool
    """True when readers keep reading the save they were opened on even if it is
    replaced after (open file descriptors of a directory that was renamed away)."""

    def metadata(self) -> bytes:
        """The ``metadata.json`` this source was opened on (read once, when opened)."""
        ...

    def open_reader(self, name: str) -> ShardReader:
        """A shard of the same save; CheckpointReplacedError if it is gone because the save was replaced."""
        ...

    def replaced(self) -> bool:
        """Whether the location now holds another checkpoint than :meth:`metadata`'s, or none."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Storage(Protocol):
    """A backend. ``location`` is what :meth:`resolve` made of a checkpoint id."""

    def resolve(self, checkpoint_id: object) -> str: ...

    def begin_save(self, location: str, token: str) -> None: ...

    async def open_shard(self, location: str, token: str, name: str) -> ShardSink: ...

    def commit(self, location: str, token: str, metadata: bytes) -> None: ...

    def abort_save(self, location: str, token: str) -> None: ...

    def read_metadata(self, location: str) -> bytes:
        """The committed ``metadata.json``; CheckpointNotFoundError if there is none."""
        ...

    def open_reader(self, location: str, name: str) -> ShardReader:
        """A committed shard, by path. Loads use :class:`CheckpointOpener` where the backend is one."""
        ...

    def list_children(self, root: str) -> list[str]:
        """Locations of the entries directly under ``root`` (for managers and ``ls``)."""
        ...

    def delete(self, location: str) -> None:
        """Remove a checkpoint and everything in it (retention)."""
        ...

    def remove_uncommitted(self, root: str) -> list[str]:
        """Delete leftovers of interrupted saves under ``root``; return what was removed."""
        ...


# ------------------------------------------------------- optional capabilities


@runtime_checkable
class CheckpointOpener(Protocol):
    """A Storage that can hold one committed checkpoint for a load (LocalStorage: its directory, open)."""

    def open_checkpoint(self, location: str) -> CheckpointSource: ...


@runtime_checkable
class PrefetchingSource(Protocol):
    """A CheckpointSource that can start pulling the head of a shard into a cache in the background.

    A load calls :meth:`prefetch` as soon as it holds the source, with the names
    this rank most likely reads first, so the disk works while the load decodes
    the metadata and plans (tens of milliseconds for thousands of tensors, when
    the disk would otherwise be idle), and :meth:`stop_prefetch` when its own
    reads begin. Both are hints: neither may fail the load.
    """

    def prefetch(self, names: Sequence[str], limit: int) -> None:
        """Pull up to ``limit`` bytes from the start of the first of ``names`` that exists."""
        ...

    def stop_prefetch(self) -> None:
        """Stop pulling; returns once nothing more will be asked of the disk."""
        ...


@runtime_checkable
class ReadThreadsHint(Protocol):
    """A Storage that says how many reads a load should keep in flight (at least 1)."""

    read_threads: int


@runtime_checkable
class FilesPerRankHint(Protocol):
    """A Storage that says how many shard files one rank's save should write at once, at most (at least 1).

    The save writes at most 4 whatever the hint says, and fewer for a small state dict.
    """

    files_per_rank: int


@runtime_checkable
class ReservingSink(Protocol):
    """A ShardSink that can allocate the file's final size before its first write.

    The writer calls ``reserve`` once, first, with the file's exact size
    (the local O_DIRECT sink allocates it, so the file stays contiguous and
    a full disk fails the save before anything is written).
    """

    async def reserve(self, nbytes: int) -> None: ...


@runtime_checkable
class AligningSink(Protocol):
    """A ShardSink that writes a large source from where it lies when its address and its file
    offset agree modulo ``alignment`` (O_DIRECT), and copies the rest; ``copied`` counts those bytes.

    The writer orders each file's entries and pads its header to make that so
    for as many bytes as it can.
    """

    alignment: int
    direct_min: int
    """Sources shorter than this are copied whatever their address."""
    copied: int


@runtime_checkable
class VectoredSink(Protocol):
    """A ShardSink that writes many small pieces in one call (``writev``), in order."""

    async def write_many(self, parts: list[memoryview]) -> None: ...


@runtime_checkable
class VectoredReader(Protocol):
    """A ShardReader that fills several buffers from consecutive bytes at ``offset`` in one call."""

    def readinto_many(self, offset: int, bufs: list[memoryview]) -> None: ...
