"""The writer pipeline: shard files written concurrently, checksummed on the fly, fsynced.

State of one file: open -> header written -> each chunk streamed in pieces
(hashing each checksum block as it passes) -> flushed and fsynced -> closed.
Where the sink writes aligned sources without a copy (O_DIRECT), the file's
large entries whose memory addresses agree go first, after a header padded
to match them (``_file_order``).
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
from ..storage.base import AligningSink, ReservingSink, ShardSink, Storage, VectoredSink

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
    address: int | None = None
    """Where the source's bytes lie in memory, when that is known without taking them."""


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
    """In the job's entry order, which need not be the file's."""
    copied: int = 0
    """Bytes copied on their way out (``AligningSink.copied``); 0 for other sinks."""


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
    sink = await storage.open_shard(location, token, job.name)
    try:
        order, data_start = _file_order(job.entries, sink)
        entries = [job.entries[i] for i in order]
        layout = layout_shard(
            [ShardEntry(e.name, e.dtype, e.sizes, e.nbytes) for e in entries],
            {"format": "async_ckpt", "format_version": "1"},
            data_start,
        )
        if isinstance(sink, ReservingSink):
            await sink.reserve(layout.size)
        out = _Batcher(sink)
        await out.add(memoryview(layout.header))
        chunks: list[WrittenChunk | None] = [None] * len(entries)
        for i, entry, start in zip(order, entries, layout.offsets, strict=True):
            sums = await _stream(out, entry, block_size)
            chunks[i] = WrittenChunk(
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
        chunks=tuple(c for c in chunks if c is not None),
        copied=sink.copied if isinstance(sink, AligningSink) else 0,
    )


def _file_order(entries: Sequence[WriteEntry], sink: ShardSink) -> tuple[list[int], tuple[int, int] | None]:
    """The order to write ``entries`` in (indices) and where the data should start.

    For an ``AligningSink``, a chain of large entries each of which starts at
    a file offset its address agrees with: from the residue the most bytes
    share, entries that keep the residue (a whole number of blocks) first,
    then one that moves it to a residue other entries have, and so on; the
    rest follow in the job's order. Staged bytes all lie on page boundaries,
    so for them the chain is every large entry. Elsewhere the order is the job's.
    """
    keep = list(range(len(entries)))
    if not isinstance(sink, AligningSink):
        return keep, None
    mod = sink.alignment
    buckets: dict[int, list[int]] = {}
    weight: dict[int, int] = {}
    for i, e in enumerate(entries):
        if e.address is not None and e.nbytes >= sink.direct_min and e.address % 64 == 0:
            buckets.setdefault(e.address % mod, []).append(i)
            weight[e.address % mod] = weight.get(e.address % mod, 0) + e.nbytes
    if not buckets:
        return keep, None
    start = max(weight, key=lambda r: (weight[r], -r))
    for bucket in buckets.values():
        # Whole blocks first (they keep the residue) in the job's order, then the largest first.
        bucket.sort(key=lambda i: _chain_rank(entries[i].nbytes, mod))
    chain: list[int] = []
    pos = start
    while buckets.get(pos):
        bucket = buckets[pos]
        if entries[bucket[0]].nbytes % mod == 0:
            chain.append(bucket.pop(0))
            continue
        # Only ragged entries left here: prefer one after which the chain goes on.
        onward = [i for i in bucket if buckets.get((pos + entries[i].nbytes) % mod)]
        pick = onward[0] if onward else bucket[0]
        bucket.remove(pick)
        chain.append(pick)
        pos = (pos + entries[pick].nbytes) % mod
    chosen = set(chain)
    return chain + [i for i in keep if i not in chosen], (start, mod)


def _chain_rank(nbytes: int, mod: int) -> tuple[bool, int]:
    ragged = nbytes % mod != 0
    return ragged, -nbytes if ragged else 0


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
