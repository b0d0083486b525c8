"""Opening one committed checkpoint for reading, on any backend.

``open_checkpoint`` uses the backend's own ``open_checkpoint`` where it is a
``CheckpointOpener`` (LocalStorage holds the directory open, so nothing read can be swapped);
otherwise it reads by path and proves afterwards that nothing was: a save that
replaces a checkpoint changes its ``metadata.json`` (first un-committing it on
object stores, or renaming a new directory over it) before any shard the old
one names, and every save's ``metadata.json`` is unique (it holds the save's
token). So if ``metadata.json`` reads the same after the data as before, the
data is the old save's, whole.
"""

from __future__ import annotations

from ..errors import CheckpointNotFoundError, CheckpointReplacedError, CorruptCheckpointError
from .base import CheckpointOpener, CheckpointSource, ShardReader, Storage

__all__ = ["PathSource", "open_checkpoint", "replaced_error"]


def open_checkpoint(storage: Storage, location: str) -> CheckpointSource:
    if isinstance(storage, CheckpointOpener):
        return storage.open_checkpoint(location)
    return PathSource(storage, location)


def replaced_error(location: str, detail: str = "") -> CheckpointReplacedError:
    """The one wording of "replaced during the load", so callers can rely on it."""
    why = f" ({detail})" if detail else ""
    return CheckpointReplacedError(
        f"{location} was replaced (or removed) by another save while it was being read{why}; "
        "nothing was loaded from it. Read it again to get the checkpoint that is there now."
    )


class PathSource:
    """A checkpoint read by path; :meth:`replaced` re-reads ``metadata.json`` and compares."""

    pinned = False

    def __init__(self, storage: Storage, location: str) -> None:
        self._storage = storage
        self._location = location
        self._metadata = storage.read_metadata(location)

    def metadata(self) -> bytes:
        return self._metadata

    def open_reader(self, name: str) -> ShardReader:
        return self._storage.open_reader(self._location, name)

    def replaced(self) -> bool:
        try:
            return self._storage.read_metadata(self._location) != self._metadata
        except (CheckpointNotFoundError, CorruptCheckpointError):
            return True  # un-committed by a save in progress, or deleted

    def close(self) -> None:
        pass
