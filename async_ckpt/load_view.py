"""A load target seen as leaves by fqn, and how to put loaded values back in place.

Building the view walks the target once and changes nothing in it: every
container is mirrored by a node, and new values are recorded with :meth:`set`.
Only :meth:`finish`, once every rank knows the load succeeded, writes them
back: dicts and lists in place, tuples and namedtuples rebuilt (as their own
type), ``Stateful`` entries left where they are, and then each ``Stateful``
gets ``load_state_dict`` with its refilled state dict.

``Stateful`` objects are called in one order on every rank, since their
methods may run collectives: ``state_dict()`` in sorted key order, round by
round (those inside another one's state dict in the next round), and
``load_state_dict()`` in reverse rounds, sorted within each (children before
the object holding them). A ``Stateful`` that is not an ``nn.Module`` may lack
saved parts (a fresh optimizer has no per-parameter state): they are rebuilt
from the saved tree. A module takes exactly the keys it has, so extra saved
keys under it are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._dtensor import is_dtensor
from ._tree import (
    MAX_DEPTH,
    children,
    index_tree,
    is_stateful,
    join,
    make_dict,
    namedtuple_fields,
    node_parts,
    plain_sequence,
)
from .errors import CheckpointError, CorruptCheckpointError

__all__ = ["LoadView", "assemble_saved", "is_missing"]

_PLAIN = (bool, int, float, str, bytes)


class _Missing:
    """Placeholder for a leaf the target lacks and the checkpoint provides."""

    __slots__ = ("fqn",)

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn


def is_missing(value: object) -> bool:
    return isinstance(value, _Missing)


class _Leaf:
    __slots__ = ("fqn", "value")

    def __init__(self, fqn: str, value: Any) -> None:
        self.fqn = fqn
        self.value = value


class _Dict:
    __slots__ = ("fqn", "fresh", "grafts", "kids", "obj")

    def __init__(
        self, obj: dict[Any, Any], kids: list[tuple[Any, Any]], fqn: str, fresh: bool = False
    ) -> None:
        self.obj = obj
        self.kids = kids
        self.fqn = fqn
        self.fresh = fresh
        self.grafts: list[tuple[Any, Any]] = []


class _Seq:
    """A list (filled in place) or a tuple / namedtuple (rebuilt as ``cls``)."""

    __slots__ = ("cls", "fields", "fqn", "fresh", "kids", "obj")

    def __init__(self, obj: Any, kids: list[Any], fqn: str, cls: Any = None, fresh: bool = False) -> None:
        self.obj = obj
        self.kids = kids
        self.fqn = fqn
        self.cls = cls
        self.fields = namedtuple_fields(obj)
        self.fresh = fresh


class _Keep:
    """A Stateful (or anything else) that stays where it is."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj


class _StatefulEntry:
    __slots__ = ("fqn", "node", "obj", "sub")

    def __init__(self, obj: Any, sub: Any, fqn: str, node: Any) -> None:
        self.obj = obj
        self.sub = sub
        self.fqn = fqn
        self.node = node


class LoadView:
    """The target's leaves by fqn (:attr:`leaves`), and their new values once set."""

    def __init__(self, root: dict[str, Any], saved_tree: Any = None) -> None:
        if not isinstance(root, dict):
            raise TypeError(f"state_dict must be a dict, got {type(root).__qualname__}")
        self.leaves: dict[str, Any] = {}
        self._updates: dict[str, Any] = {}
        self._materialized: set[str] = set()
        self._graftable: list[_Dict] = []
        self._namedtuples: list[_Seq] = []
        self._meta: dict[tuple[Any, ...], str] = {}
        self._ties: dict[str, str] = {}
        self._pending: list[tuple[str, Any, int]] = []
        self._rounds: list[list[_StatefulEntry]] = []
        self._index: dict[str, Any] = {}
        self._root = self._walk(root, "", graft=False, depth=0)
        while self._pending:
            batch = sorted(self._pending, key=lambda p: p[0])
            self._pending.clear()
            entries = []
            for fqn, obj, depth in batch:
                sub = obj.state_dict()
                node = self._walk(sub, fqn, graft=not isinstance(obj, torch.nn.Module), depth=depth + 1)
                entries.append(_StatefulEntry(obj, sub, fqn, node))
            self._rounds.append(entries)
        self._target_leaves = dict(self.leaves)
        if saved_tree is not None:
            self.bind(saved_tree)

    # ------------------------------------------------------------ public

    def bind(self, saved_tree: Any) -> None:
        """Match the view with a checkpoint's tree (again: a retry may bring another one)."""
        self._updates.clear()
        self._materialized.clear()
        self.leaves = dict(self._target_leaves)
        self._index = index_tree(saved_tree)
        for seq in self._namedtuples:
            kind, body = node_parts(self._index.get(seq.fqn))
            saved = [p[0] for p in body if isinstance(p, list) and len(p) == 2] if kind == "n" else None
            if saved is not None and tuple(saved) != seq.fields:
                raise CheckpointError(
                    f"key '{seq.fqn}': the checkpoint holds a namedtuple with fields {saved}, the "
                    f"target a {type(seq.obj).__qualname__} with fields {list(seq.fields or ())}"
                )
        for node in self._graftable:
            node.grafts = self._grafts(node)

    def saved_node(self, fqn: str) -> Any:
        """The saved tree's node at ``fqn`` (None if it has none)."""
        return self._index.get(fqn)

    def tie_root(self, fqn: str) -> str:
        """For a meta tensor sharing its storage with an earlier leaf, that leaf's fqn."""
        return self._ties.get(fqn, fqn)

    def set(self, fqn: str, value: Any, *, materialized: bool = False) -> None:
        self._updates[fqn] = value
        if materialized:
            self._materialized.add(fqn)

    def restore(self) -> None:
        """Forget the new values (the load failed); the target itself was never changed."""
        self._updates.clear()
        self._materialized.clear()

    def finish(self) -> None:
        """Write the new values into the target, then call each Stateful's ``load_state_dict``."""
        self._apply(self._root)
        for entries in self._rounds:
            for e in entries:
                self._apply(e.node)
        for entries in reversed(self._rounds):
            for e in entries:
                prefix = e.fqn + "."
                assign = any(f == e.fqn or f.startswith(prefix) for f in self._materialized)
                try:
                    _call_load_state_dict(e.obj, e.sub, assign=assign)
                except Exception as exc:
                    raise CheckpointError(
                        f"key '{e.fqn}': {type(e.obj).__qualname__}.load_state_dict failed: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc

    # ------------------------------------------------------------ walking the target

    def _walk(self, node: Any, fqn: str, *, graft: bool, depth: int) -> Any:
        if isinstance(node, torch.Tensor) or node is None or isinstance(node, _PLAIN):
            return self._leaf(node, fqn)
        if depth > MAX_DEPTH:
            raise ValueError(f"key '{fqn}': state dict nested over {MAX_DEPTH} levels (a cycle?)")
        if isinstance(node, dict):
            kids = [(k, self._walk(c, join(fqn, k), graft=graft, depth=depth + 1)) for k, c in node.items()]
            d = _Dict(node, kids, fqn)
            if graft:
                self._graftable.append(d)
            return d
        if isinstance(node, (list, tuple)):
            kind = type(node)
            if kind is torch.Size or ((kind is list or kind is tuple) and plain_sequence(node, fqn, depth)):
                return self._leaf(node, fqn)
            kids = [self._walk(c, join(fqn, i), graft=graft, depth=depth + 1) for i, c in enumerate(node)]
            if isinstance(node, list):
                return _Seq(node, kids, fqn)
            seq = _Seq(node, kids, fqn, cls=kind)
            if seq.fields is not None:
                self._namedtuples.append(seq)
            return seq
        if is_stateful(node):
            self._pending.append((fqn, node, depth))
            return _Keep(node)
        return self._leaf(node, fqn)

    def _leaf(self, value: Any, fqn: str) -> _Leaf:
        self.leaves[fqn] = value
        if isinstance(value, torch.Tensor) and value.is_meta and not is_dtensor(value):
            # Tied weights (lm_head.weight = embed.weight) must stay one tensor once materialised.
            key = (
                value.untyped_storage()._cdata,
                value.storage_offset(),
                tuple(value.shape),
                value.stride(),
                value.dtype,
            )
            self._ties[fqn] = self._meta.setdefault(key, fqn)
        return _Leaf(fqn, value)

    # ------------------------------------------------------------ what the target lacks

    def _grafts(self, node: _Dict) -> list[tuple[Any, Any]]:
        kind, body = node_parts(self._index.get(node.fqn))
        if kind != "d":
            return []
        return [
            (key, self._build(child, cfqn, 0))
            for key, cfqn, child in children(kind, body, node.fqn)
            if _hashable(key) and key not in node.obj
        ]

    def _build(self, saved: Any, fqn: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(f"key '{fqn}': saved tree nested over {MAX_DEPTH} levels")
        kind, body = node_parts(saved)
        if kind == "d":
            d = _Dict(make_dict(saved, iter(())), [], fqn, fresh=True)
            d.grafts = [
                (key, self._build(child, cfqn, depth + 1))
                for key, cfqn, child in children(kind, body, fqn)
                if _hashable(key)
            ]
            return d
        if kind in ("l", "t", "n"):
            kids = [self._build(child, cfqn, depth + 1) for _, cfqn, child in children(kind, body, fqn)]
            return _Seq([] if kind == "l" else (), kids, fqn, cls=None if kind == "l" else tuple, fresh=True)
        placeholder = _Missing(fqn)
        self.leaves[fqn] = placeholder
        return _Leaf(fqn, placeholder)

    # ------------------------------------------------------------ writing back

    def _apply(self, node: Any) -> tuple[Any, bool]:
        """The node's value after the load, and whether its parent must store it anew."""
        if isinstance(node, _Leaf):
            if node.fqn not in self._updates:
                return node.value, False
            new = self._updates[node.fqn]
            old = node.value
            if type(old) is list and type(new) is list and old is not new:
                old[:] = new  # a plain list is replaced whole, but in place
                return old, False
            return new, True
        if isinstance(node, _Dict):
            d = node.obj
            for key, kid in node.kids:
                value, changed = self._apply(kid)
                if changed:
                    d[key] = value
            for key, kid in node.grafts:
                value, _ = self._apply(kid)
                if not is_missing(value):
                    d[key] = value
            return d, node.fresh
        if isinstance(node, _Seq):
            results = [self._apply(kid) for kid in node.kids]
            if node.cls is None:  # a list
                if node.fresh:
                    node.obj[:] = [v for v, _ in results]
                else:
                    for i, (value, changed) in enumerate(results):
                        if changed:
                            node.obj[i] = value
                return node.obj, node.fresh
            if node.fresh or any(changed for _, changed in results):
                values = [v for v, _ in results]
                if node.fields is not None:
                    return node.cls._make(values), True
                return tuple(values), True
            return node.obj, False
        assert isinstance(node, _Keep)
        return node.obj, False


def assemble_saved(saved: Any, fqn: str, value_of: Callable[[str], Any], depth: int = 0) -> Any:
    """A plain container rebuilt from a saved tree node whose leaves are values.

    Checkpoints written before plain lists became one value (format version 1)
    hold them per index: ``value_of`` gives each leaf, and raises if it cannot.
    """
    if depth > MAX_DEPTH:
        raise CorruptCheckpointError(f"key '{fqn}': saved tree nested over {MAX_DEPTH} levels")
    kind, body = node_parts(saved)
    if kind == "x":
        return value_of(body)
    if kind == "d":
        return make_dict(
            saved,
            (
                (key, assemble_saved(child, cfqn, value_of, depth + 1))
                for key, cfqn, child in children(kind, body, fqn)
                if _hashable(key)
            ),
        )
    if kind in ("l", "t", "n"):
        items = [
            assemble_saved(child, cfqn, value_of, depth + 1) for _, cfqn, child in children(kind, body, fqn)
        ]
        return items if kind == "l" else tuple(items)
    raise CorruptCheckpointError(f"key '{fqn}': malformed saved tree node {str(saved)[:80]!r}")


def _hashable(key: object) -> bool:
    return key is None or isinstance(key, (str, int, float, bool))


def _call_load_state_dict(obj: Any, sub: Any, *, assign: bool) -> None:
    if assign and isinstance(obj, torch.nn.Module):
        # Meta-device parameters cannot be copied into; take the loaded tensors, then
        # put back the ties assign=True would cut (each name gets its own Parameter).
        tied = _tied_names(obj)
        obj.load_state_dict(sub, assign=True)
        _retie(obj, tied)
        return
    fn: Callable[[Any], Any] = obj.load_state_dict
    fn(sub)


def _tied_names(module: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """Groups of names of one Parameter (or buffer), by kind: ``("_parameters", [...])``."""
    groups: list[tuple[str, list[str]]] = []
    for kind, named in (
        ("_parameters", module.named_parameters(remove_duplicate=False)),
        ("_buffers", module.named_buffers(remove_duplicate=False)),
    ):
        by_id: dict[int, list[str]] = {}
        for name, t in named:
            by_id.setdefault(id(t), []).append(name)
        groups.extend((kind, names) for names in by_id.values() if len(names) > 1)
    return groups


def _retie(module: torch.nn.Module, groups: list[tuple[str, list[str]]]) -> None:
    for kind, names in groups:
        owner, attr = _owner(module, names[0])
        shared = getattr(owner, kind)[attr]
        for name in names[1:]:
            other, other_attr = _owner(module, name)
            getattr(other, kind)[other_attr] = shared


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (module.get_submodule(path) if path else module), attr
