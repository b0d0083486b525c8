"""Deciding which rank writes each item that several ranks hold.

Every rank plans to write everything it holds, so replicated tensors (data
parallel replicas, norms, biases) appear in many local plans.  Deduplication
keeps each such item in exactly one plan.  Three policies live here:

* :func:`dedup_tensors`: keep-first, like DCP's ``dedup_tensors``.
* :func:`dedup_save_plans`: a faithful port of DCP's ``dedup_save_plans``.
* :func:`balanced_dedup`: our default, a deterministic largest-first balance.

All three share one pass over the plans (:func:`collect_holdings`) that gives
every distinct ``(fqn, offset)`` key a small integer id; later steps work on
those ids so no hot loop hashes a ``MetadataIndex`` object.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
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


@dataclass(frozen=True, slots=True)
class Holdings:
    """Who holds what, indexed by a dense key id (first-appearance order).

    ``holders[k]`` lists, ascending and without repeats, the plan positions
    holding key ``k``; ``first[k]``/``last[k]`` are the items seen first and last
    in plan order; ``mixed_hash`` holds the ids whose ``value_hash`` is not the
    same across all holders; ``plan_key_ids[p]`` gives each item of plan ``p``
    its key id, in item order.
    """

    keys: list[Key]
    holders: list[list[int]]
    first: list[WriteItem]
    last: list[WriteItem]
    mixed_hash: frozenset[int]
    plan_key_ids: list[npt.NDArray[np.int64]]


def collect_holdings(plans: Sequence[SavePlan]) -> Holdings:
    """Index every item of every plan by its ``(fqn, offset)`` key in one pass."""
    ids: dict[Key, int] = {}
    keys: list[Key] = []
    holders: list[list[int]] = []
    first: list[WriteItem] = []
    last: list[WriteItem] = []
    mixed: set[int] = set()
    plan_key_ids: list[npt.NDArray[np.int64]] = []
    # This loop runs once per item of every rank (millions at scale), so it
    # is written for CPython speed: locals only, one dict probe per item.
    for pos, plan in enumerate(plans):
        row: list[int] = []
        append = row.append
        for item in plan.items:
            index = item.index
            key = (index.fqn, index.offset)
            kid = ids.get(key)
            if kid is None:
                kid = ids[key] = len(keys)
                keys.append(key)
                holders.append([pos])
                first.append(item)
                last.append(item)
            else:
                held_by = holders[kid]
                if held_by[-1] != pos:
                    held_by.append(pos)
                if item.value_hash != first[kid].value_hash:
                    mixed.add(kid)
                last[kid] = item
            append(kid)
        plan_key_ids.append(np.array(row, dtype=np.int64))
    return Holdings(keys, holders, first, last, frozenset(mixed), plan_key_ids)


def apply_owners(
    plans: Sequence[SavePlan], holdings: Holdings, owner: npt.NDArray[np.int64]
) -> list[SavePlan]:
    """New plans keeping each item only where ``owner`` says (``KEEP_ALL``: everywhere)."""
    result: list[SavePlan] = []
    for pos, plan in enumerate(plans):
        owners = owner[holdings.plan_key_ids[pos]]
        keep = (owners == pos) | (owners == KEEP_ALL)
        if keep.all():
            items = list(plan.items)
        else:
            items = list(itertools.compress(plan.items, keep.tolist()))
        result.append(dataclasses.replace(plan, items=items))
    return result


def dedup_tensors(plans: Sequence[SavePlan]) -> list[SavePlan]:
    """Keep each item only in the first (lowest-position) plan that holds it.

    Items are matched by ``MetadataIndex`` equality (fqn and offset).  Input
    plans are not modified.
    """
    holdings = collect_holdings(plans)
    owner = np.fromiter(
        (held_by[0] for held_by in holdings.holders),
        dtype=np.int64,
        count=len(holdings.holders),
    )
    return apply_owners(plans, holdings, owner)


def _dcp_storage_size(item: WriteItem) -> int:
    # DCP sizes an item by its tensor's *global* shape, not its chunk, and
    # counts a non-tensor (or an empty tensor) as one byte; mirrored so that
    # assignments match DCP's exactly.
    data = item.tensor_data
    if data is None:
        return 1
    numel = 1
    for dim in data.size:
        numel *= dim
    return numel * data.dtype.itemsize or 1


def dedup_save_plans(
    plans: Sequence[SavePlan], save_to_lowest_rank: bool = False
) -> list[SavePlan]:
    """Port of ``torch.distributed.checkpoint._dedup_save_plans.dedup_save_plans``.

    Keys are visited in first-appearance order; each is kept only by the holder
    with the fewest bytes assigned so far (or by the lowest holder when
    ``save_to_lowest_rank``).  Everything DCP does is reproduced, quirks
    included, so the two give identical plans:

    * sizes come from the item's global tensor shape, and from the holder seen
      last; a non-tensor counts as one byte;
    * among holders tied on bytes, DCP's ``min`` over a ``set`` of positions
      picks the first in CPython set iteration order.  That is the lowest
      position when all holders are below the set's table size (always for
      fewer than 8 plans) but not in general, e.g. ``{3, 40}`` iterates 40
      first.  The same set is rebuilt here the same way to keep that order.

    Input plans are not modified.
    """
    holdings = collect_holdings(plans)
    planned = [0] * len(plans)
    owner = np.empty(len(holdings.keys), dtype=np.int64)
    for kid, held_by in enumerate(holdings.holders):
        if len(held_by) == 1 or save_to_lowest_rank:
            chosen = held_by[0]
        else:
            as_dcp_set: set[int] = set()
            for pos in held_by:
                as_dcp_set.add(pos)
            chosen = min(as_dcp_set, key=planned.__getitem__)
        planned[chosen] += _dcp_storage_size(holdings.last[kid])
        owner[kid] = chosen
    return apply_owners(plans, holdings, owner)


def item_bytes(item: WriteItem) -> int:
    """Bytes a chunk occupies; non-tensors count as zero (only their item cost)."""
    return item.tensor_storage_size() or 0


def balanced_owners(
    holdings: Holdings,
    n_plans: int,
    keep_all: Collection[int],
    item_cost_bytes: int,
) -> npt.NDArray[np.int64]:
    """Choose an owner per key id: largest duplicated items first, least-loaded holder.

    Keys in ``keep_all`` are written by every holder.  The choice depends only
    on which positions hold which items, never on the order items arrive in.
    """
    owner = np.empty(len(holdings.keys), dtype=np.int64)
    load = [0] * n_plans
    duplicated: list[tuple[int, str, bool, tuple[int, ...], int]] = []
    # Fixed work goes in first so that duplicated items fill around it.
    for kid, held_by in enumerate(holdings.holders):
        single = len(held_by) == 1
        if single or kid in keep_all:
            cost = item_bytes(holdings.first[kid]) + item_cost_bytes
            for pos in held_by:
                load[pos] += cost
            owner[kid] = held_by[0] if single else KEEP_ALL
        else:
            fqn, offset = holdings.keys[kid]
            size = item_bytes(holdings.first[kid])
            # A total order on distinct keys: offset None (non-tensor) sorts first.
            duplicated.append((-size, fqn, offset is not None, offset or (), kid))
    duplicated.sort()

    # Fully replicated items (the common case for norms and biases) pick from
    # a heap of (load, rank) instead of scanning every rank.  Partially held
    # items raise loads behind the heap's back; such stale entries are only
    # ever too low, so popping re-checks and re-pushes them (lazy deletion).
    heap = [(load[pos], pos) for pos in range(n_plans)]
    heapq.heapify(heap)

    for neg_size, _fqn, _has_offset, _offset, kid in duplicated:
        cost = item_cost_bytes - neg_size
        held_by = holdings.holders[kid]
        if len(held_by) == n_plans:
            while True:
                entry_load, chosen = heap[0]
                if entry_load == load[chosen]:
                    break
                heapq.heapreplace(heap, (load[chosen], chosen))
            load[chosen] += cost
            heapq.heapreplace(heap, (load[chosen], chosen))
        else:
            # held_by is ascending, so min keeps the lowest rank on ties.
            chosen = min(held_by, key=load.__getitem__)
            load[chosen] += cost
        owner[kid] = chosen
    return owner


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
    owner = balanced_owners(holdings, len(plans), holdings.mixed_hash, item_cost_bytes)
    return apply_owners(plans, holdings, owner)
