"""Owners among the ranks that staged an item (replica-sharded staging).

A background save copies into host memory only the items its rank wrote in
the last plan; the worker may write only what was copied. Each rank sends,
with its full local plan, a mask of the items it staged. The unconstrained
owner (the balanced choice over every holder) is kept wherever that owner
staged the item, so ranks that staged their previous share, or everything,
get the same plan as before, and a rank staging an old share and another
staging its new one still agree. Only an item whose owner did not stage it
moves, to the least loaded holder that did; none did is an error naming it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from ..errors import CheckpointError
from .holdings import KEEP_ALL, Holdings
from .types import WriteItemType

__all__ = ["StagedMask", "constrain_owners", "staged_flags"]

StagedMask = Sequence[bool] | npt.NDArray[np.bool_] | None
"""Per plan: whether each of its items is staged (None: all of them)."""

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


def staged_flags(holdings: Holdings, staged: Sequence[StagedMask]) -> BoolArray:
    """One flag per flat item: it may be written by its plan's rank (non-tensors always may)."""
    if len(staged) != holdings.n_plans:
        raise ValueError(f"staged has {len(staged)} masks for {holdings.n_plans} plans")
    parts: list[BoolArray] = []
    for rank, (plan, mask) in enumerate(zip(holdings.plans, staged, strict=True)):
        n = len(plan.items)
        if mask is None:
            parts.append(np.ones(n, dtype=bool))
            continue
        arr = np.asarray(mask, dtype=bool)
        if arr.shape != (n,):
            raise ValueError(f"the staged mask of rank {rank} has {arr.size} entries for {n} items")
        parts.append(arr)
    flags = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
    # Non-tensor values travel with the save request, never through staging.
    is_value = np.fromiter(
        (it.type is WriteItemType.BYTE_IO for it in holdings.first_items()), bool, holdings.n_keys
    )
    result: BoolArray = flags | is_value[holdings.item_key]
    return result


def constrain_owners(holdings: Holdings, owner: IntArray, flags: BoolArray, cost: IntArray) -> IntArray:
    """``owner`` with every item moved off a rank that did not stage it; raises if nobody did.

    ``cost`` is each key's write cost, for choosing among the stagers.
    """
    lengths = np.diff(holdings.plan_start)
    item_plan = np.repeat(np.arange(holdings.n_plans, dtype=np.int64), lengths)
    item_owner = owner[holdings.item_key]
    n_staged = np.bincount(holdings.item_key[flags], minlength=holdings.n_keys)
    nobody = np.flatnonzero(n_staged == 0)
    if len(nobody):
        _raise_unstaged(holdings, int(nobody[0]), "no rank holding it staged it")
    keep_all_gap = (item_owner == KEEP_ALL) & ~flags
    if keep_all_gap.any():
        k = int(holdings.item_key[np.flatnonzero(keep_all_gap)[0]])
        _raise_unstaged(holdings, k, "every holder writes its own copy of it")
    unstaged_owner = (item_owner == item_plan) & ~flags
    if not unstaged_owner.any():
        return owner
    moving = np.unique(holdings.item_key[unstaged_owner])
    out = owner.copy()
    out[moving] = KEEP_ALL - 1  # placeholder: not counted as anyone's load below
    placed = out >= 0
    load = np.bincount(out[placed], weights=cost[placed], minlength=holdings.n_plans).tolist()
    in_moving = np.isin(holdings.item_key, moving) & flags
    stagers: dict[int, list[int]] = {}
    for k, r in zip(holdings.item_key[in_moving].tolist(), item_plan[in_moving].tolist(), strict=True):
        stagers.setdefault(k, []).append(r)
    costs = cost.tolist()
    for k in sorted(moving.tolist(), key=lambda k: (-costs[k], k)):
        chosen = min(stagers[k], key=lambda r: (load[r], r))
        load[chosen] += costs[k]
        out[k] = chosen
    return out


def _raise_unstaged(holdings: Holdings, key_id: int, why: str) -> None:
    fqn, offset = holdings.key(key_id)
    ranks = holdings.holder_ranks[holdings.holder_start[key_id] : holdings.holder_start[key_id + 1]]
    where = f"{fqn!r}" if not offset or not any(offset) else f"{fqn!r} at offsets {offset}"
    raise CheckpointError(
        f"tensor {where} cannot be saved: {why} (held by ranks {ranks.tolist()}). Replica-sharded "
        "staging copies only the items each rank wrote last time; the ranks' state dicts changed "
        "differently since. The next save stages everything again"
    )
