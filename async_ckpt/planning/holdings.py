"""Who holds what: every plan's items indexed by ``(fqn, offset)``, and plans cut down to owners.

At 4,096 ranks the coordinator sees over 8 million items, and the per-item
Python work is what costs (profiled at 4,096 ranks x 2,000 items: building a
``(fqn, offset, value_hash)`` tuple per item and looking it up in a dict was
three quarters of the time).  Replicas make that work repetitive: every
data-parallel replica plans the same keys in the same order.  So each plan's
key sequence is looked up as a whole (two tuples hashed and compared in C);
only a plan with a sequence not seen before has its items looked up one by
one.  Everything after that runs in numpy over key ids.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .types import SavePlan, WriteItem

__all__ = ["KEEP_ALL", "Holdings", "apply_owners", "collect_holdings"]

# Owner value meaning "every holder keeps its own copy".
KEEP_ALL = -1

Key = tuple[str, tuple[int, ...] | None]
IntArray = npt.NDArray[np.int64]

_index_of = operator.attrgetter("index")
_fqn_of = operator.attrgetter("fqn")
_offset_of = operator.attrgetter("offset")
_hash_of = operator.attrgetter("value_hash")
_first_of_pair = operator.itemgetter(0)


@dataclass(frozen=True, slots=True)
class Holdings:
    """Who holds what, with keys numbered densely in first-appearance order.

    Key ``k`` is ``keys[k]``, an ``(fqn, offset)`` pair.  Plan ``p`` owns the
    flat item numbers ``plan_start[p]:plan_start[p + 1]``, and ``item_key``
    gives each item's key id.  The plan positions holding key ``k`` are
    ``holder_ranks[holder_start[k]:holder_start[k + 1]]``, ascending and
    without repeats.  ``first``/``last`` are the flat numbers of the key's
    first and last item in plan order.  ``mixed_hash`` holds the keys whose
    ``value_hash`` is not the same on every item (``None`` counts as a value).
    """

    plans: Sequence[SavePlan]
    keys: list[Key]
    plan_start: IntArray
    item_key: IntArray
    holder_ranks: IntArray
    holder_start: IntArray
    first: IntArray
    last: IntArray
    mixed_hash: frozenset[int]

    @property
    def n_plans(self) -> int:
        return len(self.plan_start) - 1

    @property
    def n_keys(self) -> int:
        return len(self.keys)

    def key(self, key_id: int) -> Key:
        return self.keys[key_id]

    def key_fqns(self) -> list[str]:
        """The fqn of every key, by key id."""
        return list(map(_first_of_pair, self.keys))

    def n_holders(self) -> IntArray:
        return np.diff(self.holder_start)

    def items_at(self, flat: IntArray) -> list[WriteItem]:
        """The items with these flat numbers."""
        if len(flat) * 16 > self.plan_start[-1]:
            # Many items (keys mostly unshared): one flat list is cheaper than a lookup each.
            everything = list(itertools.chain.from_iterable(plan.items for plan in self.plans))
            return list(map(everything.__getitem__, flat.tolist()))
        plan = np.searchsorted(self.plan_start, flat, side="right") - 1
        local = flat - self.plan_start[plan]
        return [self.plans[p].items[i] for p, i in zip(plan.tolist(), local.tolist(), strict=True)]

    def first_items(self) -> list[WriteItem]:
        return self.items_at(self.first)


@dataclass(slots=True)
class _KeyIndex:
    """Numbers keys across plans, one whole plan's key sequence at a time."""

    # key -> flat number of its first item; insertion order is first appearance.
    first_at: dict[Key, int] = dataclasses.field(default_factory=dict)
    # (fqns, offsets) of a plan -> the flat first-item number of each of its keys.
    sequences: dict[tuple[tuple[str, ...], tuple[object, ...]], IntArray] = dataclasses.field(
        default_factory=dict
    )

    def plan_keys(self, items: Sequence[WriteItem], start: int) -> IntArray:
        index = list(map(_index_of, items))
        fqns = tuple(map(_fqn_of, index))
        offsets = tuple(map(_offset_of, index))
        sequence = (fqns, offsets)
        known = self.sequences.get(sequence)
        if known is None:
            # setdefault hands back the flat number where each key was first
            # seen; count() supplies this plan's numbers for the new ones.
            lookups = map(self.first_at.setdefault, zip(fqns, offsets, strict=True), itertools.count(start))
            known = self.sequences[sequence] = np.fromiter(lookups, np.int64, len(fqns))
        return known


def collect_holdings(plans: Sequence[SavePlan]) -> Holdings:
    """Index every item of every plan by its ``(fqn, offset)`` key."""
    lengths = np.fromiter((len(plan.items) for plan in plans), np.int64, len(plans))
    plan_start = np.zeros(len(plans) + 1, dtype=np.int64)
    np.cumsum(lengths, out=plan_start[1:])
    n = int(plan_start[-1])
    index = _KeyIndex()
    per_plan: list[IntArray] = []
    hashed_at: list[IntArray] = []
    hashes: list[str] = []
    for plan, start in zip(plans, plan_start.tolist(), strict=False):
        per_plan.append(index.plan_keys(plan.items, start))
        values = list(map(_hash_of, plan.items))
        if values.count(None) != len(values):
            # Hashes are rare (non-tensor values, verify_replicas): only
            # their positions are kept, found by a C-level compress.
            at = list(
                itertools.compress(itertools.count(), map(operator.is_not, values, itertools.repeat(None)))
            )
            hashed_at.append(np.array(at, dtype=np.int64) + start)
            hashes.extend(map(values.__getitem__, at))
    keys = list(index.first_at)
    # First-item numbers grow with first appearance, so their rank is the key
    # id; a table from first-item number to key id converts each distinct key
    # sequence once (np.zeros leaves the untouched pages unallocated).
    first_sorted = np.fromiter(index.first_at.values(), np.int64, len(keys))
    key_of_first = np.zeros(max(n, 1), dtype=np.int64)
    key_of_first[first_sorted] = np.arange(len(keys), dtype=np.int64)
    key_ids = {id(seq): key_of_first[seq] for seq in index.sequences.values()}
    item_key = np.concatenate([key_ids[id(seq)] for seq in per_plan]) if n else np.zeros(0, np.int64)
    n_keys = len(keys)

    # Grouping by key (stably, so plan positions stay ascending) yields holders.
    item_plan = np.repeat(np.arange(len(plans), dtype=np.int32), lengths)
    order = _stable_order(item_key, n_keys)
    occurrences = np.bincount(item_key, minlength=n_keys)
    sorted_key = np.repeat(np.arange(n_keys, dtype=np.int64), occurrences)
    sorted_plan = item_plan[order]
    new_pair = np.ones(n, dtype=bool)
    new_pair[1:] = (sorted_key[1:] != sorted_key[:-1]) | (sorted_plan[1:] != sorted_plan[:-1])
    holder_ranks = sorted_plan[new_pair].astype(np.int64)
    holder_start = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_key[new_pair], minlength=n_keys), out=holder_start[1:])
    last = order[np.cumsum(occurrences) - 1]
    flat_hashed = np.concatenate(hashed_at) if hashed_at else np.zeros(0, np.int64)
    mixed = _mixed_keys(item_key, occurrences, flat_hashed, hashes)
    return Holdings(plans, keys, plan_start, item_key, holder_ranks, holder_start, first_sorted, last, mixed)


def _stable_order(values: IntArray, n_values: int) -> IntArray:
    """``np.argsort(values, kind="stable")`` for values in ``range(n_values)``.

    numpy radix-sorts 16-bit integers (a plain stable argsort of int64 is a
    merge sort, the largest single cost at 4,096 ranks), so sort by the low
    16 bits, then stably by the high ones.
    """
    if n_values <= 1 << 16:
        return np.argsort(values.astype(np.uint16), kind="stable")
    if n_values <= 1 << 32:
        low = np.argsort((values & 0xFFFF).astype(np.uint16), kind="stable")
        high = (values[low] >> 16).astype(np.uint16)
        return low[np.argsort(high, kind="stable")]
    return np.argsort(values, kind="stable")


def _mixed_keys(item_key: IntArray, occurrences: IntArray, at: IntArray, hashes: list[str]) -> frozenset[int]:
    """Keys whose items do not all carry the same ``value_hash`` (``None`` included)."""
    if not hashes:
        return frozenset()
    hashed_key = item_key[at]
    n_hashed = np.bincount(hashed_key, minlength=len(occurrences))
    # Some items of the key carry a hash and some do not.
    mixed = set(np.flatnonzero((n_hashed > 0) & (n_hashed < occurrences)).tolist())
    distinct: dict[int, str] = {}
    for key_id, value in zip(hashed_key.tolist(), hashes, strict=True):
        if distinct.setdefault(key_id, value) != value:
            mixed.add(key_id)
    return frozenset(mixed)


def apply_owners(plans: Sequence[SavePlan], holdings: Holdings, owner: IntArray) -> list[SavePlan]:
    """New plans keeping each item only where ``owner`` says (``KEEP_ALL``: everywhere)."""
    item_owner = owner[holdings.item_key]
    item_plan = np.repeat(np.arange(len(plans), dtype=np.int64), np.diff(holdings.plan_start))
    kept = np.flatnonzero((item_owner == item_plan) | (item_owner == KEEP_ALL))
    # Only kept items are touched: after dedup a plan keeps a small share.
    bounds = np.searchsorted(kept, holdings.plan_start).tolist()
    starts = holdings.plan_start.tolist()
    result: list[SavePlan] = []
    for pos, plan in enumerate(plans):
        begin, end = bounds[pos], bounds[pos + 1]
        if end - begin == len(plan.items):
            items = list(plan.items)
        else:
            local = (kept[begin:end] - starts[pos]).tolist()
            items = list(map(plan.items.__getitem__, local))
        result.append(dataclasses.replace(plan, items=items))
    return result
