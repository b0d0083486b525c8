"""One DCP checkpoint as a ``CheckpointSource`` whose files are its tensor chunks, as raw row-major bytes.

The names are the virtual chunk names of :mod:`.dcp_metadata`. Opening one
finds the tensor bytes inside the chunk's ``torch.save`` blob and serves reads
from the real data file, in place; a blob that does not hold them as is
(strided, transformed) is decoded with ``torch.load(weights_only=True)`` and
served from memory. The real data files are opened once each and shared.

DCP overwrites a checkpoint in place, and every save's ``.metadata`` differs
(it holds a fresh ``save_id``): :meth:`DcpSource.replaced` re-reads it and
compares, so a load that raced a ``dcp.save`` to the same directory fails
instead of returning a mix.
"""

from __future__ import annotations

import threading
from types import TracebackType

import torch

from ..errors import CheckpointError, CorruptCheckpointError
from ..local_plan import raw_bytes
from ..storage.base import ShardReader, Storage
from .dcp_blob import NeedsPickle, load_blob, locate_tensor_bytes, read_blob
from .dcp_metadata import DCP_METADATA_FILE, BlobRef, DcpCheckpoint, read_file

__all__ = ["DcpSource"]


class _RangeReader:
    """Bytes ``[start, start + size)`` of a shared reader; closing it leaves the shared one open."""

    def __init__(self, base: ShardReader, start: int, size: int) -> None:
        self._base, self._start, self._size = base, start, size

    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset + len(buf) > self._size:
            raise CorruptCheckpointError(f"read past the end of a {self._size}-byte DCP chunk")
        self._base.readinto(self._start + offset, buf)

    def close(self) -> None:
        pass


class _MemoryReader:
    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor = tensor  # keeps the bytes alive
        self._bytes = raw_bytes(tensor)

    def size(self) -> int:
        return len(self._bytes)

    def readinto(self, offset: int, buf: memoryview) -> None:
        if offset + len(buf) > len(self._bytes):
            raise CorruptCheckpointError(f"read past the end of a {len(self._bytes)}-byte DCP chunk")
        buf[:] = self._bytes[offset : offset + len(buf)]

    def close(self) -> None:
        pass


class DcpSource:
    """Reads of one DCP checkpoint, chunk by chunk (names are the virtual chunk names)."""

    pinned = False
    read_threads = 1  # chunks are small, torch.save blobs are read one at a time

    def __init__(self, backend: Storage, location: str, ckpt: DcpCheckpoint) -> None:
        self._backend, self._location, self._ckpt = backend, location, ckpt
        self._files: dict[str, ShardReader] = {}
        self._lock = threading.Lock()

    def metadata(self) -> bytes:
        return self._ckpt.raw

    @property
    def needs_pickle(self) -> frozenset[str]:
        """Value keys that only full unpickling reads (left unread: see ``DcpCheckpoint``)."""
        return self._ckpt.needs_pickle

    def replaced(self) -> bool:
        try:
            return read_file(self._backend, self._location, DCP_METADATA_FILE) != self._ckpt.raw
        except (CheckpointError, OSError):
            return True

    def __enter__(self) -> DcpSource:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for reader in self._files.values():
                reader.close()
            self._files.clear()

    def open_reader(self, *where: str) -> ShardReader:
        """The chunk ``name`` (``open_reader(name)``, or ``open_reader(location, name)`` as a Storage)."""
        name = where[-1]
        if name in self._ckpt.memory:
            return _MemoryReader(self._ckpt.memory[name])
        ref = self._ckpt.blobs.get(name)
        location = self._location
        if ref is None:
            raise CheckpointError(f"{location}: no DCP chunk named {name!r}")
        base = self._file(ref.file)
        if ref.offset + ref.length > base.size():
            raise CorruptCheckpointError(
                f"{location}/{ref.file}: key '{ref.fqn}' lies at bytes [{ref.offset}, "
                f"{ref.offset + ref.length}), past the end of the {base.size()}-byte file"
            )
        if not ref.transforms:
            start = locate_tensor_bytes(base, ref.offset, ref.length, ref.dtype, ref.sizes)
            if start is not None:
                return _RangeReader(base, start, self._ckpt.md.files[name].size)
        return _MemoryReader(self._decode(base, ref))

    def _file(self, name: str) -> ShardReader:
        with self._lock:
            if name not in self._files:
                self._files[name] = self._backend.open_reader(self._location, name)
            return self._files[name]

    def _decode(self, base: ShardReader, ref: BlobRef) -> torch.Tensor:
        where = (
            f"{self._location}/{ref.file} (key '{ref.fqn}', bytes [{ref.offset}, {ref.offset + ref.length}))"
        )
        blob = read_blob(base, ref.offset, ref.length, ref.transforms, where)
        try:
            tensor = load_blob(blob, allow_pickle=False, where=where)
        except NeedsPickle:
            raise CheckpointError(
                f"{where}: the tensor chunk holds objects other than a tensor; refusing to unpickle it"
            ) from None
        if (
            not isinstance(tensor, torch.Tensor)
            or tensor.dtype != ref.dtype
            or tuple(tensor.shape) != ref.sizes
        ):
            got = (
                f"{tensor.dtype} {tuple(tensor.shape)}"
                if isinstance(tensor, torch.Tensor)
                else type(tensor).__name__
            )
            raise CorruptCheckpointError(
                f"{where}: chunk holds {got}, the metadata says {ref.dtype} {ref.sizes}"
            )
        return tensor.detach().contiguous()
