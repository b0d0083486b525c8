"""The read calls of a load and what follows each: batching, pieces, scratch regions, verification.

``read_ops`` runs them. A run of small adjacent tensors of one file is one
vectored read; a large tensor read straight into its target is read in pieces
of whole checksum blocks, so one piece can be verified while the next is read;
a region that does not land whole in its target (resharding) is read into
scratch memory, verified, and only then copied into place.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import CorruptCheckpointError
from .format import checksum
from .format.metadata import ChunkRecord
from .planning.reshard import Overlap, contiguous_byte_range

__all__ = ["Finisher", "Read", "Unit", "batches", "byte_view", "direct_target", "is_direct", "units"]


@dataclass(frozen=True, slots=True)
class Read:
    fqn: str
    chunk: ChunkRecord
    overlap: Overlap
    dest: torch.Tensor  # this rank's local target tensor (CPU)
    dtype: torch.dtype


_BATCH_BYTES = 16 << 20
_BATCH_READS = 512  # below IOV_MAX
# A larger direct read is made in pieces of about this size (whole checksum blocks),
# so that one piece is verified while the next is read.
_PIECE_BYTES = 16 << 20


def direct_target(r: Read) -> torch.Tensor | None:
    """Where the whole saved chunk lands as is, when that is one contiguous run of the target's memory.

    The whole target (a tensor saved whole), or a block of whole rows of it (a
    budget's split chunks, a Shard(0) shard loaded whole): read straight into
    place, with no scratch copy. None: read through scratch (``_scratch_unit``).
    """
    c = r.chunk
    if r.overlap.lengths != c.sizes or not r.dest.is_contiguous():
        return None
    if tuple(r.dest.shape) == c.sizes and not any(r.overlap.target_offsets):
        return r.dest
    region = r.dest[tuple(slice(o, o + n) for o, n in zip(r.overlap.target_offsets, c.sizes, strict=True))]
    return region if region.is_contiguous() else None


def is_direct(r: Read) -> bool:
    """Whether the whole saved chunk lands, as is, in one contiguous run of the target."""
    return direct_target(r) is not None


def batches(reads: list[Read]) -> list[list[Read]]:
    """Group runs of small, adjacent, direct reads of one file: one vectored read each.

    Thousands of small tensors would otherwise cost a pool task and a system
    call apiece, which dominates their load time.
    """
    out: list[list[Read]] = []
    run: list[Read] = []
    run_bytes = 0
    for r in reads:
        c = r.chunk
        small = is_direct(r) and c.byte_length < _BATCH_BYTES
        if (
            run
            and small
            and c.file == run[-1].chunk.file
            and c.byte_offset == run[-1].chunk.byte_offset + run[-1].chunk.byte_length
            and run_bytes + c.byte_length <= _BATCH_BYTES
            and len(run) < _BATCH_READS
        ):
            run.append(r)
            run_bytes += c.byte_length
            continue
        if run:
            out.append(run)
        run, run_bytes = ([r], c.byte_length) if small else ([], 0)
        if not small:
            out.append([r])
    if run:
        out.append(run)
    return out


@dataclass(slots=True)
class Unit:
    """One read call, the checks its bytes must pass, and where a scratch read's region goes."""

    file: str
    offset: int  # in the file
    bufs: list[memoryview]
    checks: list[tuple[memoryview, ChunkRecord, int, str]]  # (bytes, chunk, their start in it, key)
    place: Callable[[], None] | None = None


def units(batches: list[list[Read]], block: int, verify: bool) -> Iterator[Unit]:
    """The read calls for ``batches``, in order; a scratch buffer is allocated only when its turn comes."""
    # Pieces start on block boundaries, so each is verified on its own.
    piece_bytes = max(block, _PIECE_BYTES // block * block) if verify else 0
    for batch in batches:
        if len(batch) > 1:
            bufs = [byte_view(_direct(r)) for r in batch]
            checks = [(buf, r.chunk, 0, r.fqn) for r, buf in zip(batch, bufs, strict=True)]
            yield Unit(batch[0].chunk.file, batch[0].chunk.byte_offset, bufs, checks)
            continue
        r = batch[0]
        c = r.chunk
        if c.byte_length == 0:
            continue
        dest = direct_target(r)
        if dest is not None:
            whole = byte_view(dest)
            step = piece_bytes or len(whole)
            for pos in range(0, len(whole), step):
                piece = whole[pos : pos + step]
                yield Unit(c.file, c.byte_offset + pos, [piece], [(piece, c, pos, r.fqn)])
            continue
        yield _scratch_unit(r, block, verify)


def _direct(r: Read) -> torch.Tensor:
    dest = direct_target(r)
    assert dest is not None, "only direct reads are batched"
    return dest


def _scratch_unit(r: Read, block: int, verify: bool) -> Unit:
    """Read the smallest byte range covering the overlap (whole blocks when verifying); copy it out after."""
    c = r.chunk
    itemsize = r.dtype.itemsize
    start, end = contiguous_byte_range(c.sizes, r.overlap.saved_offsets, r.overlap.lengths, itemsize)
    if verify:
        start = start // block * block
        end = min(c.byte_length, -(-end // block) * block)
    scratch = torch.empty(end - start, dtype=torch.uint8)
    buf = byte_view(scratch)

    def place() -> None:
        typed = scratch.view(r.dtype)
        strides = _row_major_strides(c.sizes)
        base = sum(o * s for o, s in zip(r.overlap.saved_offsets, strides, strict=True)) - start // itemsize
        region = typed.as_strided(r.overlap.lengths, strides, base)
        idx = tuple(slice(o, o + n) for o, n in zip(r.overlap.target_offsets, r.overlap.lengths, strict=True))
        r.dest[idx].copy_(region)

    return Unit(c.file, c.byte_offset + start, [buf], [(buf, c, start, r.fqn)], place)


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes; the caller keeps ``t`` alive.

    Through ctypes rather than numpy: a quarter of the cost, which thousands of
    small tensors per load notice.
    """
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class Finisher:
    """What follows a unit's read: verify its bytes, then put a scratch read's region in place."""

    def __init__(self, block: int, verify: bool, location: str) -> None:
        self.block = block
        self.verify = verify
        self._location = location

    def __call__(self, unit: Unit) -> None:
        if self.verify:
            for buf, chunk, start, fqn in unit.checks:
                _verify(buf, chunk, start, fqn, self.block, self._location)
        if unit.place is not None:
            # Grad mode is per thread: the caller's no_grad does not reach this one.
            with torch.no_grad():
                unit.place()


def _row_major_strides(sizes: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    acc = 1
    for s in reversed(sizes):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _verify(buf: memoryview, c: ChunkRecord, start: int, fqn: str, block: int, location: str) -> None:
    first = start // block
    for i, pos in enumerate(range(0, len(buf), block)):
        expected = c.checksums[first + i]
        actual = checksum.digest(buf[pos : pos + block])
        if actual != expected:
            lo = c.byte_offset + start + pos
            raise CorruptCheckpointError(
                f"{location}/{c.file}: checksum mismatch in key '{fqn}' (chunk at offsets "
                f"{list(c.offsets)}, file bytes [{lo}, {lo + min(block, len(buf) - pos)})); "
                "the file is damaged. Restore it or load an earlier checkpoint."
            )
