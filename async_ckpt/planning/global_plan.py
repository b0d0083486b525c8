"""Turning every rank's local plan into the plan the ranks actually execute."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .dedup import DEFAULT_ITEM_COST_BYTES, balanced_owners, key_costs
from .holdings import KEEP_ALL, Holdings, apply_owners, collect_holdings
from .staged import StagedMask, constrain_owners, staged_flags
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
    preferred: list[SavePlan] | None = None
    """With ``staged``: the plans had every rank staged everything, where they differ from ``plans``.

    What each rank should stage next time (see :mod:`.staged`).
    """


def create_global_plan(
    local_plans: Sequence[SavePlan],
    *,
    dedup: DedupMode = "balanced",
    item_cost_bytes: int = DEFAULT_ITEM_COST_BYTES,
    staged: Sequence[StagedMask] | None = None,
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

    ``staged`` (one mask per plan, over its items, None for all) says which
    items each rank can write: an item stays with its owner above where that
    owner staged it, else goes to the least loaded holder that did, and
    a :class:`CheckpointError` names an item no holder staged.
    """
    if dedup not in _DEDUP_MODES:
        raise ValueError(f"dedup must be one of {_DEDUP_MODES}, got {dedup!r}")
    if item_cost_bytes < 0:
        raise ValueError(f"item_cost_bytes must be >= 0, got {item_cost_bytes}")
    holdings = collect_holdings(local_plans)
    per_rank_fqns = frozenset(holdings.key(kid)[0] for kid in holdings.mixed_hash)
    keep_all = _keys_of(holdings, per_rank_fqns)
    flags = None if staged is None else staged_flags(holdings, staged)
    if dedup == "none":
        if flags is not None:
            # Plans are taken as they are: each rank writes its own, so it must have staged all of it.
            constrain_owners(holdings, _every_holder(holdings), flags, key_costs(holdings, 0))
        plans = list(local_plans)
        validate_coverage(plans, per_rank_fqns=per_rank_fqns)
        return GlobalPlan(plans=plans, per_rank_fqns=per_rank_fqns)
    if dedup == "lowest_rank":
        owner = _lowest_owners(holdings, keep_all)
    else:
        owner = balanced_owners(holdings, keep_all, item_cost_bytes)
    actual = owner
    if flags is not None:
        actual = constrain_owners(holdings, owner, flags, key_costs(holdings, item_cost_bytes))
    plans = apply_owners(local_plans, holdings, actual)
    validate_coverage(plans, per_rank_fqns=per_rank_fqns)
    preferred = None if actual is owner else apply_owners(local_plans, holdings, owner)
    return GlobalPlan(plans=plans, per_rank_fqns=per_rank_fqns, preferred=preferred)


def _every_holder(holdings: Holdings) -> npt.NDArray[np.int64]:
    """Every item owned by every holder: ``dedup="none"`` keeps each plan whole."""
    return np.full(holdings.n_keys, KEEP_ALL, dtype=np.int64)


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
