"""Saved-to-target chunk matching (async_ckpt.planning.reshard)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from async_ckpt.planning import (
    ChunkIndex,
    ChunkStorageMetadata,
    Overlap,
    chunk_overlap,
    contiguous_byte_range,
    find_overlaps,
)

SETTINGS = settings(max_examples=150, deadline=None)


@st.composite
def shape_and_box(
    draw: st.DrawFn, shape: tuple[int, ...] | None = None
) -> tuple[tuple[int, ...], ChunkStorageMetadata]:
    if shape is None:
        shape = tuple(draw(st.integers(1, 7)) for _ in range(draw(st.integers(1, 3))))
    offsets = [draw(st.integers(0, dim)) for dim in shape]
    sizes = [draw(st.integers(0, dim - o)) for dim, o in zip(shape, offsets, strict=True)]
    return shape, ChunkStorageMetadata(offsets, sizes)


def mask(shape: tuple[int, ...], box: ChunkStorageMetadata) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(o, o + s) for o, s in zip(box.offsets, box.sizes, strict=True))] = True
    return m


def region(
    box: ChunkStorageMetadata, offsets: tuple[int, ...], lengths: tuple[int, ...]
) -> ChunkStorageMetadata:
    """The overlap's box in global coordinates, from offsets relative to ``box``."""
    return ChunkStorageMetadata(tuple(b + o for b, o in zip(box.offsets, offsets, strict=True)), lengths)


@SETTINGS
@given(st.data())
def test_chunk_overlap_matches_brute_force(data: st.DataObject) -> None:
    shape, saved = data.draw(shape_and_box())
    _, target = data.draw(shape_and_box(shape))
    expected = mask(shape, saved) & mask(shape, target)
    got = chunk_overlap(saved, target)
    if not expected.any():
        assert got is None
        return
    assert got is not None
    assert np.array_equal(mask(shape, region(saved, got.saved_offsets, got.lengths)), expected)
    assert np.array_equal(mask(shape, region(target, got.target_offsets, got.lengths)), expected)


def test_chunk_overlap_examples() -> None:
    saved = ChunkStorageMetadata((4, 0), (4, 8))
    target = ChunkStorageMetadata((2, 2), (4, 4))
    assert chunk_overlap(saved, target) == Overlap((0, 2), (2, 0), (2, 4))
    assert chunk_overlap(saved, ChunkStorageMetadata((0, 0), (4, 8))) is None  # touching only
    assert chunk_overlap(saved, ChunkStorageMetadata((5, 1), (0, 3))) is None  # empty target
    assert chunk_overlap(ChunkStorageMetadata((), ()), ChunkStorageMetadata((), ())) == Overlap((), (), ())
    with pytest.raises(ValueError, match="2-dim saved chunk with a 1-dim target"):
        chunk_overlap(saved, ChunkStorageMetadata((0,), (1,)))


@st.composite
def tiling_and_target(draw: st.DrawFn) -> tuple[list[ChunkStorageMetadata], ChunkStorageMetadata]:
    """Saved chunks of a random grid (plus a few stray boxes) and a target box."""
    shape = tuple(draw(st.integers(1, 9)) for _ in range(draw(st.integers(1, 3))))
    cuts = []
    for dim in shape:
        inner = draw(st.sets(st.integers(1, dim - 1), max_size=3)) if dim > 1 else set()
        cuts.append([0, *sorted(inner), dim])
    saved = [
        ChunkStorageMetadata(
            tuple(c[i] for c, i in zip(cuts, cell, strict=True)),
            tuple(c[i + 1] - c[i] for c, i in zip(cuts, cell, strict=True)),
        )
        for cell in itertools.product(*(range(len(c) - 1) for c in cuts))
    ]
    saved += [draw(shape_and_box(shape))[1] for _ in range(draw(st.integers(0, 3)))]
    saved = draw(st.permutations(saved))
    return list(saved), draw(shape_and_box(shape))[1]


@SETTINGS
@given(tiling_and_target())
def test_find_overlaps_matches_checking_every_chunk(
    case: tuple[list[ChunkStorageMetadata], ChunkStorageMetadata],
) -> None:
    saved, target = case
    expected = [(i, ov) for i, s in enumerate(saved) if (ov := chunk_overlap(s, target)) is not None]
    assert find_overlaps(saved, target) == expected
    index = ChunkIndex(saved)
    assert len(index) == len(saved)
    assert index.overlapping(target) == expected


def test_chunk_index_column_sharding_and_many_queries() -> None:
    # Column strips all start at row 0; the index must pick dim 1 to help.
    saved = [ChunkStorageMetadata((0, 4 * j), (64, 4)) for j in range(256)]
    index = ChunkIndex(saved)
    for j in range(0, 1024, 7):
        got = index.overlapping(ChunkStorageMetadata((3, j), (10, 6)))
        assert [i for i, _ in got] == list(range(j // 4, min((j + 5) // 4 + 1, 256)))


def test_chunk_index_edge_cases() -> None:
    assert ChunkIndex([]).overlapping(ChunkStorageMetadata((0,), (4,))) == []
    scalars = ChunkIndex([ChunkStorageMetadata((), ())])
    assert scalars.overlapping(ChunkStorageMetadata((), ())) == [(0, Overlap((), (), ()))]
    with pytest.raises(ValueError, match="target chunk has 1 dims, saved chunks have 2"):
        ChunkIndex([ChunkStorageMetadata((0, 0), (1, 1))]).overlapping(ChunkStorageMetadata((0,), (1,)))
    with pytest.raises(ValueError, match="differ in number of dims"):
        ChunkIndex([ChunkStorageMetadata((0, 0), (1, 1)), ChunkStorageMetadata((0,), (1,))])


@SETTINGS
@given(st.data(), st.sampled_from([1, 2, 4]))
def test_contiguous_byte_range_is_tightest_row_major_span(data: st.DataObject, itemsize: int) -> None:
    chunk_shape, box = data.draw(shape_and_box())
    start, end = contiguous_byte_range(chunk_shape, box.offsets, box.sizes, itemsize)
    flat = np.flatnonzero(mask(chunk_shape, box).reshape(-1))
    if flat.size == 0:
        assert start == end
    else:
        assert (start, end) == (int(flat[0]) * itemsize, (int(flat[-1]) + 1) * itemsize)


def test_contiguous_byte_range_examples() -> None:
    assert contiguous_byte_range((4, 8), (2, 2), (2, 2), 4) == (72, 112)
    assert contiguous_byte_range((4, 8), (1, 0), (2, 8), 2) == (16, 48)  # whole rows: exact
    assert contiguous_byte_range((), (), (), 8) == (0, 8)
    with pytest.raises(ValueError, match="outside chunk sizes"):
        contiguous_byte_range((4,), (2,), (3,), 4)
    with pytest.raises(ValueError, match="differ in number of dims"):
        contiguous_byte_range((4, 4), (0,), (1,), 4)
