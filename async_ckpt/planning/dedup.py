"""Deciding which rank writes each item that several ranks hold.

Every rank plans to write everything it holds, so replicated tensors (data
parallel replicas, norms, biases) appear in many local plans.  Deduplication
keeps each such item in exactly one plan.  Three policies live here:

* :func:`dedup_tensors`: keep-first, like DCP's ``dedup_tensors``.
* :func:`dedup_save_plans`: a faithful port of DCP's ``dedup_save_plans``.
* :func:`balanced_dedup`: our default, a deterministic largest-first balance.

At 4,096 ranks the coordinator sees millions of items, so all three share one
indexing pass (:func:`~.holdings.collect_holdings`) and one way of cutting
plans down (:func:`~.holdings.apply_owners`); the Python-level loops here run
once per distinct key, not per item.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from collections.abc import Collection, Sequence

import numpy as np
import numpy.typing as npt

from .holdings import KEEP_ALL, Holdings, apply_owners, collect_holdings
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

IntArray = npt.NDArray[np.int64]

_tensor_data_of = operator.attrgetter("tensor_data")


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
    return math.prod(data.size) * data.properties.itemsize or 1


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
    sizes = map(_dcp_storage_size, holdings.items_at(holdings.last))
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
        itemsize = map(operator.attrgetter("properties.itemsize"), present)
        out[tensor] = np.fromiter(map(operator.mul, numel, itemsize), np.int64, len(tensor))
    return out


def key_costs(holdings: Holdings, item_cost_bytes: int) -> IntArray:
    """Each key's write cost: its chunk's bytes plus ``item_cost_bytes``."""
    cost: IntArray = _chunk_bytes(holdings.first_items()) + item_cost_bytes
    return cost


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
    cost = key_costs(holdings, item_cost_bytes)

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
