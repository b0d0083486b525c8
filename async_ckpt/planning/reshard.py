"""Matching saved chunks to the chunks a loading rank needs.

When a checkpoint is loaded under a different sharding, each target chunk is
assembled from the parts of saved chunks it intersects.  These helpers find
those intersections and the byte range of a saved chunk worth reading.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from .types import ChunkStorageMetadata

__all__ = ["ChunkIndex", "Overlap", "chunk_overlap", "contiguous_byte_range", "find_overlaps"]


@dataclass(frozen=True, slots=True)
class Overlap:
    """The intersection of a saved chunk and a target chunk.

    ``saved_offsets`` is relative to the saved chunk's origin,
    ``target_offsets`` to the target chunk's; ``lengths`` is the common extent.
    """

    saved_offsets: tuple[int, ...]
    target_offsets: tuple[int, ...]
    lengths: tuple[int, ...]


def chunk_overlap(saved: ChunkStorageMetadata, target: ChunkStorageMetadata) -> Overlap | None:
    """Where ``saved`` and ``target`` intersect, or None if they share no element.

    Two 0-dim chunks always overlap (each is the tensor's single element).
    """
    if len(saved.offsets) != len(target.offsets):
        raise ValueError(
            f"cannot intersect a {len(saved.offsets)}-dim saved chunk with a "
            f"{len(target.offsets)}-dim target chunk"
        )
    saved_offsets: list[int] = []
    target_offsets: list[int] = []
    lengths: list[int] = []
    for s_off, s_size, t_off, t_size in zip(
        saved.offsets, saved.sizes, target.offsets, target.sizes, strict=True
    ):
        start = max(s_off, t_off)
        end = min(s_off + s_size, t_off + t_size)
        if end <= start:
            return None
        saved_offsets.append(start - s_off)
        target_offsets.append(start - t_off)
        lengths.append(end - start)
    return Overlap(tuple(saved_offsets), tuple(target_offsets), tuple(lengths))


class ChunkIndex:
    """Saved chunks indexed for repeated overlap queries.

    Chunks are sorted once by their start along the dimension with the most
    distinct starts (dim 0 for row sharding, dim 1 for column sharding, ...).
    A query bisects for the chunks whose start lies within the longest
    chunk's length before the target's end, so it inspects only chunks near
    the target along that dimension rather than all of them.
    """

    def __init__(self, saved: Sequence[ChunkStorageMetadata]) -> None:
        self._saved = list(saved)
        ndim = len(self._saved[0].offsets) if self._saved else 0
        if any(len(chunk.offsets) != ndim for chunk in self._saved):
            raise ValueError("saved chunks differ in number of dims")
        self._ndim = ndim
        self._axis = 0
        if ndim:
            self._axis = max(range(ndim), key=lambda d: len({c.offsets[d] for c in self._saved}))
        axis = self._axis
        starts = [(c.offsets[axis] if ndim else 0) for c in self._saved]
        self._order = sorted(range(len(starts)), key=starts.__getitem__)
        self._starts = [starts[i] for i in self._order]
        self._longest = max((c.sizes[axis] for c in self._saved if ndim), default=0)

    def __len__(self) -> int:
        return len(self._saved)

    def overlapping(self, target: ChunkStorageMetadata) -> list[tuple[int, Overlap]]:
        """``(index into saved, overlap)`` for every saved chunk meeting ``target``, by index."""
        if self._ndim == 0:
            candidates = self._order
        else:
            if len(target.offsets) != self._ndim:
                raise ValueError(
                    f"target chunk has {len(target.offsets)} dims, saved chunks have {self._ndim}"
                )
            begin = target.offsets[self._axis]
            end = begin + target.sizes[self._axis]
            # A chunk starting at or before begin - longest ends by begin.
            lo = bisect_right(self._starts, begin - self._longest)
            hi = bisect_left(self._starts, end)
            candidates = self._order[lo:hi]
        found = []
        for i in sorted(candidates):
            overlap = chunk_overlap(self._saved[i], target)
            if overlap is not None:
                found.append((i, overlap))
        return found


def find_overlaps(
    saved: Sequence[ChunkStorageMetadata], target: ChunkStorageMetadata
) -> list[tuple[int, Overlap]]:
    """``(index into saved, overlap)`` for every saved chunk meeting ``target``, by index.

    Build a :class:`ChunkIndex` yourself to answer many targets against the
    same saved chunks.
    """
    return ChunkIndex(saved).overlapping(target)


def contiguous_byte_range(
    chunk_sizes: Sequence[int],
    overlap_saved_offsets: Sequence[int],
    lengths: Sequence[int],
    itemsize: int,
) -> tuple[int, int]:
    """Smallest ``[start, end)`` byte range of a row-major chunk holding the overlap.

    In row-major order the region's first element has the lowest address and
    its last element the highest, so the range spans exactly those two.  An
    empty region gives an empty range at its start.
    """
    if not len(chunk_sizes) == len(overlap_saved_offsets) == len(lengths):
        raise ValueError(
            f"chunk sizes {tuple(chunk_sizes)}, offsets {tuple(overlap_saved_offsets)} "
            f"and lengths {tuple(lengths)} differ in number of dims"
        )
    for size, off, length in zip(chunk_sizes, overlap_saved_offsets, lengths, strict=True):
        if off < 0 or length < 0 or off + length > size:
            raise ValueError(
                f"region offsets {tuple(overlap_saved_offsets)} lengths {tuple(lengths)} "
                f"is outside chunk sizes {tuple(chunk_sizes)}"
            )
    first = last = 0
    stride = 1
    for size, off, length in zip(
        reversed(chunk_sizes), reversed(overlap_saved_offsets), reversed(lengths), strict=True
    ):
        first += off * stride
        last += (off + length - 1) * stride
        stride *= size
    start = first * itemsize
    if any(length == 0 for length in lengths):
        return start, start
    return start, (last + 1) * itemsize
