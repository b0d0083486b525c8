"""Loading without a target: a checkpoint read back as a new nested state dict.

The saved container tree (``metadata.json``'s ``tree``, or DCP's translated
one) is rebuilt: dicts, lists and tuples as saved, namedtuples as a
namedtuple of the saved field names (the class itself is not in the file),
values decoded, and every tensor whole (all its saved chunks, from however
many ranks, assembled into one plain tensor). ``keys`` selects leaves by
flattened key or key prefix; only the chunks of selected tensors are read.

:func:`open_any` holds one checkpoint for reading, ours or DCP's; the
conversions read through it as well.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ._tree import MAX_DEPTH, children, is_numpy_leaf, make_dict, node_parts, tensor_to_numpy
from .dist import Comm, run_collectively
from .errors import CheckpointError, CheckpointReplacedError, CorruptCheckpointError
from .format.metadata import Metadata
from .format.values import PickleRefusedError, decode_value
from .interop import is_dcp_checkpoint
from .interop.dcp_metadata import read_dcp
from .interop.dcp_storage import DcpSource
from .load_metadata import check_same_save, decode_checked
from .load_plan import plan_reads
from .planning import ChunkStorageMetadata
from .read_ops import Read, execute_reads, open_source, replaced_as_such
from .storage.base import CheckpointSource, Storage

__all__ = ["Opened", "load_tree_collective", "open_any", "select"]

_SKIP = object()


@dataclass(frozen=True, slots=True)
class Opened:
    """One checkpoint held for reading: its metadata and where its chunk bytes come from."""

    md: Metadata
    source: CheckpointSource
    reads_via: Any
    """What ``execute_reads`` takes as its storage (it asks it for ``read_threads``)."""
    dcp: bool
    """A DCP checkpoint: no checksums, and ``needs_pickle`` keys hold unread objects."""
    needs_pickle: frozenset[str] = frozenset()

    def refuse_pickled(self, fqn: str, location: str) -> None:
        """DCP values that only full unpickling rebuilds, and the caller did not allow it."""
        if fqn in self.needs_pickle:
            raise PickleRefusedError(
                f"key '{fqn}' in DCP checkpoint {location} holds objects that only full unpickling "
                "rebuilds, and unpickling runs code from the file. Pass allow_pickle=True only if "
                "you trust this checkpoint."
            )

    def decode(self, fqn: str, encoded: Any, allow_pickle: bool, location: str) -> Any:
        if self.dcp:
            self.refuse_pickled(fqn, location)
            # Pickles left in a DCP read model were made in memory from objects that
            # weights_only loading (or the caller's allow_pickle) accepted.
            allow_pickle = True
        return decode_value(encoded, fqn=fqn, allow_pickle=allow_pickle)


@contextmanager
def open_any(storage: Storage, location: str, *, allow_pickle: bool = False) -> Iterator[Opened]:
    """Hold the checkpoint at ``location``, ours or a DCP one, for the ``with`` block."""
    try:
        source, md = open_source(storage, location, lambda raw: decode_checked(raw, location))
    except CheckpointError as exc:
        if isinstance(exc, CorruptCheckpointError) or not is_dcp_checkpoint(storage, location):
            raise
        source = None  # a DCP checkpoint: read below, outside the handler
    if source is None:
        ckpt = read_dcp(storage, location, allow_pickle=allow_pickle)
        with DcpSource(storage, location, ckpt) as chunks:
            yield Opened(ckpt.md, chunks, chunks, True, ckpt.needs_pickle)  # type: ignore[arg-type]
        return
    try:
        yield Opened(md, source, storage, False)
    finally:
        source.close()


def select(keys: Sequence[str] | None) -> Callable[[str], bool]:
    """Whether a flattened key is ``keys``' own or lies under one of them."""
    if keys is None:
        return lambda fqn: True
    wanted = tuple(keys)
    return lambda fqn: any(fqn == k or fqn.startswith(k + ".") for k in wanted)


def load_tree_collective(
    comm: Comm,
    storage: Storage,
    location: str,
    *,
    keys: Sequence[str] | None,
    map_location: str | torch.device,
    allow_pickle: bool,
    verify: bool,
) -> dict[Any, Any]:
    """Every rank reads the selected part of the checkpoint whole; a failure on one fails all."""
    if isinstance(keys, str):
        raise TypeError(f"keys must be a list of keys, not one string (did you mean keys=[{keys!r}]?)")
    device = torch.device(map_location)

    def once() -> dict[Any, Any]:
        def read() -> tuple[dict[Any, Any], Metadata]:
            with open_any(storage, location, allow_pickle=allow_pickle) as opened:
                tree = _Reader(opened, location, comm, select(keys), allow_pickle).run(keys, verify)
                return tree, opened.md

        tree, md = run_collectively(comm, "load", read)
        check_same_save(comm, md, location)
        return tree

    try:
        tree = once()
    except CheckpointReplacedError:
        if comm.world_size > 1:
            raise  # one rank's retry would leave the others behind
        tree = once()
    if device.type != "cpu":
        tree = _move(tree, device)
    return tree


class _Reader:
    def __init__(
        self, opened: Opened, location: str, comm: Comm, wanted: Callable[[str], bool], allow_pickle: bool
    ) -> None:
        self.opened, self.md, self.location = opened, opened.md, location
        self.rank, self.world = comm.rank, comm.world_size
        self.wanted, self.allow_pickle = wanted, allow_pickle
        self.reads: list[Read] = []
        self.seen: set[str] = set()
        self.matched: set[str] = set()

    def run(self, keys: Sequence[str] | None, verify: bool) -> dict[Any, Any]:
        result = self._node(self.md.tree, "", 0)
        out: dict[Any, Any] = result if isinstance(result, dict) else {}
        for fqn in [*self.md.tensors, *self.md.values]:
            if fqn not in self.seen and self.wanted(fqn):
                # Saved only by ranks whose tree is not the one stored: kept under its flat key.
                value = self._leaf(fqn, fqn)
                if value is not _SKIP:
                    out[fqn] = value
        for key in keys or ():
            if not any(m == key or m.startswith(key + ".") for m in self.matched):
                raise CheckpointError(f"key '{key}' is not in checkpoint {self.location}")
        with replaced_as_such(self.opened.source, self.location):
            execute_reads(
                self.reads,
                self.opened.reads_via,
                self.location,
                self.md,
                verify and not self.opened.dcp,
                source=self.opened.source,
            )
        return out

    def _node(self, node: Any, fqn: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(f"{self.location}: saved tree nested over {MAX_DEPTH} levels")
        kind, body = node_parts(node)
        if kind == "x":
            value = self._leaf(fqn, body)
            if is_numpy_leaf(node) and isinstance(value, torch.Tensor):
                return tensor_to_numpy(value, body, self.location)  # shares memory: reads fill it
            return value
        if kind == "?":
            raise CorruptCheckpointError(f"{self.location}: key '{fqn}': malformed saved tree node")
        kids = [(key, self._node(child, cfqn, depth + 1)) for key, cfqn, child in children(kind, body, fqn)]
        if all(v is _SKIP for _, v in kids) and (kids or not self.wanted(fqn)):
            return _SKIP
        self.matched.add(fqn)
        if kind == "d":
            return make_dict(node, ((k, v) for k, v in kids if v is not _SKIP))
        # A list or tuple keeps the positions of items left out (None), so indices stay true.
        items = [None if v is _SKIP else v for _, v in kids]
        if kind == "l":
            return items
        if kind == "n":
            return _namedtuple(tuple(str(k) for k, _ in kids))._make(items)
        return tuple(items)

    def _leaf(self, path: str, fqn: str) -> Any:
        self.seen.add(fqn)
        if not (self.wanted(path) or self.wanted(fqn)):
            return _SKIP
        self.matched.update((path, fqn))
        md = self.md
        if fqn in md.tensors:
            rec = md.tensors[fqn]
            if rec.per_rank and not self._own_copy(fqn, {c.rank for c in rec.chunks}):
                return _SKIP
            out = torch.empty(rec.shape, dtype=rec.dtype)
            whole = ChunkStorageMetadata((0,) * len(rec.shape), rec.shape)
            self.reads.extend(plan_reads(fqn, rec, whole, out, self.rank))
            return out
        if fqn in md.values:
            rec_v = md.values[fqn]
            encoded = rec_v.value
            if rec_v.per_rank is not None:
                holders: set[int | None] = {r for r, e in enumerate(rec_v.per_rank) if not _absent(e)}
                if not self._own_copy(fqn, holders):
                    return _SKIP
                encoded = rec_v.per_rank[self.rank]
            return self.opened.decode(fqn, encoded, self.allow_pickle, self.location)
        raise CorruptCheckpointError(
            f"{self.location}: the tree names '{fqn}', which is neither a tensor nor a value"
        )

    def _own_copy(self, fqn: str, holders: set[int | None]) -> bool:
        if self.world != self.md.world_size:
            raise CheckpointError(
                f"key '{fqn}' in {self.location} holds a different value on each of the "
                f"{self.md.world_size} ranks that saved it; load it with that world size (now "
                f"{self.world}), or leave it out with keys="
            )
        return self.rank in holders


def _absent(encoded: Any) -> bool:
    return isinstance(encoded, dict) and encoded.get("$absent") is True


@lru_cache(maxsize=256)
def _namedtuple(fields: tuple[str, ...]) -> Any:
    # One class per field list, so two items saved from one namedtuple type share a type.
    return collections.namedtuple("SavedNamedTuple", fields, rename=True)


def _move(node: Any, device: torch.device) -> Any:
    if isinstance(node, torch.Tensor):
        return node.to(device)
    if isinstance(node, dict):
        moved = ((k, _move(v, device)) for k, v in node.items())
        if isinstance(node, collections.defaultdict):
            return collections.defaultdict(node.default_factory, moved)
        return collections.OrderedDict(moved) if isinstance(node, collections.OrderedDict) else dict(moved)
    if isinstance(node, list):
        return [_move(v, device) for v in node]
    if isinstance(node, tuple) and type(node) is not torch.Size:
        items = [_move(v, device) for v in node]
        make = getattr(type(node), "_make", None)
        return make(items) if make is not None else tuple(items)
    return node
