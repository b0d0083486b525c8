"""Flattening state dicts to ``fqn -> leaf`` and filling them back in place on load.

A state dict is nested ``dict`` / ``list`` / ``tuple`` containers whose leaves
are tensors (DTensors included) or plain values, and whose members may be
``Stateful`` objects (modules, optimizers) standing for their own state dict.
Flattening joins keys and list indices with ``.`` and records the container
structure as a JSON tree, so load can rebuild parts the target lacks (a fresh
optimizer has no per-parameter state yet).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from .format.values import encode_value, is_plain_value

__all__ = ["Flat", "LoadView", "Stateful", "flatten", "join"]


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


_NEVER_STATEFUL = (dict, list, tuple, torch.Tensor, int, float, str, bytes, type(None))


def is_stateful(value: object) -> bool:
    # What isinstance(value, Stateful) decides, minus the protocol machinery,
    # which cost ~5 us per leaf: thousands per load.
    if isinstance(value, _NEVER_STATEFUL):
        return False
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


@dataclass(frozen=True, slots=True)
class Flat:
    entries: dict[str, Any]
    """fqn -> tensor or plain value, in traversal order."""
    tree: Any
    """JSON structure: {"d": [[key, node]...]}, {"l": [...]}, {"t": [...]}, {"x": fqn}."""


def flatten(state_dict: dict[str, Any], *, allow_pickle: bool = False) -> Flat:
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__qualname__}")
    entries: dict[str, Any] = {}
    tree = _flatten_node(state_dict, "", entries, allow_pickle, depth=0)
    return Flat(entries=entries, tree=tree)


def _flatten_node(node: Any, fqn: str, out: dict[str, Any], allow_pickle: bool, depth: int) -> Any:
    # Ordered by frequency: this runs once per leaf on every save, thousands of times.
    if isinstance(node, torch.Tensor) or node is None or isinstance(node, _PLAIN):
        return _leaf(node, fqn, out)
    if depth > 200:
        raise ValueError(f"key '{fqn}': state dict nested over 200 levels (a cycle?)")
    if isinstance(node, dict):
        return {
            "d": [
                [_json_key(key, fqn), _flatten_node(child, join(fqn, key), out, allow_pickle, depth + 1)]
                for key, child in node.items()
            ]
        }
    if isinstance(node, (list, tuple)):
        kids = [_flatten_node(c, join(fqn, i), out, allow_pickle, depth + 1) for i, c in enumerate(node)]
        return {"t" if isinstance(node, tuple) else "l": kids}
    if is_stateful(node):
        return _flatten_node(node.state_dict(), fqn, out, allow_pickle, depth + 1)
    encode_value(node, fqn=fqn, allow_pickle=allow_pickle)  # raises TypeError naming the key
    return _leaf(node, fqn, out)


_PLAIN = (bool, int, float, str, bytes)


def _leaf(node: Any, fqn: str, out: dict[str, Any]) -> Any:
    if fqn in out:
        raise ValueError(f"two entries flatten to the same key '{fqn}'; rename one (keys are joined by '.')")
    out[fqn] = node
    return {"x": fqn}


def _json_key(key: object, fqn: str) -> object:
    if type(key) is str:
        return key
    if isinstance(key, float) and not math.isfinite(key):
        raise TypeError(f"key '{join(fqn, key)}': non-finite float dict keys are not supported")
    if key is None or isinstance(key, (str, int, float, bool)):
        return key
    raise TypeError(
        f"key '{join(fqn, key)}': dict keys of type {type(key).__qualname__} are not "
        "supported; use str, int, float, bool or None"
    )


def tree_leaves(node: Any) -> Iterator[str]:
    """Every leaf fqn under a saved tree node."""
    if not isinstance(node, dict) or len(node) != 1:
        return
    ((kind, body),) = node.items()
    if kind == "x" and isinstance(body, str):
        yield body
    elif kind == "d" and isinstance(body, list):
        for pair in body:
            if isinstance(pair, list) and len(pair) == 2:
                yield from tree_leaves(pair[1])
    elif kind in ("l", "t") and isinstance(body, list):
        for child in body:
            yield from tree_leaves(child)


class _Missing:
    """Placeholder for a leaf the target lacks and the checkpoint provides."""

    __slots__ = ("fqn",)

    def __init__(self, fqn: str) -> None:
        self.fqn = fqn


def is_missing(value: object) -> bool:
    return isinstance(value, _Missing)


@dataclass
class LoadView:
    """A load target: its leaves by fqn, and how to put new values back in place.

    Dicts and lists are updated in place; tuples are rebuilt; every ``Stateful``
    gets ``load_state_dict`` with its refilled state dict at :meth:`finish`.
    """

    root: dict[str, Any]
    saved_tree: Any
    leaves: dict[str, Any] = field(default_factory=dict)
    _updates: dict[str, Any] = field(default_factory=dict)
    _statefuls: list[tuple[Any, dict[str, Any], str]] = field(default_factory=list)
    _materialized: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not isinstance(self.root, dict):
            raise TypeError(f"state_dict must be a dict, got {type(self.root).__qualname__}")
        self._index = _index_tree(self.saved_tree)
        self._shadow = self._walk(self.root, "", inside_stateful=False, depth=0)

    def set(self, fqn: str, value: Any, *, materialized: bool = False) -> None:
        self._updates[fqn] = value
        if materialized:
            self._materialized.add(fqn)

    def restore(self) -> None:
        """Undo the walk's temporary changes without applying any update (load failed)."""
        self._updates.clear()
        self._rebuild(self._shadow, "")
        for _, sub, prefix in self._statefuls:
            self._rebuild(sub, prefix)

    def finish(self) -> None:
        self._rebuild(self._shadow, "")
        for _, sub, prefix in self._statefuls:
            self._rebuild(sub, prefix)
        for obj, sub, prefix in reversed(self._statefuls):
            assign = any(f == prefix or f.startswith(prefix + ".") for f in self._materialized)
            _call_load_state_dict(obj, sub, assign=assign)

    # ------------------------------------------------------------ internals

    def _walk(self, node: Any, fqn: str, *, inside_stateful: bool, depth: int) -> Any:
        if depth > 200:
            raise ValueError(f"key '{fqn}': state dict nested over 200 levels (a cycle?)")
        if is_stateful(node):
            sub = node.state_dict()
            self._statefuls.append((node, sub, fqn))
            self._walk(sub, fqn, inside_stateful=True, depth=depth + 1)
            return node
        if isinstance(node, dict):
            for key, child in list(node.items()):
                node[key] = self._walk(
                    child, join(fqn, key), inside_stateful=inside_stateful, depth=depth + 1
                )
            if inside_stateful:
                self._graft_dict(node, fqn)
            return node
        if isinstance(node, (list, tuple)):
            items = [
                self._walk(c, join(fqn, i), inside_stateful=inside_stateful, depth=depth + 1)
                for i, c in enumerate(node)
            ]
            if isinstance(node, list):
                node[:] = items
                return node
            return _TupleShadow(items)
        self.leaves[fqn] = node
        return node

    def _graft_dict(self, node: dict[Any, Any], fqn: str) -> None:
        saved = self._index.get(fqn)
        if not (isinstance(saved, dict) and isinstance(saved.get("d"), list)):
            return
        for pair in saved["d"]:
            if isinstance(pair, list) and len(pair) == 2 and _hashable(pair[0]) and pair[0] not in node:
                node[pair[0]] = self._build_missing(pair[1], join(fqn, pair[0]))

    def _build_missing(self, saved: Any, fqn: str) -> Any:
        kind, body = _node_parts(saved)
        if kind == "d":
            return {
                p[0]: self._build_missing(p[1], join(fqn, p[0]))
                for p in body
                if isinstance(p, list) and len(p) == 2 and _hashable(p[0])
            }
        if kind in ("l", "t"):
            items = [self._build_missing(c, join(fqn, i)) for i, c in enumerate(body)]
            return items if kind == "l" else _TupleShadow(items)
        placeholder = _Missing(fqn)
        self.leaves[fqn] = placeholder
        return placeholder

    def _rebuild(self, node: Any, fqn: str) -> Any:
        if isinstance(node, dict):
            for key, child in list(node.items()):
                node[key] = self._rebuild(child, join(fqn, key))
            return node
        if isinstance(node, list):
            node[:] = [self._rebuild(c, join(fqn, i)) for i, c in enumerate(node)]
            return node
        if isinstance(node, _TupleShadow):
            return tuple(self._rebuild(c, join(fqn, i)) for i, c in enumerate(node.items))
        if fqn in self._updates:
            return self._updates[fqn]
        return node


class _TupleShadow:
    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items


def _hashable(key: object) -> bool:
    return key is None or isinstance(key, (str, int, float, bool))


def _node_parts(node: Any) -> tuple[str, Any]:
    if isinstance(node, dict) and len(node) == 1:
        ((kind, body),) = node.items()
        if kind in ("d", "l", "t") and isinstance(body, list):
            return kind, body
        if kind == "x" and isinstance(body, str):
            return kind, body
    return "?", None


def _index_tree(tree: Any) -> dict[str, Any]:
    """Saved container nodes by their fqn prefix."""
    index: dict[str, Any] = {}
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        node, fqn = stack.pop()
        kind, body = _node_parts(node)
        index[fqn] = node
        if kind == "d":
            stack.extend((p[1], join(fqn, p[0])) for p in body if isinstance(p, list) and len(p) == 2)
        elif kind in ("l", "t"):
            stack.extend((c, join(fqn, i)) for i, c in enumerate(body))
    return index


def _call_load_state_dict(obj: Any, sub: dict[str, Any], *, assign: bool) -> None:
    if assign and isinstance(obj, torch.nn.Module):
        # Meta-device parameters cannot be copied into; take the loaded tensors.
        obj.load_state_dict(sub, assign=True)
        return
    fn: Callable[[dict[str, Any]], Any] = obj.load_state_dict
    fn(sub)


__all__ += ["is_missing", "is_plain_value", "is_stateful", "tree_leaves"]
