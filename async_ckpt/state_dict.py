"""Flattening state dicts to ``fqn -> leaf`` and filling them back in place on load.

A state dict is nested ``dict`` / ``list`` / ``tuple`` / namedtuple containers
whose leaves are tensors (DTensors included) or plain values, and whose
members may be ``Stateful`` objects (modules, optimizers) standing for their
own state dict. Flattening joins keys and list indices with ``.`` and records
the container structure as a JSON tree, so load can rebuild parts the target
lacks (a fresh optimizer has no per-parameter state yet). A list or tuple with
no tensor, dict, namedtuple or ``Stateful`` in it is one value (see _tree.py).

``Stateful`` objects are asked for their state dict in sorted key order, round
by round (those inside another one's state dict in the next round), on every
rank alike: their ``state_dict()`` may run collectives, which must meet in the
same order everywhere. The load side (load_view.py) does the same.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ._tree import (
    MAX_DEPTH,
    Stateful,
    dict_kind,
    is_stateful,
    join,
    namedtuple_fields,
    plain_sequence,
    tree_leaves,
)
from .format.values import encode_value, is_plain_value
from .load_view import LoadView, is_missing

__all__ = [
    "Flat",
    "LoadView",
    "Stateful",
    "flatten",
    "is_missing",
    "is_plain_value",
    "is_stateful",
    "join",
    "tree_leaves",
]


@dataclass(frozen=True, slots=True)
class Flat:
    entries: dict[str, Any]
    """fqn -> tensor or plain value; a Stateful's entries follow the rest of its round."""
    tree: Any
    """JSON structure: {"d": [[key, node]...]} (an OrderedDict or defaultdict's also has "kind"),
    {"l": [...]}, {"t": [...]}, {"n": [[field, node]...]}, {"x": fqn}."""
    tensors: list[torch.Tensor]
    """The tensor leaves, in the order of ``entries``."""
    values: dict[str, Any]
    """fqn -> every other leaf, in the order of ``entries``."""
    statefuls: list[tuple[Any, int]]
    """The ``Stateful`` objects in the state dict's own containers (not in one's ``state_dict()``),
    with their depth: where the overlap guard looks for optimizers, so it walks nothing again."""
    shape: list[Any]
    """The tree without leaf names, cheap to compare (the layout cache compares it on every
    save): per node in walk order, a container's kind with its keys (typed unless all
    ``str``), length or fields, or a leaf's kind (``_LEAF``, ``_NUMPY``, ``_SLOT``). Equal
    shapes and equal leaf names make equal trees; it also tells dict keys ``1``, ``1.0`` and
    ``True`` apart, which ``==`` on trees does not."""


# Leaf kinds in Flat.shape.
_LEAF, _NUMPY, _SLOT = 0, 1, 2


class _Walk:
    """What one flatten collects; one object passed down instead of five arguments."""

    __slots__ = ("allow_pickle", "entries", "pending", "shape", "tensors", "values")

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.entries: dict[str, Any] = {}
        self.tensors: list[torch.Tensor] = []
        self.values: dict[str, Any] = {}
        self.pending: _Pending = []
        self.shape: list[Any] = []


# A Stateful met while flattening: its fqn, the object, the tree node to fill, its depth.
_Pending = list[tuple[str, Any, dict[str, Any], int]]


def flatten(state_dict: dict[str, Any], *, allow_pickle: bool = False) -> Flat:
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__qualname__}")
    walk = _Walk(allow_pickle)
    pending = walk.pending
    tree = _flatten_node(state_dict, "", walk, 0)
    statefuls = [(obj, depth) for _, obj, _, depth in pending]
    while pending:
        batch = sorted(pending, key=lambda p: p[0])
        pending.clear()
        for fqn, obj, slot, depth in batch:
            slot.update(_flatten_node(obj.state_dict(), fqn, walk, depth + 1))
    return Flat(walk.entries, tree, walk.tensors, walk.values, statefuls, walk.shape)


def _flatten_node(node: Any, fqn: str, walk: _Walk, depth: int) -> Any:
    # Ordered by frequency: this runs once per leaf on every save, thousands of times.
    if isinstance(node, torch.Tensor):
        return _tensor_leaf(node, fqn, walk)
    if node is None or isinstance(node, _PLAIN):
        return _leaf(node, fqn, walk)
    if depth > MAX_DEPTH:
        raise ValueError(f"key '{fqn}': state dict nested over {MAX_DEPTH} levels (a cycle?)")
    if isinstance(node, dict):
        return _flatten_dict(node, fqn, walk, depth)
    if isinstance(node, (list, tuple)):
        kind = type(node)
        if (kind is list or kind is tuple) and plain_sequence(node, fqn, depth):
            return _leaf(node, fqn, walk)  # encoded (and refused if it must be) by the local plan
        fields = namedtuple_fields(node)
        if fields is not None:
            walk.shape.append(("n", fields))
            return {
                "n": [
                    [name, _flatten_node(c, join(fqn, i), walk, depth + 1)]
                    for i, (name, c) in enumerate(zip(fields, node, strict=True))
                ]
            }
        if kind is not torch.Size:
            walk.shape.append(("l" if isinstance(node, list) else "t", len(node)))
            kids = [_flatten_node(c, join(fqn, i), walk, depth + 1) for i, c in enumerate(node)]
            return {"l" if isinstance(node, list) else "t": kids}
    elif is_stateful(node):
        slot: dict[str, Any] = {}
        walk.shape.append(_SLOT)
        walk.pending.append((fqn, node, slot, depth))
        return slot
    np = sys.modules.get("numpy")  # never imported here: an array exists only if numpy was
    if np is not None and type(node) is np.ndarray and node.dtype.kind in _NUMPY_KINDS:
        return _numpy_leaf(node, fqn, walk)
    encode_value(node, fqn=fqn, allow_pickle=walk.allow_pickle)  # raises TypeError naming the key
    return _leaf(node, fqn, walk)


def _flatten_dict(node: dict[Any, Any], fqn: str, walk: _Walk, depth: int) -> Any:
    # Most leaves of a state dict are tensors in dicts: taken here, without a call each
    # (a third less time flattening 2,872 tensors than a call per leaf).
    entries, tensors, shape = walk.entries, walk.tensors, walk.shape
    prefix = f"{fqn}." if fqn else ""
    kids = []
    at = len(shape)
    shape.append(None)  # this node's, once its keys are known
    typed = False
    for key, child in node.items():
        if type(key) is str:
            name = prefix + key
        elif type(key) is int:  # an optimizer's per-parameter state
            name = prefix + str(key)
            typed = True
        else:
            key = _json_key(key, fqn)
            name = join(fqn, key)
            typed = True
        if isinstance(child, torch.Tensor):
            if name in entries:
                _duplicate(name)
            entries[name] = child
            tensors.append(child)
            shape.append(_LEAF)
            kids.append([key, {"x": name}])
        else:
            kids.append([key, _flatten_node(child, name, walk, depth + 1)])
    saved: dict[str, Any] = {"d": kids}
    # Keys compare with ==, so 1, 1.0 and True need their types beside them.
    token: tuple[Any, ...] = ("d", tuple(node), tuple(map(type, node))) if typed else ("d", tuple(node))
    if type(node) is not dict:
        kind = dict_kind(node)
        saved.update(kind)
        token += tuple(kind.items())
    shape[at] = token
    return saved


_PLAIN = (bool, int, float, str, bytes)


def _leaf(node: Any, fqn: str, walk: _Walk) -> Any:
    if fqn in walk.entries:
        _duplicate(fqn)
    walk.entries[fqn] = node
    walk.values[fqn] = node
    walk.shape.append(_LEAF)
    return {"x": fqn}


def _tensor_leaf(node: torch.Tensor, fqn: str, walk: _Walk) -> Any:
    if fqn in walk.entries:
        _duplicate(fqn)
    walk.entries[fqn] = node
    walk.tensors.append(node)
    walk.shape.append(_LEAF)
    return {"x": fqn}


def _duplicate(fqn: str) -> None:
    raise ValueError(f"two entries flatten to the same key '{fqn}'; rename one (keys are joined by '.')")


# bool, signed and unsigned ints, floats, complex: dtypes torch.from_numpy takes.
_NUMPY_KINDS = frozenset("biufc")


def _numpy_leaf(node: Any, fqn: str, walk: _Walk) -> Any:
    # Every numeric numpy array leaf goes to the shards as a tensor (docs/format.md 3.4),
    # viewing the array's memory when it can, like a CPU tensor leaf.
    arr = node
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="), order="C")
    elif not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = arr.copy(order="C")
    try:
        tensor = torch.from_numpy(arr)
    except TypeError as exc:
        raise TypeError(f"key '{fqn}': numpy dtype {node.dtype} is not supported: {exc}") from exc
    _tensor_leaf(tensor, fqn, walk)
    walk.shape[-1] = _NUMPY
    return {"x": fqn, "np": 1}


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
