"""Reading local checkpoints: shard readers, and a checkpoint held open by its directory.

A load opens the checkpoint's directory once and opens ``metadata.json`` and
every shard relative to that descriptor (``openat``). A save that replaces the
checkpoint renames a new directory into place and deletes the old one; the
descriptor keeps naming the old one, so files opened through it keep reading
the old save, and a file not yet opened is either the old save's or gone
(CheckpointReplacedError), never the new save's.

While the load decodes ``metadata.json`` and plans (50 ms for 2,872 tensors
here), the disk would sit idle: :class:`HeadPrefetch` asks the kernel to read
the head of the shard this rank most likely reads first meanwhile, until the
load's own reads begin. One ``POSIX_FADV_WILLNEED`` reads at most the
device's readahead maximum (8 MiB here: ``read_ahead_kb``, ``max_sectors_kb``),
so it is asked window by window, from a thread, because each call also
allocates the window's page cache before it returns.
"""

from __future__ import annotations

import glob
import os
import stat
import threading
from collections.abc import Sequence
from pathlib import Path

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..format.metadata import METADATA_FILE
from .source import replaced_error

__all__ = ["DirSource", "FileReader", "HeadPrefetch", "open_regular"]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# One readahead request per call (the kernel caps each at its readahead maximum).
_WINDOW = 8 << 20


def open_regular(path: Path, *, name: str | None = None, dir_fd: int | None = None) -> int:
    """Open for reading, refusing anything but a regular file.

    With ``dir_fd``, ``name`` is opened relative to it (``path`` is only for
    messages). O_NONBLOCK keeps a FIFO planted in a checkpoint from blocking
    the open; the type check then refuses it, and devices and sockets with it.
    """
    target = name if dir_fd is not None and name is not None else path
    fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return fd


class FileReader:
    """Positional reads of one open file; thread-safe (``preadv`` has no shared offset)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._path = path
        self._fd = fd
        self._size = os.fstat(fd).st_size

    @classmethod
    def at(cls, path: Path) -> FileReader:
        try:
            return cls(open_regular(path), path)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"shard file {path} is missing") from None
        except IsADirectoryError:
            raise CorruptCheckpointError(f"{path} is a directory, not a shard file") from None

    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                raise CorruptCheckpointError(
                    f"{self._path}: truncated; wanted bytes [{offset}, {offset + len(buf)}) "
                    f"of a {self._size}-byte file"
                )
            done += n

    def readinto_many(self, offset: int, bufs: list[memoryview]) -> None:
        """Fill consecutive buffers from ``offset`` with one vectored read (``preadv``)."""
        pending = [b for b in bufs if len(b)]
        pos = offset
        while pending:
            n = os.preadv(self._fd, pending, pos)
            if n == 0:
                total = sum(len(b) for b in bufs)
                raise CorruptCheckpointError(
                    f"{self._path}: truncated; wanted bytes [{offset}, {offset + total}) "
                    f"of a {self._size}-byte file"
                )
            pos += n
            while pending and n >= len(pending[0]):
                n -= len(pending[0])
                pending.pop(0)
            if pending and n:
                pending[0] = pending[0][n:]

    def close(self) -> None:
        os.close(self._fd)


class HeadPrefetch:
    """Pull the first ``limit`` bytes of an open file into the page cache, window by window, until stopped.

    Owns ``fd`` and closes it. Advice only: nothing is read into this process,
    and an error ends the prefetch, never the load.
    """

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="async_ckpt-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            end = min(self._limit, os.fstat(self._fd).st_size)
            for pos in range(0, end, _WINDOW):
                if self._stop.is_set():
                    break
                os.posix_fadvise(self._fd, pos, min(_WINDOW, end - pos), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(self._fd)

    def stop(self) -> None:
        """Ask no more windows; returns once the thread is done (one window's request at most)."""
        self._stop.set()
        self._thread.join()


def read_metadata_at(location: str) -> bytes:
    """``metadata.json`` by path: one open, so it is one save's whole file."""
    path = Path(location) / METADATA_FILE
    try:
        fd = open_regular(path)
    except (FileNotFoundError, NotADirectoryError):
        raise _not_found(location) from None
    except PermissionError as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    except IsADirectoryError:
        raise CorruptCheckpointError(f"{path} is a directory") from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _not_found(location: str) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(f"no committed checkpoint at {location} ({METADATA_FILE} not found)")


class DirSource:
    """A local checkpoint held by a descriptor of its directory (see the module docstring)."""

    pinned = True

    def __init__(self, location: str) -> None:
        self._location = location
        try:
            self._dir = os.open(location, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            final = Path(location)
            if any(final.parent.glob(f".{glob.escape(final.name)}.old-*")):
                # A commit between its two renames (file systems without an atomic swap).
                raise replaced_error(location, "caught between a commit's renames") from None
            raise _not_found(location) from None
        except PermissionError as exc:
            raise CheckpointError(f"cannot read {location}: {exc}") from exc
        try:
            self._metadata = self._read_metadata()
        except BaseException:
            os.close(self._dir)
            raise
        self._prefetch: HeadPrefetch | None = None

    def _read_metadata(self) -> bytes:
        path = Path(self._location) / METADATA_FILE
        try:
            fd = open_regular(path, name=METADATA_FILE, dir_fd=self._dir)
        except FileNotFoundError:
            if self.replaced():  # opened just as a save renamed it away: it is being deleted
                raise replaced_error(self._location, f"{METADATA_FILE} vanished") from None
            raise _not_found(self._location) from None
        except PermissionError as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from exc
        except IsADirectoryError:
            raise CorruptCheckpointError(f"{path} is a directory") from None
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def metadata(self) -> bytes:
        return self._metadata

    def open_reader(self, name: str) -> FileReader:
        path = Path(self._location) / name
        try:
            return FileReader(open_regular(path, name=name, dir_fd=self._dir), path)
        except FileNotFoundError:
            if self.replaced():
                raise replaced_error(self._location, f"shard {name} was deleted with it") from None
            raise CorruptCheckpointError(f"shard file {path} is missing") from None
        except IsADirectoryError:
            raise CorruptCheckpointError(f"{path} is a directory, not a shard file") from None

    def prefetch(self, names: Sequence[str], limit: int) -> None:
        if self._prefetch is not None or limit <= 0 or not hasattr(os, "posix_fadvise"):
            return
        for name in names:
            try:
                fd = open_regular(Path(self._location) / name, name=name, dir_fd=self._dir)
            except (OSError, CorruptCheckpointError):
                continue  # not this save's naming, or not a file: the load reports that if it reads it
            try:
                self._prefetch = HeadPrefetch(fd, limit)
            except RuntimeError:  # no thread to be had: the load goes on without
                os.close(fd)
            return

    def stop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.stop()

    def replaced(self) -> bool:
        try:
            now = os.stat(self._location)
            os.stat(METADATA_FILE, dir_fd=self._dir)
        except OSError:
            return True  # renamed away and being deleted, or un-committed by a delete
        held = os.fstat(self._dir)
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def close(self) -> None:
        self.stop_prefetch()
        os.close(self._dir)
