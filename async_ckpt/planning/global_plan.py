"""Turning every rank's local plan into the plan the ranks actually execute."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .dedup import DEFAULT_ITEM_COST_BYTES, balanced_owners
from .holdings import KEEP_ALL, Holdings, apply_owners, collect_holdings
from .types import SavePlan
from .validate import validate_coverage

__all__ = ["DedupMode", "GlobalPlan", "create_global_plan"]

DedupMode = Literal["balanced", "lowest_rank", "none"]
_DEDUP_MODES: tuple[DedupMode, ...] = ("balanced", "lowest_rank", "none")


@dataclass(frozen=True)
class GlobalPlan:
    """The deduplicated, validated plans, one per rank (position = rank).

    ``per_rank_fqns`` names values that differ between the ranks holding them;
    every holder saves its own, and loading must pick a rank's copy.
    """

    plans: list[SavePlan]
    per_rank_fqns: frozenset[str]


def create_global_plan(
    local_plans: Sequence[SavePlan],
    *,
    dedup: DedupMode = "balanced",
    item_cost_bytes: int = DEFAULT_ITEM_COST_BYTES,
) -> GlobalPlan:
    """Deduplicate replicas, keep per-rank values on every holder, validate coverage.

    An fqn is per-rank when its items carry a ``value_hash`` that is not the
    same on every holder.  The other items shared by several ranks are
    replicas and are written once, chosen by ``dedup``:

    * ``"balanced"``: :func:`~.dedup.balanced_dedup`'s placement;
    * ``"lowest_rank"``: the lowest rank holding the item;
    * ``"none"``: plans are kept as given, so they must already be disjoint.

    The result depends only on which rank holds which items.  Raises
    :class:`~.validate.PlanValidationError` when the resulting plans do not
    tile every tensor exactly.
    """
    if dedup not in _DEDUP_MODES:
        raise ValueError(f"dedup must be one of {_DEDUP_MODES}, got {dedup!r}")
    if item_cost_bytes < 0:
        raise ValueError(f"item_cost_bytes must be >= 0, got {item_cost_bytes}")
    holdings = collect_holdings(local_plans)
    per_rank_fqns = frozenset(holdings.key(kid)[0] for kid in holdings.mixed_hash)
    keep_all = _keys_of(holdings, per_rank_fqns)
    if dedup == "none":
        plans = list(local_plans)
    elif dedup == "lowest_rank":
        plans = apply_owners(local_plans, holdings, _lowest_owners(holdings, keep_all))
    else:
        owner = balanced_owners(holdings, keep_all, item_cost_bytes)
        plans = apply_owners(local_plans, holdings, owner)
    validate_coverage(plans, per_rank_fqns=per_rank_fqns)
    return GlobalPlan(plans=plans, per_rank_fqns=per_rank_fqns)


def _keys_of(holdings: Holdings, fqns: frozenset[str]) -> frozenset[int]:
    # A per-rank fqn is kept whole on every holder, all of its keys, not only
    # the keys whose hashes happened to differ.
    if not fqns:
        return frozenset()
    hit = np.fromiter(map(fqns.__contains__, holdings.key_fqns()), bool, holdings.n_keys)
    return frozenset(np.flatnonzero(hit).tolist())


def _lowest_owners(holdings: Holdings, keep_all: frozenset[int]) -> npt.NDArray[np.int64]:
    owner = holdings.holder_ranks[holdings.holder_start[:-1]]
    if keep_all:
        owner[list(keep_all)] = KEEP_ALL
    return owner
