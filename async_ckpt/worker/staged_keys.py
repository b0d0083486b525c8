"""What a save staged against what its rank writes (replica-sharded staging, worker side).

The trainer may have copied only some of its tensors into the slot (those it
wrote last time); the slot's views name them. Planning learns which items of
the full local plan those are, and the trainer learns which it should stage
from now on when that differs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from ..buffer_layout import BufferSpec, make_layout
from ..planning import SavePlan, WriteItemType
from ..save_flow import FileAssignment, RankAssignment

__all__ = ["Key", "file_keys", "plan_keys", "stage_only_keys", "staged_mask", "subset_layout_key"]

Key = tuple[str, tuple[int, ...] | None]


def file_keys(fa: FileAssignment) -> Iterator[Key]:
    """The staging keys of a file's chunks."""
    for fqn, offsets, _ in fa.items:
        yield (fqn, offsets)


def plan_keys(plan: SavePlan) -> frozenset[Key]:
    """The staging keys of every tensor item of ``plan``: what a rank staging everything stages."""
    return frozenset(
        (it.index.fqn, it.index.offset) for it in plan.items if it.type is not WriteItemType.BYTE_IO
    )


def staged_mask(plan: SavePlan, views: Collection[Any]) -> npt.NDArray[np.bool_] | None:
    """Which items of ``plan`` this rank staged; None when all of them (then nothing is sent)."""
    mask = np.fromiter(
        (it.type is WriteItemType.BYTE_IO or (it.index.fqn, it.index.offset) in views for it in plan.items),
        bool,
        len(plan.items),
    )
    return None if bool(mask.all()) else mask


def stage_only_keys(assignment: RankAssignment, views: Collection[Any]) -> tuple[Key, ...] | None:
    """The items to stage from now on, if they are not exactly the ones staged for this save."""
    keys = assignment.preferred
    if keys is None:
        keys = tuple(k for fa in assignment.files for k in file_keys(fa))
    if len(keys) == len(views) and all(k in views for k in keys):
        return None
    return keys


def subset_layout_key(specs: Mapping[Key, BufferSpec], keys: tuple[Key, ...]) -> str | None:
    """The key of the staging layout the trainer will build for ``keys``, if all of them are staged.

    The trainer packs them in the full layout's order, as ``specs`` are; the
    same shapes and dtypes give the same layout key.
    """
    wanted = set(keys)
    if not wanted <= specs.keys():
        return None
    return make_layout({k: v for k, v in specs.items() if k in wanted}).key
