"""Planning with staged subsets (replica-sharded staging): ``create_global_plan(..., staged=...)``.

A rank that staged only some of its items may write only those: the plan keeps
the unconstrained balanced owner of an item where that owner staged it, falls
back to another holder that staged it, and raises naming the key when no
holder did. ``preferred`` is the unconstrained plan, what each rank should
stage next time, given only where it differs from the plan executed.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from async_ckpt.errors import CheckpointError
from async_ckpt.planning import (
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    create_global_plan,
)

Key = tuple[str, tuple[int, ...] | None]


def _item(fqn: str, n: int, offset: int = 0, total: int | None = None) -> WriteItem:
    total = n if total is None else total
    kind = WriteItemType.TENSOR if n == total else WriteItemType.SHARD
    chunk = ChunkStorageMetadata((offset,), (n,))
    return WriteItem(MetadataIndex(fqn, (offset,)), kind, TensorWriteData(chunk, torch.float32, (total,)))


def _value(fqn: str) -> WriteItem:
    return WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO, value_hash="h")


def _replicated(world: int, n_tensors: int = 8) -> list[SavePlan]:
    items = [_item(f"w{i}", 1000 * (i + 1)) for i in range(n_tensors)] + [_value("step")]
    return [SavePlan(list(items)) for _ in range(world)]


def _keys(plan: SavePlan) -> set[Key]:
    return {(it.index.fqn, it.index.offset) for it in plan.items if it.type is not WriteItemType.BYTE_IO}


def _mask(plan: SavePlan, keep: set[Key]) -> list[bool]:
    return [it.type is WriteItemType.BYTE_IO or (it.index.fqn, it.index.offset) in keep for it in plan.items]


def _written(plans: Sequence[SavePlan]) -> list[set[Key]]:
    return [_keys(p) for p in plans]


def test_each_rank_staging_its_own_share_gives_the_same_plan() -> None:
    plans = _replicated(4)
    full = create_global_plan(plans)
    shares = _written(full.plans)
    assert all(shares), "every rank writes something of 8 replicated tensors"
    staged = [_mask(p, s) for p, s in zip(plans, shares, strict=True)]
    reduced = create_global_plan(plans, staged=staged)
    assert _written(reduced.plans) == shares
    assert reduced.preferred is None


def test_ranks_disagreeing_one_full_one_reduced_keep_the_plan() -> None:
    plans = _replicated(2)
    shares = _written(create_global_plan(plans).plans)
    staged: list[list[bool] | None] = [_mask(plans[0], shares[0]), None]
    out = create_global_plan(plans, staged=staged)
    assert _written(out.plans) == shares
    assert out.preferred is None


def test_an_owner_that_did_not_stage_its_item_hands_it_to_a_holder_that_did() -> None:
    plans = _replicated(3)
    shares = _written(create_global_plan(plans).plans)
    # Rank 1 staged rank 0's share instead of its own (an old plan); rank 2 staged everything.
    staged: list[list[bool] | None] = [_mask(plans[0], shares[0]), _mask(plans[1], shares[0]), None]
    out = create_global_plan(plans, staged=staged)
    written = _written(out.plans)
    assert written[1] <= shares[0], "rank 1 writes only what it staged"
    assert written[0] <= shares[0]
    assert shares[1] <= written[2], "rank 1's share goes to the one rank that staged it"
    assert set().union(*written) == _keys(plans[0])
    assert sum(len(w) for w in written) == len(_keys(plans[0])), "each item written once"
    assert out.preferred is not None
    assert _written(out.preferred) == shares, "next time, each rank stages its unconstrained share"


def test_an_item_nobody_staged_is_an_error_naming_key_and_holders() -> None:
    plans = _replicated(2)
    shares = _written(create_global_plan(plans).plans)
    missing = sorted(shares[1])[0]
    staged = [_mask(plans[0], shares[0]), _mask(plans[1], shares[1] - {missing})]
    with pytest.raises(CheckpointError, match=rf"{missing[0]}.*ranks \[0, 1\]"):
        create_global_plan(plans, staged=staged)


def test_sharded_items_stay_with_their_only_holder() -> None:
    world = 4
    plans = []
    for r in range(world):
        items = [_item("rep", 4096), _item("rep2", 2048), _item("sh", 100, offset=100 * r, total=400)]
        plans.append(SavePlan(items))
    shares = _written(create_global_plan(plans).plans)
    staged = [_mask(p, s) for p, s in zip(plans, shares, strict=True)]
    out = create_global_plan(plans, staged=staged)
    assert _written(out.plans) == shares
    assert [("sh", (100 * r,)) in shares[r] for r in range(world)] == [True] * world
    assert [len(s) for s in shares].count(1) == 2, "two ranks stage only their own shard"


def test_a_mask_of_the_wrong_length_is_refused() -> None:
    plans = _replicated(2)
    with pytest.raises(ValueError, match="rank 1"):
        create_global_plan(plans, staged=[None, [True]])
