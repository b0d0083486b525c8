"""Replica-sharded staging, trainer side: stage only the items this rank writes.

Every data-parallel replica holds the same tensors, and the plan writes each
replicated item once, spread over the ranks. Once a rank's worker knows the
plan of a layout, it tells the trainer (``StageOnly``) which items this rank
writes; the next save of that layout copies only those into a staging layout
of their own (a smaller slot; the full one is evicted and dropped by the
worker too). The worker plans among the ranks that staged each item, and a
save that fails forgets the subset, so the next one stages everything.

The first save of a layout stages everything. With ``verify_replicas`` every
replica is hashed and compared, so everything is staged then too.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import torch

from .staging import Layout, make_layout

__all__ = ["StagedSubsets"]

Key = tuple[str, tuple[int, ...] | None]
_KEPT = 8
"""Layouts whose subset is remembered; as many as the layout cache and the worker keep, and more."""


class StagedSubsets:
    """Per layout id: the tensor items to stage, told by the worker, and their staging layout.

    ``record`` runs on a worker's listener thread, ``reduce`` on the staging
    side: a lock keeps each layout's subset and staging layout together.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subsets: OrderedDict[str, tuple[Key, ...]] = OrderedDict()
        self._layouts: dict[str, tuple[tuple[Key, ...], list[Key], Layout]] = {}
        """Per layout id: its subset as recorded, in the full layout's order, and its staging layout."""

    def record(self, layout_id: str, keys: tuple[Key, ...] | None) -> None:
        """Stage only ``keys`` of this layout from now on; None: everything again."""
        with self._lock:
            if keys is None:
                self._subsets.pop(layout_id, None)
                self._layouts.pop(layout_id, None)
                return
            self._subsets[layout_id] = tuple(keys)
            self._subsets.move_to_end(layout_id)
            while len(self._subsets) > _KEPT:
                old, _ = self._subsets.popitem(last=False)
                self._layouts.pop(old, None)

    def reduce(
        self, layout_id: str, tensors: Mapping[Key, torch.Tensor]
    ) -> tuple[dict[Key, torch.Tensor], Layout] | None:
        """The tensors to stage and their layout, or None to stage all of ``tensors``."""
        with self._lock:
            keys = self._subsets.get(layout_id)
            if keys is None:
                return None
            known = self._layouts.get(layout_id)
        if known is not None and known[0] is keys:
            # The layout id fixes the tensor keys: checked when this entry was made.
            return {k: tensors[k] for k in known[1]}, known[2]
        if len(keys) == len(tensors) or not all(k in tensors for k in keys):
            return None  # everything, or a subset of another layout: stage everything
        wanted = set(keys)
        # In the full layout's order, so the copy loop takes its fast path and the layout key is stable.
        subset = {k: t for k, t in tensors.items() if k in wanted}
        layout = make_layout(subset)
        with self._lock:
            if self._subsets.get(layout_id) is keys:
                self._layouts[layout_id] = (keys, list(subset), layout)
        return subset, layout
