"""The writer pipeline: shard files written concurrently, checksummed on the fly, fsynced.

State of one file: open -> header written -> each chunk streamed in pieces
(hashing each checksum block as it passes) -> flushed and fsynced -> closed.
At most ``max_files`` files are open at once and at most one piece per file is
in flight, so memory beyond the source buffers stays bounded. Any failure
cancels the other files (TaskGroup) and aborts every open file.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..format import checksum
from ..format.shard import ShardEntry, layout_shard
from ..storage.base import ReservingSink, ShardSink, Storage, VectoredSink

__all__ = ["FileJob", "WriteEntry", "WrittenChunk", "WrittenFile", "write_files"]

PIECE_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class WriteEntry:
    fqn: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: str
    """Our dtype name (``format/dtypes.py``)."""
    name: str
    nbytes: int
    source: Callable[[], memoryview]
    rank: int | None = None
    global_shape: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class FileJob:
    name: str
    entries: tuple[WriteEntry, ...]


@dataclass(frozen=True, slots=True)
class WrittenChunk:
    fqn: str
    dtype: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    name: str
    byte_offset: int
    byte_length: int
    checksums: tuple[str, ...]
    rank: int | None


@dataclass(frozen=True, slots=True)
class WrittenFile:
    name: str
    size: int
    header_length: int
    header_checksum: str
    chunks: tuple[WrittenChunk, ...]


async def write_files(
    storage: Storage,
    location: str,
    token: str,
    jobs: Sequence[FileJob],
    *,
    block_size: int,
    max_files: int = 4,
) -> list[WrittenFile]:
    if PIECE_BYTES % block_size:
        raise ValueError(f"block size {block_size} must divide the piece size {PIECE_BYTES}")
    gate = asyncio.Semaphore(max_files)
    results: list[WrittenFile | None] = [None] * len(jobs)

    async def one(i: int, job: FileJob) -> None:
        async with gate:
            results[i] = await _write_file(storage, location, token, job, block_size)

    try:
        async with asyncio.TaskGroup() as group:
            for i, job in enumerate(jobs):
                group.create_task(one(i, job))
    except BaseExceptionGroup as group_error:
        # Callers want the first real cause (ENOSPC, EACCES...), not a wrapper.
        raise _first_cause(group_error) from None
    return [r for r in results if r is not None]


async def _write_file(
    storage: Storage, location: str, token: str, job: FileJob, block_size: int
) -> WrittenFile:
    layout = layout_shard(
        [ShardEntry(e.name, e.dtype, e.sizes, e.nbytes) for e in job.entries],
        {"format": "async_ckpt", "format_version": "1"},
    )
    sink = await storage.open_shard(location, token, job.name)
    try:
        if isinstance(sink, ReservingSink):
            await sink.reserve(layout.size)
        out = _Batcher(sink)
        await out.add(memoryview(layout.header))
        chunks = []
        for entry, start in zip(job.entries, layout.offsets, strict=True):
            sums = await _stream(out, entry, block_size)
            chunks.append(
                WrittenChunk(
                    entry.fqn,
                    entry.dtype,
                    entry.global_shape,
                    entry.offsets,
                    entry.sizes,
                    entry.name,
                    start,
                    entry.nbytes,
                    tuple(sums),
                    entry.rank,
                )
            )
        await out.flush()
        await sink.finish()
    except BaseException:
        await _quiet_abort(sink)
        raise
    return WrittenFile(
        name=job.name,
        size=layout.size,
        header_length=len(layout.header),
        header_checksum=checksum.digest(layout.header),
        chunks=tuple(chunks),
    )


class _Batcher:
    """Gathers small pieces into one vectored write: a thread hop per tensor would dominate
    a state dict of thousands of small tensors. Holds references, never copies."""

    _MAX_BYTES = 16 << 20
    _MAX_PARTS = 512  # below IOV_MAX (1024 on Linux)

    def __init__(self, sink: ShardSink) -> None:
        self._sink = sink
        self._write_many = sink.write_many if isinstance(sink, VectoredSink) else None
        self._parts: list[memoryview] = []
        self._bytes = 0

    async def add(self, piece: memoryview) -> None:
        if self._write_many is None or len(piece) >= self._MAX_BYTES:
            await self.flush()
            await self._sink.write(piece)
            return
        self._parts.append(piece)
        self._bytes += len(piece)
        if self._bytes >= self._MAX_BYTES or len(self._parts) >= self._MAX_PARTS:
            await self.flush()

    async def flush(self) -> None:
        if not self._parts:
            return
        parts, self._parts, self._bytes = self._parts, [], 0
        if len(parts) == 1 or self._write_many is None:
            for part in parts:
                await self._sink.write(part)
        else:
            await self._write_many(parts)


async def _stream(sink: _Batcher, entry: WriteEntry, block_size: int) -> list[str]:
    data = entry.source()
    if len(data) != entry.nbytes:
        raise RuntimeError(
            f"key '{entry.fqn}': staged {len(data)} bytes but planned {entry.nbytes}; "
            "was the tensor resized during the save?"
        )
    if not len(data):
        return [checksum.digest(data)]
    sums: list[str] = []
    for pos in range(0, len(data), PIECE_BYTES):
        piece = data[pos : pos + PIECE_BYTES]
        sums.extend(checksum.block_digests(piece, block_size))
        await sink.add(piece)
    return sums


async def _quiet_abort(sink: ShardSink) -> None:
    try:
        await sink.abort()
    except Exception:  # noqa: BLE001 - the original error is what matters
        pass


def _first_cause(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error
