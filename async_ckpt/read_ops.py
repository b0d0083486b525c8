"""Executing reads: open each shard once, read byte ranges, verify, copy into place.

How many reads are in flight is the storage's ``read_threads``: one sequential
stream on a small machine's local disk (the kernel's readahead keeps the disk
busy), several for object stores, each of whose threads verifies what it read.
Measured on 2 cores, loading 2 GiB cold: 8 reading threads took 2.2x the wall
time and 5x the CPU of one. With one stream and verification, a second thread
verifies piece k while piece k+1 is read (``read_units`` cuts large reads into
pieces of whole checksum blocks): ``preadv`` and xxhash both release the GIL.
Hashing inline instead leaves the disk idle during every hash (a busy 2-core
VM, 1 GiB cold, paired runs: verified load / plain read 1.35 inline, 1.24
pipelined, 1.29 unverified). Units of many small checks stay on the reading
thread: their hashing is Python work under the GIL, and handing it over
would only add GIL hand-offs between reads.

Every read of a load goes through one ``CheckpointSource`` (``storage/source.py``),
so that it reads one save whole: :func:`open_source` holds it and decodes its
metadata, :func:`execute_reads` opens every shard the reads need at once and
proves at the end that nothing was replaced meanwhile (checksums prove it
when verifying), and
:func:`replaced_as_such` turns a read that failed because the checkpoint was
replaced into CheckpointReplacedError, never CorruptCheckpointError.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from ._faults import hook_point
from .errors import CorruptCheckpointError
from .format import checksum
from .format.metadata import Metadata
from .format.shard import first_shard_names
from .read_units import Finisher, Read, Unit, batches, units
from .storage.base import (
    CheckpointSource,
    PrefetchingSource,
    ReadThreadsHint,
    ShardReader,
    Storage,
    VectoredReader,
)
from .storage.source import open_checkpoint, replaced_error

__all__ = ["Read", "execute_reads", "open_source", "replaced_as_such"]

# Storages that are no ReadThreadsHint (third-party ones) get this many.
_DEFAULT_READ_THREADS = 8
# At most this much of a shard is prefetched before the load's reads begin. It
# stops when they begin, so what is read is what the disk manages while the
# metadata is decoded and planned; the cap bounds what a wrong guess costs.
_PREFETCH_BYTES = 256 << 20


def open_source(
    storage: Storage, location: str, decode: Callable[[bytes], Metadata], *, prefetch_rank: int | None = None
) -> tuple[CheckpointSource, Metadata]:
    """The checkpoint at ``location`` held for one load, and its decoded metadata; close the source.

    With ``prefetch_rank``, a source that can prefetch starts on the first shard
    that rank wrote (where a same-world-size load and a single-process load
    start reading) while ``decode`` runs; :func:`execute_reads` stops it.
    """
    source = open_checkpoint(storage, location)
    if prefetch_rank is not None and isinstance(source, PrefetchingSource):
        source.prefetch(first_shard_names(prefetch_rank), _PREFETCH_BYTES)
    try:
        md = decode(source.metadata())
    except BaseException:
        source.close()
        raise
    hook_point("load_metadata_read")
    return source, md


@contextmanager
def replaced_as_such(source: CheckpointSource, location: str) -> Iterator[None]:
    """Report a read that failed because the checkpoint was replaced as CheckpointReplacedError.

    A shard of another save is short, missing or fails its checksums: no damage.
    """
    try:
        yield
    except CorruptCheckpointError as exc:
        if source.replaced():
            raise replaced_error(location) from exc
        raise


class _ByPath:
    """Shards opened by path, with no proof they belong to one save (``read_region`` without a source)."""

    pinned = True

    def __init__(self, storage: Storage, location: str) -> None:
        self._storage = storage
        self._location = location

    def metadata(self) -> bytes:
        return self._storage.read_metadata(self._location)

    def open_reader(self, name: str) -> ShardReader:
        return self._storage.open_reader(self._location, name)

    def replaced(self) -> bool:
        return False

    def close(self) -> None:
        pass


def execute_reads(
    reads: list[Read],
    storage: Storage,
    location: str,
    md: Metadata,
    verify: bool,
    *,
    source: CheckpointSource | None = None,
    confirm: bool = True,
) -> None:
    """Run ``reads`` against ``source`` (by path without one).

    Every shard they need is opened first, so a pinned source has them all
    before a replacing save can delete them. With ``confirm``, a source that
    is not pinned is asked afterwards whether its checkpoint was replaced,
    unless ``verify``: bytes that passed ``md``'s checksums are its save's.
    """
    src: CheckpointSource = source if source is not None else _ByPath(storage, location)
    if isinstance(src, PrefetchingSource):
        src.stop_prefetch()  # from here on the reads' own readahead keeps the disk busy
    readers = Readers(src, location, md, verify)
    reads.sort(key=lambda r: (r.chunk.file, r.chunk.byte_offset))
    threads = max(
        1, int(storage.read_threads if isinstance(storage, ReadThreadsHint) else _DEFAULT_READ_THREADS)
    )
    todo = batches(reads)
    done = Finisher(md.block_size, verify, location)
    try:
        for name in dict.fromkeys(r.chunk.file for r in reads):
            readers.get(name)
        if threads == 1 and verify:
            _pipelined(todo, readers, done)
        elif threads == 1:  # nothing to hand off: a pool would only add wake-ups
            for b in todo:
                _do_batch(b, readers, done)
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="async_ckpt-read") as pool:
                tasks = [pool.submit(_do_batch, b, readers, done) for b in todo]
                try:
                    for fut in tasks:
                        fut.result()
                except BaseException:
                    for fut in tasks:  # a failed load stops reading instead of finishing
                        fut.cancel()
                    raise
    finally:
        readers.close()
    if confirm and not verify and not src.pinned and src.replaced():
        raise replaced_error(location, "metadata.json changed while its shards were read")


# Pieces read but not yet verified, at most: bounds the memory a scratch read holds
# and how far a load reads past damage before it stops.
_AHEAD = 2
# A unit with more checks than this is verified by the reading thread: hashing many
# small buffers is Python work, which holds the GIL the reader needs between reads.
_HAND_OFF_CHECKS = 16


def _pipelined(todo: list[list[Read]], readers: Readers, done: Finisher) -> None:
    """One thread reads in file order; another verifies what it read, ``_AHEAD`` units behind at most.

    xxhash and ``preadv`` both release the GIL, so on two cores the hashing
    hides behind the disk. The load returns only once every unit has passed.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-verify") as checker:
        behind: deque[Future[None]] = deque()
        try:
            for unit in units(todo, done.block, done.verify):
                _read_unit(unit, readers)
                if len(unit.checks) > _HAND_OFF_CHECKS:
                    done(unit)
                    continue
                while len(behind) >= _AHEAD:
                    behind.popleft().result()
                behind.append(checker.submit(done, unit))
            while behind:
                behind.popleft().result()
        except BaseException:
            for fut in behind:
                fut.cancel()
            raise


def _read_unit(unit: Unit, readers: Readers) -> None:
    reader = readers.get(unit.file)
    if len(unit.bufs) == 1:
        reader.readinto(unit.offset, unit.bufs[0])
        return
    many = reader.readinto_many if isinstance(reader, VectoredReader) else None
    if many is not None:
        many(unit.offset, unit.bufs)
        return
    pos = unit.offset
    for buf in unit.bufs:
        reader.readinto(pos, buf)
        pos += len(buf)


def _do_batch(batch: list[Read], readers: Readers, done: Finisher) -> None:
    for unit in units([batch], done.block, done.verify):
        _read_unit(unit, readers)
        done(unit)


class Readers:
    """One open reader per shard file, checked against the metadata on first use."""

    def __init__(self, source: CheckpointSource, location: str, md: Metadata, verify: bool) -> None:
        self._source = source
        self._location = location
        self._md = md
        self._verify = verify
        self._open: dict[str, ShardReader] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ShardReader:
        with self._lock:
            if name not in self._open:
                self._open[name] = self._check(self._source.open_reader(name), name)
            return self._open[name]

    def _check(self, reader: ShardReader, name: str) -> ShardReader:
        rec = self._md.files[name]
        where = f"{self._location}/{name}"
        if reader.size() != rec.size:
            reader.close()
            raise CorruptCheckpointError(
                f"{where}: size is {reader.size()} bytes, metadata says {rec.size}; the file "
                "was truncated or modified"
            )
        if self._verify:
            header = bytearray(rec.header_length)
            reader.readinto(0, memoryview(header))
            if checksum.digest(header) != rec.header_checksum:
                reader.close()
                raise CorruptCheckpointError(f"{where}: safetensors header checksum mismatch")
        return reader

    def close(self) -> None:
        for reader in self._open.values():
            reader.close()
        self._open.clear()
