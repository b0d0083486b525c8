"""What a storage backend must do. Backends move bytes; they never see tensors.

Writing a checkpoint is a small protocol, the same on every backend:
``begin_save`` (coordinator) -> ``open_shard`` / write / ``finish`` (every
rank) -> ``commit`` (coordinator, after every rank's shards are durable), or
``abort_save`` on failure. ``commit`` makes ``metadata.json`` visible last and
atomically, so a reader either sees a complete checkpoint or none.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["ShardReader", "ShardSink", "Storage"]


@runtime_checkable
class ShardSink(Protocol):
    """An open shard file being written, sequentially.

    A sink may also have ``async reserve(nbytes)``: the writer calls it first
    with the file's final size (the local O_DIRECT sink allocates it up front).
    """

    async def write(self, data: memoryview) -> None: ...

    async def finish(self) -> None:
        """Flush and make the file durable (fsync where the backend has it), then close."""
        ...

    async def abort(self) -> None: ...


@runtime_checkable
class ShardReader(Protocol):
    """Random-access reads of one committed file; safe to call from several threads."""

    def size(self) -> int: ...

    def readinto(self, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` from ``offset``; raise CorruptCheckpointError on a short read."""
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

    def open_reader(self, location: str, name: str) -> ShardReader: ...

    def list_children(self, root: str) -> list[str]:
        """Locations of the entries directly under ``root`` (for managers and ``ls``)."""
        ...

    def delete(self, location: str) -> None:
        """Remove a checkpoint and everything in it (retention)."""
        ...

    def remove_uncommitted(self, root: str) -> list[str]:
        """Delete leftovers of interrupted saves under ``root``; return what was removed."""
        ...
