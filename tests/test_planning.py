"""Deduplication and global planning (async_ckpt.planning)."""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint import planner as dcp_pl
from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans as dcp_dedup_save_plans

from async_ckpt.planning import (
    ChunkStorageMetadata,
    GlobalPlan,
    MetadataIndex,
    PlanValidationError,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    balanced_dedup,
    create_global_plan,
    dedup_save_plans,
    dedup_tensors,
    write_item_for_tensor,
)

SETTINGS = settings(max_examples=60, deadline=None)
KIB, MIB = 1024, 1024 * 1024


def tensor_item(
    fqn: str,
    shape: Sequence[int],
    offsets: Sequence[int] | None = None,
    sizes: Sequence[int] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    value_hash: str | None = None,
) -> WriteItem:
    offsets = tuple(offsets) if offsets is not None else (0,) * len(shape)
    sizes = tuple(sizes) if sizes is not None else tuple(shape)
    kind = WriteItemType.TENSOR if sizes == tuple(shape) else WriteItemType.SHARD
    chunk = ChunkStorageMetadata(offsets, sizes)
    return WriteItem(MetadataIndex(fqn, offsets), kind, TensorWriteData(chunk, dtype, shape), value_hash)


def bytes_item(fqn: str, value_hash: str | None = None) -> WriteItem:
    return WriteItem(MetadataIndex(fqn), WriteItemType.BYTE_IO, value_hash=value_hash)


def keys(plans: Sequence[SavePlan]) -> list[list[tuple[str, tuple[int, ...] | None]]]:
    return [[(i.index.fqn, i.index.offset) for i in p.items] for p in plans]


def key_sets(plans: Sequence[SavePlan]) -> list[set[tuple[str, tuple[int, ...] | None]]]:
    return [set(k) for k in keys(plans)]


def plan_bytes(plans: Sequence[SavePlan]) -> list[int]:
    return [sum(i.tensor_storage_size() or 0 for i in p.items) for p in plans]


def to_dcp_plans(plans: Sequence[SavePlan]) -> list[dcp_pl.SavePlan]:
    kinds = {
        WriteItemType.TENSOR: dcp_pl.WriteItemType.TENSOR,
        WriteItemType.SHARD: dcp_pl.WriteItemType.SHARD,
        WriteItemType.BYTE_IO: dcp_pl.WriteItemType.BYTE_IO,
    }
    out = []
    for plan in plans:
        items = []
        for item in plan.items:
            data = None
            if item.tensor_data is not None:
                td = item.tensor_data
                data = dcp_pl.TensorWriteData(
                    chunk=dcp_md.ChunkStorageMetadata(torch.Size(td.offsets), torch.Size(td.sizes)),
                    properties=dcp_md.TensorProperties(dtype=getattr(torch, td.dtype)),
                    size=torch.Size(td.size),
                )
            index = dcp_md.MetadataIndex(item.index.fqn, item.index.offset)
            items.append(dcp_pl.WriteItem(index=index, type=kinds[item.type], tensor_data=data))
        out.append(dcp_pl.SavePlan(items))
    return out


def dcp_keys(plans: Sequence[dcp_pl.SavePlan]) -> list[list[tuple[str, tuple[int, ...] | None]]]:
    return [
        [(i.index.fqn, None if i.index.offset is None else tuple(i.index.offset)) for i in p.items]
        for p in plans
    ]


# --- random holdings ---------------------------------------------------------


@st.composite
def holdings(draw: st.DrawFn, max_plans: int = 48) -> list[SavePlan]:
    """Plans holding random subsets of a pool of tensor shards and byte values.

    Sizes come from a small set so that ties (and DCP's tie-breaking) are common.
    """
    n_plans = draw(st.integers(1, max_plans))
    n_keys = draw(st.integers(1, 24))
    pool: list[WriteItem] = []
    for k in range(n_keys):
        if draw(st.integers(0, 5)) == 0:
            pool.append(bytes_item(f"v{k}"))
            continue
        rows = draw(st.sampled_from([1, 2, 4]))
        n_parts = draw(st.sampled_from([1, 2]))
        part = draw(st.integers(0, n_parts - 1))
        shape = (rows * n_parts, draw(st.sampled_from([1, 3])))
        pool.append(tensor_item(f"t{k}", shape, (rows * part, 0), (rows, shape[1])))
    plans: list[list[WriteItem]] = [[] for _ in range(n_plans)]
    for item in pool:
        holders = draw(st.sets(st.integers(0, n_plans - 1), min_size=1))
        for h in holders:
            plans[h].append(item)
    for items in plans:
        perm = draw(st.permutations(range(len(items))))
        items[:] = [items[i] for i in perm]
    return [SavePlan(items) for items in plans]


# --- dedup_tensors -----------------------------------------------------------


def test_dedup_tensors_keeps_first_holder() -> None:
    shared = tensor_item("tensor_0", (8,))
    plans = [
        SavePlan([shared, tensor_item("a", (2,))]),
        SavePlan([shared, tensor_item("b", (2,))]),
    ]
    out = dedup_tensors(plans)
    assert [len(p.items) for p in out] == [2, 1]
    assert keys(out)[1] == [("b", (0,))]
    assert [len(p.items) for p in plans] == [2, 2]  # inputs untouched


@SETTINGS
@given(holdings())
def test_dedup_tensors_matches_keep_first_rule(plans: list[SavePlan]) -> None:
    out = dedup_tensors(plans)
    seen: set[tuple[str, tuple[int, ...] | None]] = set()
    for before, after in zip(keys(plans), keys(out), strict=True):
        assert after == [k for k in before if k not in seen]
        seen.update(before)


# --- dedup_save_plans == DCP -------------------------------------------------


@SETTINGS
@given(holdings(), st.booleans())
def test_dedup_save_plans_identical_to_dcp(plans: list[SavePlan], lowest: bool) -> None:
    ours = dedup_save_plans(plans, save_to_lowest_rank=lowest)
    theirs = dcp_dedup_save_plans(to_dcp_plans(plans), save_to_lowest_rank=lowest)
    assert keys(ours) == dcp_keys(theirs)


def test_dedup_save_plans_follows_dcp_set_order_on_ties() -> None:
    # Plans 3 and 40 tie at zero bytes; DCP's min() over {3, 40} sees 40 first.
    plans = [SavePlan([]) for _ in range(41)]
    item = tensor_item("w", (4,))
    plans[3] = SavePlan([item])
    plans[40] = SavePlan([item])
    theirs = dcp_dedup_save_plans(to_dcp_plans(plans))
    ours = dedup_save_plans(plans)
    assert keys(ours) == dcp_keys(theirs)
    assert [len(p.items) for p in ours][3::37] == [0, 1]


def test_dedup_save_plans_does_not_modify_inputs() -> None:
    shared = tensor_item("w", (4,))
    plans = [SavePlan([shared]), SavePlan([shared])]
    dedup_save_plans(plans)
    assert [len(p.items) for p in plans] == [1, 1]


# --- balanced_dedup ----------------------------------------------------------


def test_balanced_dedup_example() -> None:
    shared = tensor_item("tensor_0", (8,))
    plans = [
        SavePlan([shared, tensor_item("a", (2,))]),
        SavePlan([shared, tensor_item("b", (2,))]),
    ]
    out = balanced_dedup(plans)
    assert sorted(len(p.items) for p in out) == [1, 2]
    assert sum(k == ("tensor_0", (0,)) for p in keys(out) for k in p) == 1


def test_balanced_dedup_largest_first_onto_least_loaded_lowest_rank_on_ties() -> None:
    big, mid, small = tensor_item("big", (1000,)), tensor_item("mid", (600,)), tensor_item("s", (500,))
    plans = [SavePlan([small, mid, big]), SavePlan([big, mid, small])]
    out = balanced_dedup(plans, item_cost_bytes=0)
    # big -> rank 0 (tie, lowest); mid -> rank 1; small -> rank 1 (2400 < 4000).
    assert key_sets(out) == [{("big", (0,))}, {("mid", (0,)), ("s", (0,))}]


def test_balanced_dedup_counts_items_held_by_one_rank_first() -> None:
    own = tensor_item("own", (1000,))
    shared = [tensor_item(f"r{i}", (100,)) for i in range(4)]
    out = balanced_dedup([SavePlan([own, *shared]), SavePlan(shared)], item_cost_bytes=0)
    assert key_sets(out)[0] == {("own", (0,))}
    assert len(out[1].items) == 4


def test_balanced_dedup_item_cost_spreads_tiny_tensors() -> None:
    tiny = [tensor_item(f"norm{i}", ()) for i in range(100)]
    big = tensor_item("big", (1024, 1024))  # 4 MiB
    plans = [SavePlan([big, *tiny]) for _ in range(2)]
    bytes_only = [len(p.items) for p in balanced_dedup(plans, item_cost_bytes=0)]
    with_cost = [len(p.items) for p in balanced_dedup(plans)]
    assert bytes_only == [1, 100]
    # At 64 KiB per item the big tensor weighs as much as 65 tiny ones; rank 1
    # takes those 65, then the remaining 35 alternate (18 to rank 0, 17 to 1).
    assert with_cost == [1 + 18, 65 + 17]


def test_balanced_dedup_keeps_values_whose_hash_differs() -> None:
    plans = [
        SavePlan([bytes_item("rng", "h0"), bytes_item("step", "s")]),
        SavePlan([bytes_item("rng", "h1"), bytes_item("step", "s")]),
    ]
    out = key_sets(balanced_dedup(plans))
    assert ("rng", None) in out[0] and ("rng", None) in out[1]
    assert sum(("step", None) in s for s in out) == 1


@SETTINGS
@given(holdings(max_plans=12), st.randoms(use_true_random=False))
def test_balanced_dedup_depends_only_on_who_holds_what(plans: list[SavePlan], rnd: random.Random) -> None:
    out = key_sets(balanced_dedup(plans))
    shuffled = []
    for plan in plans:
        items = list(plan.items)
        rnd.shuffle(items)
        shuffled.append(SavePlan(items))
    assert key_sets(balanced_dedup(shuffled)) == out
    # every key kept exactly once, by one of its holders
    holders: dict[tuple[str, tuple[int, ...] | None], set[int]] = {}
    for rank, held in enumerate(key_sets(plans)):
        for k in held:
            holders.setdefault(k, set()).add(rank)
    kept = [(k, rank) for rank, held in enumerate(out) for k in held]
    assert sorted((k for k, _ in kept), key=str) == sorted(holders, key=str)
    assert all(rank in holders[k] for k, rank in kept)


def _replicated_mixed_sizes(n_ranks: int, n_tensors: int, seed: int) -> list[SavePlan]:
    rnd = random.Random(seed)
    items = []
    for i in range(n_tensors):
        nbytes = int(math.exp(rnd.uniform(math.log(KIB), math.log(64 * MIB))))
        items.append(tensor_item(f"layer{i}.weight", (nbytes // 4,)))
    return [SavePlan(list(items)) for _ in range(n_ranks)]


def _max_over_mean(per_rank: Sequence[int]) -> float:
    return max(per_rank) / statistics.fmean(per_rank)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_dedup_balances_replicated_tensors_better_than_dcp(seed: int) -> None:
    plans = _replicated_mixed_sizes(8, 200, seed)
    ours = _max_over_mean(plan_bytes(balanced_dedup(plans)))
    dcp_plans = dcp_dedup_save_plans(to_dcp_plans(plans))
    dcp = _max_over_mean([sum(i.tensor_storage_size() or 0 for i in p.items) for p in dcp_plans])
    print(f"seed {seed}: max/mean bytes per rank: balanced_dedup {ours:.4f}, DCP greedy {dcp:.4f}")
    assert ours <= 1.05
    assert ours <= dcp


# --- create_global_plan ------------------------------------------------------


def _dp_tp_plans(dp: int, tp: int) -> list[SavePlan]:
    """A weight sharded on tp and replicated on dp, a norm, and two values."""
    plans = []
    for rank in range(dp * tp):
        t = rank % tp
        plans.append(
            SavePlan(
                [
                    tensor_item("w", (8 * tp, 4), (8 * t, 0), (8, 4)),
                    tensor_item("norm", (4,)),
                    bytes_item("step", "same"),
                    bytes_item("rng", f"rank{rank}"),
                ]
            )
        )
    return plans


@pytest.mark.parametrize("mode", ["balanced", "lowest_rank"])
def test_create_global_plan_dedups_replicas_and_keeps_per_rank_values(mode: str) -> None:
    plans = _dp_tp_plans(dp=3, tp=2)
    gp = create_global_plan(plans, dedup=mode)  # type: ignore[arg-type]
    assert isinstance(gp, GlobalPlan)
    assert gp.per_rank_fqns == frozenset({"rng"})
    kept = [k for p in keys(gp.plans) for k in p]
    assert kept.count(("w", (0, 0))) == kept.count(("w", (8, 0))) == 1
    assert kept.count(("norm", (0,))) == kept.count(("step", None)) == 1
    assert kept.count(("rng", None)) == 6
    if mode == "lowest_rank":
        assert key_sets(gp.plans)[0] == {("w", (0, 0)), ("norm", (0,)), ("step", None), ("rng", None)}


def test_create_global_plan_none_requires_disjoint_plans() -> None:
    with pytest.raises(PlanValidationError, match="'w': chunks overlap"):
        create_global_plan(_dp_tp_plans(dp=2, tp=2), dedup="none")
    disjoint = [SavePlan([tensor_item("w", (4,), (2 * r,), (2,))]) for r in range(2)]
    assert keys(create_global_plan(disjoint, dedup="none").plans) == keys(disjoint)


def test_create_global_plan_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="dedup must be one of"):
        create_global_plan([], dedup="fastest")  # type: ignore[arg-type]


def test_create_global_plan_validates_coverage() -> None:
    plans = [SavePlan([tensor_item("w", (8,), (0,), (4,))])]
    with pytest.raises(PlanValidationError, match="'w': chunks leave a gap: covered 4 of 8"):
        create_global_plan(plans)


def test_create_global_plan_per_rank_tensor_kept_whole_on_every_holder() -> None:
    # A tensor whose replicas turn out to differ (verify_replicas hashes it):
    # every holder keeps all its chunks, and coverage is not checked for it.
    plans = [
        SavePlan(
            [tensor_item("ema", (4,), (0,), (2,), value_hash=f"a{r}"), tensor_item("ema", (4,), (2,), (2,))]
        )
        for r in range(2)
    ]
    gp = create_global_plan(plans)
    assert gp.per_rank_fqns == frozenset({"ema"})
    assert [len(p.items) for p in gp.plans] == [2, 2]


def test_create_global_plan_equal_hashes_are_replicas() -> None:
    plans = [SavePlan([bytes_item("cfg", "h"), write_item_for_tensor("x", torch.zeros(3))]) for _ in range(4)]
    gp = create_global_plan(plans)
    assert gp.per_rank_fqns == frozenset()
    assert sum(len(p.items) for p in gp.plans) == 2


@pytest.mark.parametrize("hashes", [("h", None), (None, "h"), (None, "h", "h"), ("h", "g", None)])
def test_create_global_plan_missing_hash_on_one_holder_counts_as_differing(
    hashes: tuple[str | None, ...],
) -> None:
    plans = [SavePlan([bytes_item("step", "s"), bytes_item("cfg", h)]) for h in hashes]
    gp = create_global_plan(plans)
    assert gp.per_rank_fqns == frozenset({"cfg"})
    assert [k for p in keys(gp.plans) for k in p].count(("cfg", None)) == len(hashes)
    assert [k for p in keys(gp.plans) for k in p].count(("step", None)) == 1


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.randoms(use_true_random=False))
def test_create_global_plan_is_deterministic(dp: int, tp: int, rnd: random.Random) -> None:
    plans = _dp_tp_plans(dp, tp)
    shuffled = [dataclasses.replace(p, items=rnd.sample(list(p.items), len(p.items))) for p in plans]
    a, b = create_global_plan(plans), create_global_plan(shuffled)
    assert key_sets(a.plans) == key_sets(b.plans)
    assert a.per_rank_fqns == b.per_rank_fqns


def test_create_global_plan_empty() -> None:
    assert create_global_plan([]) == GlobalPlan(plans=[], per_rank_fqns=frozenset())
    assert create_global_plan([SavePlan([])]).plans == [SavePlan([])]


@SETTINGS
@given(st.data(), st.integers(1, 12), st.integers(1, 5))
def test_create_global_plan_per_rank_values_match_hash_disagreement(
    data: st.DataObject, n_plans: int, n_values: int
) -> None:
    plans: list[list[WriteItem]] = [[] for _ in range(n_plans)]
    hashes: dict[str, set[str | None]] = {}
    for v in range(n_values):
        holders = data.draw(st.sets(st.integers(0, n_plans - 1), min_size=1))
        for h in sorted(holders):
            value_hash = data.draw(st.sampled_from([None, "a", "b"]))
            hashes.setdefault(f"v{v}", set()).add(value_hash)
            plans[h].append(bytes_item(f"v{v}", value_hash))
    # A tensor tiled across all plans keeps coverage validation busy too.
    for r in range(n_plans):
        plans[r].append(tensor_item("w", (n_plans,), (r,), (1,)))
    gp = create_global_plan([SavePlan(items) for items in plans])
    expected = frozenset(fqn for fqn, seen in hashes.items() if len(seen) > 1)
    assert gp.per_rank_fqns == expected
    kept = [k[0] for p in keys(gp.plans) for k in p]
    for fqn in hashes:
        n_holders = sum(any(i.index.fqn == fqn for i in items) for items in plans)
        assert kept.count(fqn) == (n_holders if fqn in expected else 1)
