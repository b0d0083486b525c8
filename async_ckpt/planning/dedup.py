"""Deciding which rank writes each item that several ranks hold.

Every rank plans to write everything it holds, so replicated tensors (data
parallel replicas, norms, biases) appear in many local plans.  Deduplication
keeps each such item in exactly one plan.  Three policies live here:

* :func:`dedup_tensors`: keep-first, like DCP's ``dedup_tensors``.
* :func:`dedup_save_plans`: a faithful port of DCP's ``dedup_save_plans``.
* :func:`balanced_dedup`: our default, a deterministic largest-first balance.

At 1024 ranks the coordinator sees millions of items, so all three share one
indexing pass (:func:`collect_holdings`) whose per-item work runs inside C
loops (``map`` over ``attrgetter`` and ``dict.setdefault``) and numpy; the
Python-level loops that follow run once per distinct key, not per item.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import operator
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .types import SavePlan, WriteItem

__all__ = [
    "DEFAULT_ITEM_COST_BYTES",
    "balanced_dedup",
    "dedup_save_plans",
    "dedup_tensors",
]

# Writing an item costs more than its bytes: a file entry, a metadata record,
# a device-to-host copy launch and a Python-level loop iteration.  Measured
# checkpoints with ~1,400 tiny tensors per rank spend real time on those, so
# a rank given all the tiny replicated tensors finishes last even when its
# byte count matches the others'.  64 KiB is roughly what a fast local disk
# or a pinned-memory copy moves in the time that per-item overhead takes.
DEFAULT_ITEM_COST_BYTES = 64 * 1024

# Owner value meaning "every holder keeps its own copy".
KEEP_ALL = -1

Key = tuple[str, tuple[int, ...] | None]
Variant = tuple[str, tuple[int, ...] | None, str | None]
IntArray = npt.NDArray[np.int64]

_variant_of = operator.attrgetter("index.fqn", "index.offset", "value_hash")
_fqn_of_variant = operator.itemgetter(0)
_hash_of_variant = operator.itemgetter(2)
_tensor_data_of = operator.attrgetter("tensor_data")


@dataclass(frozen=True, slots=True)
class Holdings:
    """Who holds what, with keys numbered densely in first-appearance order.

    ``items`` is every plan's items back to back, plan ``p`` owning
    ``items[plan_start[p]:plan_start[p + 1]]``, and ``item_key`` gives each
    one's key id.  Items are first told apart by ``(fqn, offset, value_hash)``
    ("variants"); key ``k`` is the ``(fqn, offset)`` of variant
    ``key_variant[k]``.  The plan positions holding key ``k`` are
    ``holder_ranks[holder_start[k]:holder_start[k + 1]]``, ascending and
    without repeats.  ``first``/``last`` index into ``items`` the key's first
    and last occurrence in plan order.  ``mixed_hash`` holds the keys whose
    ``value_hash`` is not the same on every holder.
    """

    variants: list[Variant]
    key_variant: IntArray
    items: list[WriteItem]
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
        return len(self.key_variant)

    def key(self, key_id: int) -> Key:
        fqn, offset, _ = self.variants[int(self.key_variant[key_id])]
        return fqn, offset

    def key_fqns(self) -> list[str]:
        """The fqn of every key, by key id."""
        return list(map(_fqn_of_variant, map(self.variants.__getitem__, self.key_variant.tolist())))

    def n_holders(self) -> IntArray:
        return np.diff(self.holder_start)

    def first_items(self) -> list[WriteItem]:
        return list(map(self.items.__getitem__, self.first.tolist()))


def collect_holdings(plans: Sequence[SavePlan]) -> Holdings:
    """Index every item of every plan by its ``(fqn, offset)`` key."""
    items = list(itertools.chain.from_iterable(plan.items for plan in plans))
    lengths = np.fromiter((len(plan.items) for plan in plans), np.int64, len(plans))
    plan_start = np.zeros(len(plans) + 1, dtype=np.int64)
    np.cumsum(lengths, out=plan_start[1:])
    n = len(items)

    # One C-level pass over the items, telling them apart by value_hash too,
    # so that replicas that differ show up without a second pass.  setdefault
    # hands back where each variant was first seen, and the dict keeps them
    # in first-appearance order, which numbers them.
    seen: dict[Variant, int] = {}
    seen_at = np.fromiter(map(seen.setdefault, map(_variant_of, items), itertools.count()), np.int64, n)
    variants = list(seen)
    variant_first = np.fromiter(seen.values(), np.int64, len(variants))
    item_variant = np.searchsorted(variant_first, seen_at)
    representative = _merge_variants(seen, variants, variant_first)
    del seen
    is_key = representative == np.arange(len(variants))
    key_variant = np.flatnonzero(is_key)
    variant_key = (np.cumsum(is_key) - 1)[representative]
    item_key = variant_key[item_variant]
    first = variant_first[key_variant]
    n_keys = len(key_variant)
    mixed = np.flatnonzero(np.bincount(variant_key, minlength=n_keys) > 1)

    # Grouping by key (stably, so positions stay ascending) yields holders.
    item_plan = np.repeat(np.arange(len(plans), dtype=np.int64), lengths)
    order = np.argsort(item_key, kind="stable")
    sorted_key = item_key[order]
    sorted_plan = item_plan[order]
    new_pair = np.ones(n, dtype=bool)
    new_pair[1:] = (sorted_key[1:] != sorted_key[:-1]) | (sorted_plan[1:] != sorted_plan[:-1])
    holder_ranks = sorted_plan[new_pair]
    holder_start = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_key[new_pair], minlength=n_keys), out=holder_start[1:])
    occurrences_end = np.cumsum(np.bincount(item_key, minlength=n_keys))
    last = order[occurrences_end - 1]
    return Holdings(
        variants,
        key_variant,
        items,
        plan_start,
        item_key,
        holder_ranks,
        holder_start,
        first,
        last,
        frozenset(mixed.tolist()),
    )


def _merge_variants(seen: dict[Variant, int], variants: list[Variant], variant_first: IntArray) -> IntArray:
    """For each variant, the first variant with the same ``(fqn, offset)``.

    Two variants of one key differ in hash, so at least one has a hash; only
    those (the few non-tensor values, usually) need looking at.  ``seen``
    maps a variant to the item where it first appears, ``variant_first``
    lists those items by variant.
    """
    representative = np.arange(len(variants), dtype=np.int64)
    hashes = map(_hash_of_variant, variants)
    hashed = np.fromiter(map(operator.is_not, hashes, itertools.repeat(None)), bool, len(variants))
    first_of_key: dict[Key, int] = {}
    for v in np.flatnonzero(hashed).tolist():
        fqn, offset, _ = variants[v]
        unhashed_at = seen.get((fqn, offset, None))
        unhashed = None if unhashed_at is None else int(np.searchsorted(variant_first, unhashed_at))
        first = first_of_key.setdefault((fqn, offset), v if unhashed is None else min(v, unhashed))
        representative[v] = first
        if unhashed is not None:
            representative[unhashed] = first
    return representative


def apply_owners(plans: Sequence[SavePlan], holdings: Holdings, owner: IntArray) -> list[SavePlan]:
    """New plans keeping each item only where ``owner`` says (``KEEP_ALL``: everywhere)."""
    item_owner = owner[holdings.item_key]
    item_plan = np.repeat(np.arange(len(plans), dtype=np.int64), np.diff(holdings.plan_start))
    keep = (item_owner == item_plan) | (item_owner == KEEP_ALL)
    result: list[SavePlan] = []
    for pos, plan in enumerate(plans):
        begin, end = int(holdings.plan_start[pos]), int(holdings.plan_start[pos + 1])
        mask = keep[begin:end]
        if mask.all():
            items = list(plan.items)
        else:
            items = list(itertools.compress(plan.items, mask.tolist()))
        result.append(dataclasses.replace(plan, items=items))
    return result


def dedup_tensors(plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Keep each item only in the first (lowest-position) plan that holds it.

    Items are matched by ``MetadataIndex`` equality (fqn and offset).  Input
    plans are not modified.
    """
    holdings = collect_holdings(plans)
    owner = holdings.holder_ranks[holdings.holder_start[:-1]]
    return apply_owners(plans, holdings, owner)


def _dcp_storage_size(item: WriteItem) -> int:
    # DCP sizes an item by its tensor's *global* shape, not its chunk, and
    # counts a non-tensor (or an empty tensor) as one byte; mirrored so that
    # assignments match DCP's exactly.
    data = item.tensor_data
    if data is None:
        return 1
    return math.prod(data.size) * data.dtype.itemsize or 1


def dedup_save_plans(plans: Sequence[SavePlan], save_to_lowest_rank: bool = False) -> list[SavePlan]:
    """Port of ``torch.distributed.checkpoint._dedup_save_plans.dedup_save_plans``.

    Keys are visited in first-appearance order; each is kept only by the holder
    with the fewest bytes assigned so far (or by the lowest holder when
    ``save_to_lowest_rank``).  Everything DCP does is reproduced, quirks
    included, so the two give identical plans:

    * sizes come from the item's global tensor shape, not its chunk, taken
      from the holder seen last; a non-tensor counts as one byte;
    * among holders tied on bytes, DCP's ``min`` over a ``set`` of positions
      picks the first in CPython set iteration order.  That is the lowest
      position when all holders are below the set's table size (always for
      fewer than 8 plans) but not in general, e.g. ``{3, 40}`` iterates 40
      first.  The same set is rebuilt here the same way to keep that order.

    Input plans are not modified.
    """
    holdings = collect_holdings(plans)
    if save_to_lowest_rank:
        owner = holdings.holder_ranks[holdings.holder_start[:-1]]
        return apply_owners(plans, holdings, owner)
    planned = [0] * len(plans)
    owner = np.empty(holdings.n_keys, dtype=np.int64)
    sizes = map(_dcp_storage_size, map(holdings.items.__getitem__, holdings.last.tolist()))
    starts = holdings.holder_start.tolist()
    ranks = holdings.holder_ranks.tolist()
    for key_id, size in enumerate(sizes):
        begin, end = starts[key_id], starts[key_id + 1]
        if end - begin == 1:
            chosen = ranks[begin]
        else:
            as_dcp_set: set[int] = set()
            for pos in ranks[begin:end]:
                as_dcp_set.add(pos)
            chosen = min(as_dcp_set, key=planned.__getitem__)
        planned[chosen] += size
        owner[key_id] = chosen
    return apply_owners(plans, holdings, owner)


def _chunk_bytes(items: list[WriteItem]) -> IntArray:
    """Bytes each item's chunk occupies; non-tensors count zero."""
    out = np.zeros(len(items), dtype=np.int64)
    datas = list(map(_tensor_data_of, items))
    tensor = np.flatnonzero(
        np.fromiter(map(operator.is_not, datas, itertools.repeat(None)), bool, len(datas))
    ).tolist()
    if tensor:
        present = list(map(datas.__getitem__, tensor))
        numel = map(math.prod, map(operator.attrgetter("chunk.sizes"), present))
        itemsize = map(operator.attrgetter("properties.dtype.itemsize"), present)
        out[tensor] = np.fromiter(map(operator.mul, numel, itemsize), np.int64, len(tensor))
    return out


def balanced_owners(holdings: Holdings, keep_all: Collection[int], item_cost_bytes: int) -> IntArray:
    """Choose an owner per key: largest duplicated items first, least-loaded holder.

    Keys in ``keep_all`` are written by every holder.  The choice depends only
    on which positions hold which items, never on the order items arrive in.
    """
    n_keys = holdings.n_keys
    n_holders = holdings.n_holders()
    fixed = n_holders == 1
    if keep_all:
        fixed[list(keep_all)] = True
    first_items = holdings.first_items()
    cost = _chunk_bytes(first_items) + item_cost_bytes

    # Fixed work goes in first so that duplicated items fill around it.
    holder_key = np.repeat(np.arange(n_keys, dtype=np.int64), n_holders)
    fixed_holding = fixed[holder_key]
    load_array = np.zeros(holdings.n_plans, dtype=np.int64)
    np.add.at(load_array, holdings.holder_ranks[fixed_holding], cost[holder_key[fixed_holding]])
    load: list[int] = load_array.tolist()

    owner = np.full(n_keys, KEEP_ALL, dtype=np.int64)
    single = np.flatnonzero(n_holders == 1)
    owner[single] = holdings.holder_ranks[holdings.holder_start[single]]
    costs: list[int] = cost.tolist()
    placing = []
    for k in np.flatnonzero(~fixed).tolist():
        fqn, offset = holdings.key(k)
        # Largest first; ties by fqn then offset (a non-tensor's None first).
        placing.append((-costs[k], fqn, offset is not None, offset or (), k))
    placing.sort()
    _place(holdings, [entry[-1] for entry in placing], costs, load, owner)
    return owner


def _place(holdings: Holdings, order: list[int], cost: list[int], load: list[int], owner: IntArray) -> None:
    """Put each key in ``order`` on its least-loaded holder, ties to the lowest rank.

    Keys with the same holders (the replicas of one tp shard, or every rank
    for a fully replicated tensor) share a heap of ``(load, rank)`` entries,
    so a placement costs O(log holders) instead of a scan.  A placement in
    another group can raise a rank's load behind a heap's back; such stale
    entries are only ever too low, so a popped entry is checked against
    ``load`` and pushed back corrected when stale (lazy deletion).
    """
    heaps: dict[bytes, list[tuple[int, int]]] = {}
    starts = holdings.holder_start
    for key_id in order:
        ranks = holdings.holder_ranks[starts[key_id] : starts[key_id + 1]]
        group = ranks.tobytes()
        heap = heaps.get(group)
        if heap is None:
            heap = heaps[group] = [(load[r], r) for r in ranks.tolist()]
            heapq.heapify(heap)
        while True:
            entry_load, chosen = heap[0]
            if entry_load == load[chosen]:
                break
            heapq.heapreplace(heap, (load[chosen], chosen))
        load[chosen] += cost[key_id]
        heapq.heapreplace(heap, (load[chosen], chosen))
        owner[key_id] = chosen


def balanced_dedup(
    plans: Sequence[SavePlan], *, item_cost_bytes: int = DEFAULT_ITEM_COST_BYTES
) -> list[SavePlan]:
    """Deduplicate so each rank's write cost (bytes plus per-item cost) is balanced.

    Plan position is the rank.  An item only one rank holds stays there.  Items
    held by several ranks are placed largest first (ties by fqn, then offset),
    each on the holder with the smallest cost so far, ties to the lowest rank;
    cost is ``bytes + item_cost_bytes * items``.  Items whose ``value_hash``
    differs between holders are not replicas and every holder keeps its own.

    The result depends only on which rank holds which items, not on item
    order.  Input plans are not modified.
    """
    if item_cost_bytes < 0:
        raise ValueError(f"item_cost_bytes must be >= 0, got {item_cost_bytes}")
    holdings = collect_holdings(plans)
    owner = balanced_owners(holdings, holdings.mixed_hash, item_cost_bytes)
    return apply_owners(plans, holdings, owner)
