"""Coverage validation (async_ckpt.planning.validate)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from async_ckpt.planning import (
    ChunkStorageMetadata,
    MetadataIndex,
    PlanValidationError,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    validate_coverage,
)
from async_ckpt.planning import validate as validate_module

SETTINGS = settings(max_examples=80, deadline=None)

Box = tuple[tuple[int, ...], tuple[int, ...]]


def item(
    fqn: str,
    shape: Sequence[int],
    offsets: Sequence[int],
    sizes: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> WriteItem:
    chunk = ChunkStorageMetadata(offsets, sizes)
    return WriteItem(MetadataIndex(fqn, offsets), WriteItemType.SHARD, TensorWriteData(chunk, dtype, shape))


def plans_of(fqn: str, shape: Sequence[int], boxes: Sequence[Box], n_plans: int = 3) -> list[SavePlan]:
    """Spread the boxes round-robin over a few plans, as ranks would hold them."""
    plans: list[list[WriteItem]] = [[] for _ in range(n_plans)]
    for i, (offsets, sizes) in enumerate(boxes):
        plans[i % n_plans].append(item(fqn, shape, offsets, sizes))
    return [SavePlan(p) for p in plans]


def check(shape: Sequence[int], boxes: Sequence[Box]) -> None:
    validate_coverage(plans_of("t", shape, boxes))


# --- grids -------------------------------------------------------------------


@st.composite
def grid(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    """A shape and the boxes of a random (uneven) grid tiling it exactly."""
    ndim = draw(st.integers(1, 3))
    shape, cuts = [], []
    for _ in range(ndim):
        dim = draw(st.integers(1, 12))
        inner = draw(st.sets(st.integers(1, dim - 1), max_size=4)) if dim > 1 else set()
        shape.append(dim)
        cuts.append([0, *sorted(inner), dim])
    boxes = []
    for cell in itertools.product(*(range(len(c) - 1) for c in cuts)):
        offsets = tuple(c[i] for c, i in zip(cuts, cell, strict=True))
        sizes = tuple(c[i + 1] - c[i] for c, i in zip(cuts, cell, strict=True))
        boxes.append((offsets, sizes))
    order = draw(st.permutations(range(len(boxes))))
    return tuple(shape), [boxes[i] for i in order]


@SETTINGS
@given(grid())
def test_grid_tilings_validate(case: tuple[tuple[int, ...], list[Box]]) -> None:
    check(*case)


def suspects(plans: list[SavePlan]) -> list[int]:
    return validate_module._suspects(validate_module._collect(plans, frozenset()))


@SETTINGS
@given(st.lists(grid(), min_size=1, max_size=4))
def test_grid_tilings_pass_the_batched_check_alone(cases: list[tuple[tuple[int, ...], list[Box]]]) -> None:
    # Several tensors of mixed ranks at once, as in a real plan; none needs
    # the one-tensor-at-a-time recheck.
    plans = [p for i, (shape, boxes) in enumerate(cases) for p in plans_of(f"t{i}", shape, boxes)]
    plans += plans_of("scalar", (), [((), ())]) + plans_of("empty", (0, 3), [((0, 0), (0, 3))])
    assert suspects(plans) == []


def test_batched_check_flags_exactly_the_bad_tensors() -> None:
    good = plans_of("good", (4, 4), [((0, 0), (2, 4)), ((2, 0), (2, 4))])
    irregular = plans_of("irregular", (8, 8), [((0, 0), (8, 4)), ((0, 4), (4, 4)), ((4, 4), (4, 4))])
    gap = plans_of("gap", (4,), [((0,), (2,))])
    dup = plans_of("dup", (2, 2), [((0, 0), (1, 2)), ((1, 0), (1, 2)), ((1, 0), (1, 2))])
    # Same count of cells as chunks, one cell doubled and one missed.
    swap = plans_of("swap", (2, 2), [((0, 0), (1, 1)), ((0, 1), (1, 1)), ((1, 0), (1, 1)), ((0, 0), (1, 1))])
    plans = good + irregular + gap + dup + swap
    assert suspects(plans) == [1, 2, 3, 4]


@SETTINGS
@given(grid(), st.data())
def test_grid_missing_a_chunk_is_a_gap(case: tuple[tuple[int, ...], list[Box]], data: st.DataObject) -> None:
    shape, boxes = case
    assume(len(boxes) > 1)  # a tensor with no chunk at all is not in the plans
    drop = data.draw(st.integers(0, len(boxes) - 1))
    missing = math.prod(boxes[drop][1])
    with pytest.raises(PlanValidationError, match="'t': chunks leave a gap") as err:
        check(shape, boxes[:drop] + boxes[drop + 1 :])
    assert f"covered {math.prod(shape) - missing} of {math.prod(shape)} elements" in str(err.value)


@SETTINGS
@given(grid(), st.data())
def test_grid_shifted_chunk_is_rejected(case: tuple[tuple[int, ...], list[Box]], data: st.DataObject) -> None:
    shape, boxes = case
    i = data.draw(st.integers(0, len(boxes) - 1))
    d = data.draw(st.integers(0, len(shape) - 1))
    step = data.draw(st.sampled_from([-1, 1]))
    offsets, sizes = boxes[i]
    moved = tuple(o + step if k == d else o for k, o in enumerate(offsets))
    boxes = [*boxes[:i], (moved, sizes), *boxes[i + 1 :]]
    with pytest.raises(PlanValidationError, match=r"'t': chunk(s overlap| offsets=.* is out of bounds)"):
        check(shape, boxes)


@SETTINGS
@given(grid(), st.data())
def test_grid_duplicated_chunk_overlaps(case: tuple[tuple[int, ...], list[Box]], data: st.DataObject) -> None:
    shape, boxes = case
    dup = boxes[data.draw(st.integers(0, len(boxes) - 1))]
    with pytest.raises(PlanValidationError, match=rf"'t': chunks overlap at offsets \({dup[0][0]},"):
        check(shape, [*boxes, dup])


# --- arbitrary boxes against a brute-force count --------------------------------


@st.composite
def boxes_in_small_shape(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    boxes = []
    for _ in range(draw(st.integers(1, 8))):
        offsets = tuple(draw(st.integers(0, dim)) for dim in shape)
        sizes = tuple(draw(st.integers(1, dim + 1 - o)) for dim, o in zip(shape, offsets, strict=True))
        boxes.append((offsets, sizes))
    return shape, boxes


def brute_force(shape: tuple[int, ...], boxes: Sequence[Box]) -> str | None:
    count = np.zeros(shape, dtype=np.int64)
    for offsets, sizes in boxes:
        if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
            return "bounds"
        count[tuple(slice(o, o + s) for o, s in zip(offsets, sizes, strict=True))] += 1
    if (count > 1).any():
        return "overlap"
    if (count == 0).any():
        return "gap"
    return None


def outcome(shape: tuple[int, ...], boxes: Sequence[Box]) -> str | None:
    try:
        check(shape, boxes)
    except PlanValidationError as exc:
        text = str(exc)
        assert text.startswith("tensor 't': ")
        for kind, marker in (("bounds", "out of bounds"), ("overlap", "overlap"), ("gap", "gap")):
            if marker in text:
                return kind
        raise
    return None


@settings(max_examples=150, deadline=None)
@given(boxes_in_small_shape())
def test_arbitrary_boxes_agree_with_brute_force(case: tuple[tuple[int, ...], list[Box]]) -> None:
    assert outcome(*case) == brute_force(*case)


@settings(max_examples=100, deadline=None)
@given(boxes_in_small_shape())
def test_sweep_fallback_agrees_with_brute_force(
    case: tuple[tuple[int, ...], list[Box]],
) -> None:
    # Force the path used for irregular layouts too large to enumerate.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validate_module, "_CELLS_PER_CHUNK_LIMIT", 0)
        mp.setattr(validate_module, "_MIN_CELL_BUDGET", 0)
        assert outcome(*case) == brute_force(*case)


def test_irregular_tiling_validates() -> None:
    # One tall chunk beside two short ones: not a grid, still exact.
    check((8, 8), [((0, 0), (8, 4)), ((0, 4), (4, 4)), ((4, 4), (4, 4))])


def test_irregular_overlap_names_position() -> None:
    with pytest.raises(PlanValidationError, match=r"'t': chunks overlap at offsets \(2, 2\)"):
        check((8, 8), [((0, 0), (8, 4)), ((2, 2), (2, 4)), ((0, 4), (2, 4)), ((4, 4), (4, 4))])


# --- edge cases and messages ------------------------------------------------------


def test_gap_message() -> None:
    with pytest.raises(PlanValidationError) as err:
        check((8, 16), [((0, 0), (2, 16)), ((2, 0), (4, 16))])
    assert str(err.value) == (
        "tensor 't': chunks leave a gap: covered 96 of 128 elements of global shape (8, 16)"
    )


def test_overlap_message() -> None:
    with pytest.raises(PlanValidationError) as err:
        check((8, 8), [((0, 0), (4, 8)), ((0, 4), (8, 4))])
    assert str(err.value) == (
        "tensor 't': chunks overlap at offsets (0, 4): offsets=(0, 0) sizes=(4, 8) "
        "and offsets=(0, 4) sizes=(8, 4)"
    )


@pytest.mark.parametrize(
    "box",
    [((-1, 0), (4, 8)), ((5, 0), (4, 8)), ((0, 0), (9, 8)), ((0, 0), (-1, 8)), ((9, 0), (0, 8))],
)
def test_out_of_bounds(box: Box) -> None:
    with pytest.raises(
        PlanValidationError, match=r"'t': chunk offsets=.* is out of bounds of global shape \(8, 8\)"
    ):
        check((8, 8), [box, ((0, 0), (8, 8))])
    with pytest.raises(PlanValidationError, match="out of bounds"):
        check((8, 8), [box])


def test_dtype_and_shape_must_agree() -> None:
    a = item("model.w", (8,), (0,), (4,), torch.float32)
    with pytest.raises(PlanValidationError, match=r"'model.w': items disagree on dtype: float32 vs bfloat16"):
        validate_coverage([SavePlan([a]), SavePlan([item("model.w", (8,), (4,), (4,), torch.bfloat16)])])
    with pytest.raises(
        PlanValidationError, match=r"'model.w': items disagree on global shape: \(8,\) vs \(9,\)"
    ):
        validate_coverage([SavePlan([a]), SavePlan([item("model.w", (9,), (4,), (4,))])])
    with pytest.raises(
        PlanValidationError, match=r"'model.w': chunk offsets=.* has 2 dims but the global shape"
    ):
        validate_coverage([SavePlan([a, item("model.w", (8,), (4, 0), (4, 1))])])


def test_zero_dim_tensor() -> None:
    check((), [((), ())])
    with pytest.raises(PlanValidationError, match=r"'t': chunks overlap at offsets \(\)"):
        check((), [((), ()), ((), ())])


def test_empty_tensors_need_only_in_bounds_chunks() -> None:
    check((0, 4), [((0, 0), (0, 4))])
    check((0, 4), [((0, 0), (0, 4)), ((0, 0), (0, 2)), ((0, 2), (0, 2))])
    check((4, 0), [((0, 0), (4, 0))])
    with pytest.raises(PlanValidationError, match="out of bounds"):
        check((0, 4), [((0, 0), (1, 4))])


def test_empty_chunks_in_a_nonempty_tensor_are_ignored() -> None:
    # torch.chunk-style uneven sharding leaves trailing ranks with nothing.
    check((3, 2), [((0, 0), (2, 2)), ((2, 0), (1, 2)), ((3, 0), (0, 2)), ((1, 0), (0, 2))])


def test_single_chunk_must_cover_the_tensor() -> None:
    check((4, 4), [((0, 0), (4, 4))])
    with pytest.raises(PlanValidationError, match="covered 8 of 16"):
        check((4, 4), [((0, 0), (2, 4))])


def test_byte_io_and_per_rank_fqns_are_skipped() -> None:
    value = WriteItem(MetadataIndex("step"), WriteItemType.BYTE_IO, value_hash="h")
    per_rank = [SavePlan([item("ema", (4,), (0,), (4,)), value]) for _ in range(3)]
    validate_coverage(per_rank, per_rank_fqns=frozenset({"ema"}))
    with pytest.raises(PlanValidationError, match="'ema': chunks overlap"):
        validate_coverage(per_rank)


def test_per_rank_tensors_may_differ_in_shape_and_dtype() -> None:
    plans = [
        SavePlan([item("buf", (2,), (0,), (2,))]),
        SavePlan([item("buf", (3, 1), (0, 0), (3, 1), torch.bfloat16)]),
        SavePlan([WriteItem(MetadataIndex("buf", (0,)), WriteItemType.SHARD)]),
    ]
    validate_coverage(plans, per_rank_fqns=frozenset({"buf"}))


def test_same_fqn_as_bytes_and_tensor_is_rejected() -> None:
    value = WriteItem(MetadataIndex("x"), WriteItemType.BYTE_IO)
    with pytest.raises(PlanValidationError, match="'x': saved both as bytes and as a tensor"):
        validate_coverage([SavePlan([value, item("x", (2,), (0,), (2,))])])


def test_tensor_item_without_data_is_rejected() -> None:
    bare = WriteItem(MetadataIndex("x", (0,)), WriteItemType.SHARD)
    with pytest.raises(PlanValidationError, match="'x': shard item has no tensor data"):
        validate_coverage([SavePlan([bare])])


def test_many_chunks_per_tensor_stay_fast() -> None:
    # 4096 chunks in a 64 x 64 grid plus 4096 column strips on another tensor:
    # a pairwise check would do ~8.4M + 8.4M box comparisons.
    rnd = random.Random(0)
    grid_boxes = [((16 * i, 8 * j), (16, 8)) for i in range(64) for j in range(64)]
    strips = [((0, 2 * j), (1024, 2)) for j in range(4096)]
    rnd.shuffle(grid_boxes)
    plans = plans_of("grid", (1024, 512), grid_boxes, 64) + plans_of("strips", (1024, 8192), strips, 64)
    validate_coverage(plans)
    with pytest.raises(PlanValidationError, match="'strips': chunks overlap"):
        validate_coverage([*plans, SavePlan([item("strips", (1024, 8192), (0, 6), (1024, 2))])])
