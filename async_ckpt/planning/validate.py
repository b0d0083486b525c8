"""Checking that a global plan saves every tensor element exactly once.

DCP compares chunks pairwise, which takes minutes once a tensor has a chunk
per rank at 1024 ranks.  Here the check is O(n log n), and batched: every
tensor of the same number of dims is checked at once with numpy.

* every chunk is in bounds;
* no two non-empty chunks overlap, found by mapping chunks onto the grid of
  their tensor's chunk boundaries (one sort per dimension).  In the grid
  layouts DTensor produces each chunk is exactly one grid cell, so overlap
  means two chunks on one cell, found by counting;
* the chunk volumes add up to the tensor's, which, given in-bounds chunks
  that do not overlap, is the same as covering it with no gap.

Tensors the batched pass cannot clear (irregular layouts, or any problem)
are rechecked one at a time, which also writes the error message.
"""

from __future__ import annotations

import itertools
import math
import operator
from bisect import bisect_right, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .types import SavePlan, WriteItem, WriteItemType

__all__ = ["PlanValidationError", "validate_coverage"]

# When chunks do not line up into a grid, overlaps are found by enumerating
# the grid cells each chunk covers, as long as that stays within this many
# cells per chunk; beyond it a sort-and-sweep is cheaper.
_CELLS_PER_CHUNK_LIMIT = 8
_MIN_CELL_BUDGET = 1024

Shape = tuple[int, ...]
IntArray = npt.NDArray[np.int64]

_type_of = operator.attrgetter("type")
_fqn_of = operator.attrgetter("index.fqn")
_tensor_data_of = operator.attrgetter("tensor_data")
_offsets_of = operator.attrgetter("chunk.offsets")
_sizes_of = operator.attrgetter("chunk.sizes")
_identity_of = operator.attrgetter("index.fqn", "tensor_data.size", "tensor_data.properties.dtype")


class PlanValidationError(ValueError):
    """A global plan would save some tensor wrongly (gap, overlap, mismatch)."""


@dataclass(frozen=True, slots=True)
class _Chunks:
    """Every tensor chunk, numbered by tensor in first-appearance order."""

    fqns: list[str]
    shapes: list[Shape]
    chunk_tensor: IntArray
    offsets: list[Shape]
    sizes: list[Shape]


@dataclass(frozen=True, slots=True)
class _TensorChunks:
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
    chunks = _collect(plans, per_rank_fqns)
    suspects = _suspects(chunks)
    if not suspects:
        return
    by_tensor = np.argsort(chunks.chunk_tensor, kind="stable")
    wanted = np.array(suspects, dtype=np.int64)
    sorted_tensor = chunks.chunk_tensor[by_tensor]
    begins = np.searchsorted(sorted_tensor, wanted).tolist()
    ends = np.searchsorted(sorted_tensor, wanted + 1).tolist()
    for tensor, begin, end in zip(suspects, begins, ends, strict=True):
        members = by_tensor[begin:end].tolist()
        entry = _TensorChunks(
            chunks.shapes[tensor],
            [chunks.offsets[i] for i in members],
            [chunks.sizes[i] for i in members],
        )
        _check_many_chunks(chunks.fqns[tensor], entry)


def _collect(plans: Sequence[SavePlan], per_rank_fqns: frozenset[str]) -> _Chunks:
    # Per-item work runs in C loops (map over attrgetter), as few passes as
    # possible: at 1024 ranks a plan can hold millions of chunks.
    items = list(itertools.chain.from_iterable(plan.items for plan in plans))
    if per_rank_fqns:
        # Per-rank values may differ in anything, shape included: drop first.
        per_rank = _flags(map(per_rank_fqns.__contains__, map(_fqn_of, items)), len(items))
        items = list(itertools.compress(items, (~per_rank).tolist()))
    byte_io = itertools.repeat(WriteItemType.BYTE_IO)
    is_bytes = _flags(map(operator.is_, map(_type_of, items), byte_io), len(items))
    byte_fqns = set(map(_fqn_of, itertools.compress(items, is_bytes.tolist())))
    tensor_items = list(itertools.compress(items, (~is_bytes).tolist()))
    del items
    datas = list(map(_tensor_data_of, tensor_items))
    missing = _flags(map(operator.is_, datas, itertools.repeat(None)), len(datas))
    if missing.any():
        bad = tensor_items[int(np.argmax(missing))]
        raise PlanValidationError(f"tensor {bad.index.fqn!r}: {bad.type.value} item has no tensor data")

    # Name each chunk's (fqn, global shape, dtype) in one pass; when items
    # agree there is one such triple per tensor, so the dict stays small.
    seen: dict[tuple[str, Shape, object], int] = {}
    first_at = np.fromiter(
        map(seen.setdefault, map(_identity_of, tensor_items), itertools.count()), np.int64, len(datas)
    )
    triples = list(seen)
    chunk_triple = np.searchsorted(np.fromiter(seen.values(), np.int64, len(triples)), first_at)
    del seen, first_at
    tensor_ids: dict[str, int] = {}
    triple_tensor = np.array([tensor_ids.setdefault(t[0], len(tensor_ids)) for t in triples], dtype=np.int64)
    chunk_tensor = triple_tensor[chunk_triple]
    if len(tensor_ids) < len(triples):
        _disagreement(tensor_items, triples, chunk_triple, triple_tensor)
    shapes: list[Shape] = []
    for fqn, shape, _ in triples:
        if tensor_ids[fqn] == len(shapes):
            shapes.append(shape)

    both = byte_fqns & tensor_ids.keys()
    if both:
        raise PlanValidationError(f"tensor {min(both)!r}: saved both as bytes and as a tensor")
    offsets: list[Shape] = list(map(_offsets_of, datas))
    sizes: list[Shape] = list(map(_sizes_of, datas))
    ndims = np.fromiter(map(len, offsets), np.int64, len(offsets))
    want = np.fromiter(map(len, shapes), np.int64, len(shapes))[chunk_tensor]
    if (ndims != want).any():
        i = int(np.argmax(ndims != want))
        raise PlanValidationError(
            f"tensor {tensor_items[i].index.fqn!r}: chunk offsets={offsets[i]} has {ndims[i]} dims "
            f"but the global shape {shapes[chunk_tensor[i]]} has {want[i]}"
        )
    return _Chunks(list(tensor_ids), shapes, chunk_tensor, offsets, sizes)


def _disagreement(
    items: list[WriteItem],
    triples: list[tuple[str, Shape, object]],
    chunk_triple: IntArray,
    triple_tensor: IntArray,
) -> None:
    """Raise for the first item whose global shape or dtype differs from its fqn's first."""
    # Triples are numbered in first-appearance order, so a tensor's first is its lowest.
    first_triple = np.full(len(triple_tensor), len(triples), dtype=np.int64)
    np.minimum.at(first_triple, triple_tensor, np.arange(len(triples), dtype=np.int64))
    expected = first_triple[triple_tensor[chunk_triple]]
    i = int(np.argmax(chunk_triple != expected))
    fqn, want_shape, want_dtype = triples[int(expected[i])]
    _, shape, dtype = triples[int(chunk_triple[i])]
    what, first, other = (
        ("global shape", want_shape, shape) if shape != want_shape else ("dtype", want_dtype, dtype)
    )
    raise PlanValidationError(f"tensor {fqn!r}: items disagree on {what}: {first} vs {other}")


def _flags(values: Iterable[object], count: int) -> npt.NDArray[np.bool_]:
    return np.fromiter(values, bool, count)


def _suspects(chunks: _Chunks) -> list[int]:
    """Tensors the batched checks cannot clear, in first-appearance order."""
    tensor_ndim = np.fromiter(map(len, chunks.shapes), np.int64, len(chunks.shapes))
    chunk_ndim = tensor_ndim[chunks.chunk_tensor]
    suspects: set[int] = set()
    for ndim in np.unique(tensor_ndim).tolist():
        members = np.flatnonzero(chunk_ndim == ndim)
        tensors = np.flatnonzero(tensor_ndim == ndim)
        suspects |= _grid_suspects(chunks, ndim, members, tensors)
    return sorted(suspects)


def _gather(tuples: list[Shape], members: list[int], ndim: int) -> IntArray:
    flat = itertools.chain.from_iterable(map(tuples.__getitem__, members))
    return np.fromiter(flat, np.int64, len(members) * ndim).reshape(len(members), ndim)


def _grid_suspects(chunks: _Chunks, ndim: int, members: IntArray, tensors: IntArray) -> set[int]:
    """Tensors (of ``ndim`` dims) not shown exactly tiled by a grid of their chunks."""
    member_list = members.tolist()
    starts = _gather(chunks.offsets, member_list, ndim)
    sizes = _gather(chunks.sizes, member_list, ndim)
    ends = starts + sizes
    # Renumber this group's tensors 0..n-1 so per-tensor tables stay dense.
    local = np.full(len(chunks.shapes), -1, dtype=np.int64)
    local[tensors] = np.arange(len(tensors))
    tensor = local[chunks.chunk_tensor[members]]
    shape = _gather(chunks.shapes, tensors.tolist(), ndim)
    numel = [math.prod(chunks.shapes[t]) for t in tensors.tolist()]

    bad = np.zeros(len(tensors), dtype=bool)
    out = ((starts < 0) | (sizes < 0) | (ends > shape[tensor])).any(axis=1)
    bad[tensor[out]] = True
    # Empty tensors need nothing covered; empty chunks cover nothing.
    has_elements = np.array([n > 0 for n in numel], dtype=bool)
    keep = has_elements[tensor] & (sizes > 0).all(axis=1) & ~out
    tensor, starts, ends = tensor[keep], starts[keep], ends[keep]
    covered = np.zeros(len(tensors), dtype=np.int64)
    np.add.at(covered, tensor, np.prod(ends - starts, axis=1))
    bad |= has_elements & (covered != np.array(numel, dtype=np.int64))
    bad |= _cell_collisions(tensor, starts, ends, len(tensors))
    return set(tensors[bad].tolist())


def _cell_collisions(
    tensor: IntArray, starts: IntArray, ends: IntArray, n_tensors: int
) -> npt.NDArray[np.bool_]:
    """Tensors whose chunks are not one grid cell each, on distinct cells of a full grid."""
    n, ndim = starts.shape
    suspect = np.zeros(n_tensors, dtype=bool)
    if n == 0:
        return suspect
    chunk_count = np.bincount(tensor, minlength=n_tensors)
    if ndim == 0:
        return chunk_count > 1
    # Key each boundary by (tensor, value) in one int64 so one sort per dim
    # numbers every tensor's grid lines; too-large values fall back.
    shift = int(ends.max()).bit_length()
    if shift + n_tensors.bit_length() > 62:
        return chunk_count > 0
    base = tensor << shift
    cells_per_tensor = np.ones(n_tensors, dtype=np.int64)
    cell = np.zeros(n, dtype=np.int64)
    for d in range(ndim):
        lo_key, hi_key = base | starts[:, d], base | ends[:, d]
        lines = _sorted_unique(np.concatenate((lo_key, hi_key)))
        lo, hi = np.searchsorted(lines, lo_key), np.searchsorted(lines, hi_key)
        suspect[tensor[hi - lo != 1]] = True
        first_line = np.searchsorted(lines, np.arange(n_tensors, dtype=np.int64) << shift)
        next_first = np.append(first_line[1:], len(lines))
        cells = np.maximum(next_first - first_line - 1, 1)
        # Row-major cell number within the tensor's grid.
        cell = cell * cells[tensor] + (lo - first_line[tensor])
        cells_per_tensor = cells_per_tensor * cells
        # A grid with more cells than chunks leaves a gap; tensors with no
        # chunk here have nothing to cover or fail the volume check.  Clamping
        # keeps the product from overflowing; suspects' cells go unused.
        suspect |= (cells_per_tensor > chunk_count) & (chunk_count > 0)
        cells_per_tensor = np.minimum(cells_per_tensor, chunk_count)
    clear = ~suspect[tensor]
    # With as many cells as chunks, chunks cover distinct cells iff no cell repeats.
    offset = np.zeros(n_tensors, dtype=np.int64)
    np.cumsum(chunk_count[:-1], out=offset[1:])
    global_cell = (offset[tensor] + cell)[clear]
    repeated = np.bincount(global_cell, minlength=n) > 1
    owner = np.repeat(np.arange(n_tensors, dtype=np.int64), chunk_count)
    suspect[owner[repeated]] = True
    return suspect


def _sorted_unique(values: IntArray) -> IntArray:
    # np.unique may hash rather than sort; a plain sort is much faster here.
    ordered = np.sort(values)
    distinct = np.ones(len(ordered), dtype=bool)
    distinct[1:] = ordered[1:] != ordered[:-1]
    return ordered[distinct]


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
        cuts = _sorted_unique(np.concatenate((starts[:, d], ends[:, d])))
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
