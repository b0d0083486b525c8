"""Checking that a global plan saves every tensor element exactly once.

DCP compares chunks pairwise, which takes minutes once a tensor has a chunk
per rank at 1024 ranks.  Here each tensor is checked in O(n log n):

* every chunk is in bounds;
* no two non-empty chunks overlap, found by mapping chunks onto the grid
  of all chunk boundaries (one sort per dimension);
* the chunk volumes add up to the tensor's, which, given in-bounds chunks
  that do not overlap, is the same as covering it with no gap.
"""

from __future__ import annotations

import itertools
import math
from bisect import bisect_right, insort
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .types import SavePlan, WriteItemType

__all__ = ["PlanValidationError", "validate_coverage"]

# When chunks do not line up into a grid, overlaps are found by enumerating
# the grid cells each chunk covers, as long as that stays within this many
# cells per chunk; beyond it a sort-and-sweep is cheaper.
_CELLS_PER_CHUNK_LIMIT = 8
_MIN_CELL_BUDGET = 1024

Shape = tuple[int, ...]
IntArray = npt.NDArray[np.int64]


class PlanValidationError(ValueError):
    """A global plan would save some tensor wrongly (gap, overlap, mismatch)."""


@dataclass(slots=True)
class _TensorChunks:
    dtype: torch.dtype
    shape: Shape
    offsets: list[Shape]
    sizes: list[Shape]


def validate_coverage(plans: Sequence[SavePlan], *, per_rank_fqns: frozenset[str] = frozenset()) -> None:
    """Raise :class:`PlanValidationError` unless every tensor is tiled exactly.

    For every fqn of a ``TENSOR`` or ``SHARD`` item (``BYTE_IO`` items and
    ``per_rank_fqns`` are skipped) all items must agree on dtype and global
    shape, every chunk must lie within the global shape, and the non-empty
    chunks must cover it with no gap and no overlap.  Tensors with no
    elements only need in-bounds chunks.
    """
    tensors, byte_fqns = _collect(plans, per_rank_fqns)
    both = byte_fqns & tensors.keys()
    if both:
        fqn = min(both)
        raise PlanValidationError(f"tensor {fqn!r}: saved both as bytes and as a tensor")
    for fqn, entry in tensors.items():
        _check_tensor(fqn, entry)


def _collect(
    plans: Sequence[SavePlan], per_rank_fqns: frozenset[str]
) -> tuple[dict[str, _TensorChunks], set[str]]:
    tensors: dict[str, _TensorChunks] = {}
    byte_fqns: set[str] = set()
    byte_io = WriteItemType.BYTE_IO
    for plan in plans:
        for item in plan.items:
            fqn = item.index.fqn
            if fqn in per_rank_fqns:
                continue
            if item.type is byte_io:
                byte_fqns.add(fqn)
                continue
            data = item.tensor_data
            if data is None:
                raise PlanValidationError(f"tensor {fqn!r}: {item.type.value} item has no tensor data")
            chunk = data.chunk
            entry = tensors.get(fqn)
            if entry is None:
                entry = tensors[fqn] = _TensorChunks(data.dtype, data.size, [], [])
            elif data.size != entry.shape:
                raise PlanValidationError(
                    f"tensor {fqn!r}: items disagree on global shape: {entry.shape} vs {data.size}"
                )
            elif data.dtype != entry.dtype:
                raise PlanValidationError(
                    f"tensor {fqn!r}: items disagree on dtype: {entry.dtype} vs {data.dtype}"
                )
            if len(chunk.offsets) != len(entry.shape):
                raise PlanValidationError(
                    f"tensor {fqn!r}: chunk offsets={chunk.offsets} has "
                    f"{len(chunk.offsets)} dims but the global shape {entry.shape} has "
                    f"{len(entry.shape)}"
                )
            entry.offsets.append(chunk.offsets)
            entry.sizes.append(chunk.sizes)
    return tensors, byte_fqns


def _check_tensor(fqn: str, entry: _TensorChunks) -> None:
    if len(entry.offsets) == 1:
        _check_single_chunk(fqn, entry.shape, entry.offsets[0], entry.sizes[0])
    else:
        _check_many_chunks(fqn, entry)


def _check_single_chunk(fqn: str, shape: Shape, offsets: Shape, sizes: Shape) -> None:
    # Most tensors are saved whole by one rank; skip numpy for them.
    for off, size, dim in zip(offsets, sizes, shape, strict=True):
        if off < 0 or size < 0 or off + size > dim:
            raise _out_of_bounds(fqn, shape, offsets, sizes)
    numel = math.prod(shape)
    covered = math.prod(sizes)
    if numel and covered != numel:
        raise _gap(fqn, shape, covered)


def _check_many_chunks(fqn: str, entry: _TensorChunks) -> None:
    shape = entry.shape
    n, ndim = len(entry.offsets), len(shape)
    starts = np.array(entry.offsets, dtype=np.int64).reshape(n, ndim)
    sizes = np.array(entry.sizes, dtype=np.int64).reshape(n, ndim)
    ends = starts + sizes
    dims = np.array(shape, dtype=np.int64)
    bad = ((starts < 0) | (sizes < 0) | (ends > dims)).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise _out_of_bounds(fqn, shape, entry.offsets[i], entry.sizes[i])
    numel = math.prod(shape)
    if numel == 0:
        return
    # Empty chunks (uneven sharding gives some ranks nothing) cover nothing,
    # so they cannot overlap or fill anything.
    kept = np.flatnonzero((sizes > 0).all(axis=1))
    covered = int(np.prod(sizes[kept], axis=1).sum())
    if ndim == 0:
        pair: tuple[int, int] | None = (0, 1)
    else:
        pair = _find_overlap(starts[kept], ends[kept])
    if pair is not None:
        a, b = int(kept[pair[0]]), int(kept[pair[1]])
        raise _overlap(fqn, entry, a, b)
    if covered != numel:
        raise _gap(fqn, shape, covered)


def _find_overlap(starts: IntArray, ends: IntArray) -> tuple[int, int] | None:
    """Two (row) indices of non-empty boxes that intersect, or None."""
    n, ndim = starts.shape
    if n < 2:
        return None
    lo = np.empty_like(starts)
    hi = np.empty_like(starts)
    for d in range(ndim):
        cuts = np.unique(np.concatenate((starts[:, d], ends[:, d])))
        lo[:, d] = np.searchsorted(cuts, starts[:, d])
        hi[:, d] = np.searchsorted(cuts, ends[:, d])
    spans = hi - lo
    if (spans == 1).all():
        # Grid layouts (all DTensor placements): each chunk is one cell.
        return _shared_cell(lo)
    cells = float(np.prod(spans.astype(np.float64), axis=1).sum())
    if cells <= max(_CELLS_PER_CHUNK_LIMIT * n, _MIN_CELL_BUDGET):
        return _shared_cell_enumerated(lo, hi)
    return _sweep_overlap(starts, ends)


def _shared_cell(cells: IntArray) -> tuple[int, int] | None:
    # Sorting rows lexicographically puts equal cells next to each other.
    order = np.lexsort(cells.T[::-1])
    ordered = cells[order]
    same = (ordered[1:] == ordered[:-1]).all(axis=1)
    if not same.any():
        return None
    i = int(np.argmax(same))
    a, b = int(order[i]), int(order[i + 1])
    return (a, b) if a < b else (b, a)


def _shared_cell_enumerated(lo: IntArray, hi: IntArray) -> tuple[int, int] | None:
    owner: dict[tuple[int, ...], int] = {}
    for i, (row_lo, row_hi) in enumerate(zip(lo.tolist(), hi.tolist(), strict=True)):
        for cell in itertools.product(*map(range, row_lo, row_hi)):
            j = owner.setdefault(cell, i)
            if j != i:
                return j, i
    return None


def _sweep_overlap(starts: IntArray, ends: IntArray) -> tuple[int, int] | None:
    # Irregular layouts with chunks spanning many cells: sweep along the
    # dimension with the most distinct boundaries, comparing each chunk only
    # with those still open along it.
    ndim = starts.shape[1]
    axis = max(range(ndim), key=lambda d: len(np.unique(starts[:, d])))
    start_list, end_list = starts.tolist(), ends.tolist()
    active: list[tuple[int, int]] = []
    for i in np.argsort(starts[:, axis], kind="stable").tolist():
        begin = start_list[i][axis]
        del active[: bisect_right(active, (begin, len(start_list)))]
        for _, j in active:
            if _boxes_intersect(start_list[i], end_list[i], start_list[j], end_list[j]):
                return (i, j) if i < j else (j, i)
        insort(active, (end_list[i][axis], i))
    return None


def _boxes_intersect(a_start: list[int], a_end: list[int], b_start: list[int], b_end: list[int]) -> bool:
    return all(
        max(s0, s1) < min(e0, e1) for s0, e0, s1, e1 in zip(a_start, a_end, b_start, b_end, strict=True)
    )


def _out_of_bounds(fqn: str, shape: Shape, offsets: Shape, sizes: Shape) -> PlanValidationError:
    return PlanValidationError(
        f"tensor {fqn!r}: chunk offsets={offsets} sizes={sizes} is out of bounds of global shape {shape}"
    )


def _overlap(fqn: str, entry: _TensorChunks, a: int, b: int) -> PlanValidationError:
    at = tuple(max(x, y) for x, y in zip(entry.offsets[a], entry.offsets[b], strict=True))
    return PlanValidationError(
        f"tensor {fqn!r}: chunks overlap at offsets {at}: "
        f"offsets={entry.offsets[a]} sizes={entry.sizes[a]} and "
        f"offsets={entry.offsets[b]} sizes={entry.sizes[b]}"
    )


def _gap(fqn: str, shape: Shape, covered: int) -> PlanValidationError:
    return PlanValidationError(
        f"tensor {fqn!r}: chunks leave a gap: covered {covered} of "
        f"{math.prod(shape)} elements of global shape {shape}"
    )
