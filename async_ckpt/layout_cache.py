"""Reusing a rank's local plan and staging layout while its state dict keeps its shape.

Building write items and packing buffers for thousands of tensors costs tens
of milliseconds, and it would be paid inside the training loop's stall on
every save. A training loop saves the same structure every time, so the
result is cached under a signature of that structure (keys, shapes, dtypes,
devices, DTensor placements, the container tree) and only the tensors'
current local data and the non-tensor values are taken afresh.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import xxhash

from ._dtensor import dtensor_class
from .format.values import encode_value
from .local_plan import LocalPlan, Pieces, build_local_plan, check_tensor
from .planning import WriteItemType
from .replica_staging import StagedSubsets
from .staging import Layout, make_layout
from .state_dict import Flat

__all__ = ["LayoutCache", "Prepared"]


@dataclass(frozen=True, slots=True)
class Prepared:
    local: LocalPlan
    layout: Layout
    layout_id: str
    """Names (plan, tree) for the worker, which keeps them between saves."""
    tree: Any
    on_cuda: bool
    """Whether any tensor lives on a CUDA device (part of the cache signature)."""
    subset: bool = False
    """``local.tensors`` are only the items this rank writes (replica-sharded staging), not all."""


@dataclass(frozen=True, slots=True)
class _Entry:
    local: LocalPlan
    layout: Layout
    layout_id: str
    tree: Any
    tensor_keys: tuple[tuple[str, tuple[int, ...] | None] | None, ...]
    """Each tensor leaf's item key, None for a DTensor whose mesh excludes this rank."""
    on_cuda: bool
    split: dict[int, Pieces]
    """Tensor leaves (by position) saved as several chunks: each chunk's key and slice."""


class LayoutCache:
    def __init__(self, size: int = 4, split_bytes: int | None = None) -> None:
        """``split_bytes``: tensors larger than this are planned as several chunks (a staging budget)."""
        self._size = size
        self._split_bytes = split_bytes
        self._entries: OrderedDict[tuple[Any, ...], _Entry] = OrderedDict()
        self.hits = 0
        self.subsets = StagedSubsets()
        """What the worker said this rank writes, per layout (``replica_staging.py``)."""
        self.replica_staging = True
        """Private switch (benchmarks, tests): False stages every tensor, as before."""

    def prepare(self, flat: Flat, *, allow_pickle: bool, verify_replicas: bool) -> Prepared:
        prepared = self._prepare_full(flat, allow_pickle=allow_pickle, verify_replicas=verify_replicas)
        if verify_replicas or not self.replica_staging:
            return prepared  # replicas are hashed and compared: every one is staged
        reduced = self.subsets.reduce(prepared.layout_id, prepared.local.tensors)
        if reduced is None:
            return prepared
        tensors, layout = reduced
        local = LocalPlan(plan=prepared.local.plan, tensors=tensors, values=prepared.local.values)
        # Same layout id: the worker keeps the full local plan, which planning needs.
        return Prepared(local, layout, prepared.layout_id, prepared.tree, prepared.on_cuda, subset=True)

    def _prepare_full(self, flat: Flat, *, allow_pickle: bool, verify_replicas: bool) -> Prepared:
        # Keyed by the leaves' signature, then the tree compared as Python objects:
        # 0.1 ms against 1.3 ms to serialise it on every save (2,872 tensors).
        # Plain equality cannot tell dict keys 1, 1.0 and True apart, but their
        # leaves' names ("1", "1.0", "True") are part of the signature.
        try:
            sig = _tensor_signature(flat.entries)
        except Exception:
            # A tensor that cannot describe itself (ShardedTensor, nested): name its key.
            for fqn, v in flat.entries.items():
                if isinstance(v, torch.Tensor):
                    check_tensor(fqn, v)
            raise
        entry = None if verify_replicas else self._entries.get(sig)
        if entry is not None and entry.tree != flat.tree:
            entry = None
        if entry is not None:
            self._entries.move_to_end(sig)
            self.hits += 1
            return Prepared(
                self._refresh(entry, flat, allow_pickle),
                entry.layout,
                entry.layout_id,
                entry.tree,
                entry.on_cuda,
            )
        local = build_local_plan(
            flat.entries,
            allow_pickle=allow_pickle,
            verify_replicas=verify_replicas,
            split_bytes=self._split_bytes,
        )
        layout = make_layout(local.tensors)
        tree_json = json.dumps(flat.tree, separators=(",", ":"))
        layout_id = f"{layout.key}-{xxhash.xxh3_64_hexdigest(tree_json.encode())}"
        planned = {
            it.index.fqn: (it.index.fqn, it.index.offset)
            for it in local.plan.items
            if it.type is not WriteItemType.BYTE_IO
        }
        leaves = [fqn for fqn, v in flat.entries.items() if isinstance(v, torch.Tensor)]
        keys = tuple(planned.get(fqn) for fqn in leaves)
        split = {i: local.pieces[fqn] for i, fqn in enumerate(leaves) if fqn in local.pieces}
        on_cuda = any(t.device.type == "cuda" for t in local.tensors.values())
        self._entries[sig] = _Entry(local, layout, layout_id, flat.tree, keys, on_cuda, split)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return Prepared(local, layout, layout_id, flat.tree, on_cuda)

    @staticmethod
    def _refresh(entry: _Entry, flat: Flat, allow_pickle: bool) -> LocalPlan:
        tensors = [v for v in flat.entries.values() if isinstance(v, torch.Tensor)]
        dt = dtensor_class() or ()
        local_data = {
            key: (t.to_local() if isinstance(t, dt) else t)
            for key, t in zip(entry.tensor_keys, tensors, strict=True)
            if key is not None
        }
        if entry.split:
            local_data = _sliced(local_data, entry)
        values = {
            fqn: encode_value(v, fqn=fqn, allow_pickle=allow_pickle)
            for fqn, v in flat.entries.items()
            if not isinstance(v, torch.Tensor)
        }
        return LocalPlan(plan=entry.local.plan, tensors=local_data, values=values)


def _sliced(local_data: dict[Any, torch.Tensor], entry: _Entry) -> dict[Any, torch.Tensor]:
    """Split tensors as their pieces, in the order the layout was packed in (the copy's fast path)."""
    out: dict[Any, torch.Tensor] = {}
    for i, key in enumerate(entry.tensor_keys):
        if key is None:
            continue
        pieces = entry.split.get(i)
        if pieces is None:
            out[key] = local_data[key]
        else:
            whole = local_data[key]
            for piece, where in pieces:
                out[piece] = whole[where]
    return out


def _tensor_signature(entries: dict[str, Any]) -> tuple[Any, ...]:
    parts: list[Any] = []
    dt = dtensor_class() or ()
    for fqn, v in entries.items():
        if isinstance(v, dt):
            parts.append((fqn, v.shape, v.dtype, v.device, v.placements, id(v.device_mesh)))
        elif isinstance(v, torch.Tensor):
            # Type and layout too: a sparse tensor or a subclass in place of a dense
            # tensor of the same shape must be checked afresh, not staged by the old plan.
            parts.append((fqn, type(v), v.layout, v.shape, v.dtype, v.device))
        else:
            parts.append(fqn)
    return tuple(parts)
