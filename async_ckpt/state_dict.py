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


# A Stateful met while flattening: its fqn, the object, the tree node to fill, its depth.
_Pending = list[tuple[str, Any, dict[str, Any], int]]


def flatten(state_dict: dict[str, Any], *, allow_pickle: bool = False) -> Flat:
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__qualname__}")
    entries: dict[str, Any] = {}
    pending: _Pending = []
    tree = _flatten_node(state_dict, "", entries, allow_pickle, 0, pending)
    while pending:
        batch = sorted(pending, key=lambda p: p[0])
        pending.clear()
        for fqn, obj, slot, depth in batch:
            slot.update(_flatten_node(obj.state_dict(), fqn, entries, allow_pickle, depth + 1, pending))
    return Flat(entries=entries, tree=tree)


def _flatten_node(
    node: Any, fqn: str, out: dict[str, Any], allow_pickle: bool, depth: int, pending: _Pending
) -> Any:
    # Ordered by frequency: this runs once per leaf on every save, thousands of times.
    if isinstance(node, torch.Tensor) or node is None or isinstance(node, _PLAIN):
        return _leaf(node, fqn, out)
    if depth > MAX_DEPTH:
        raise ValueError(f"key '{fqn}': state dict nested over {MAX_DEPTH} levels (a cycle?)")
    if isinstance(node, dict):
        saved: dict[str, Any] = {
            "d": [
                [
                    _json_key(key, fqn),
                    _flatten_node(child, join(fqn, key), out, allow_pickle, depth + 1, pending),
                ]
                for key, child in node.items()
            ]
        }
        if type(node) is not dict:
            saved.update(dict_kind(node))
        return saved
    if isinstance(node, (list, tuple)):
        kind = type(node)
        if (kind is list or kind is tuple) and plain_sequence(node, fqn, depth):
            return _leaf(node, fqn, out)  # encoded (and refused if it must be) by the local plan
        fields = namedtuple_fields(node)
        if fields is not None:
            return {
                "n": [
                    [name, _flatten_node(c, join(fqn, i), out, allow_pickle, depth + 1, pending)]
                    for i, (name, c) in enumerate(zip(fields, node, strict=True))
                ]
            }
        if kind is not torch.Size:
            kids = [
                _flatten_node(c, join(fqn, i), out, allow_pickle, depth + 1, pending)
                for i, c in enumerate(node)
            ]
            return {"l" if isinstance(node, list) else "t": kids}
    elif is_stateful(node):
        slot: dict[str, Any] = {}
        pending.append((fqn, node, slot, depth))
        return slot
    np = sys.modules.get("numpy")  # never imported here: an array exists only if numpy was
    if np is not None and type(node) is np.ndarray and node.dtype.kind in _NUMPY_KINDS:
        return _numpy_leaf(node, fqn, out)
    encode_value(node, fqn=fqn, allow_pickle=allow_pickle)  # raises TypeError naming the key
    return _leaf(node, fqn, out)


_PLAIN = (bool, int, float, str, bytes)


def _leaf(node: Any, fqn: str, out: dict[str, Any]) -> Any:
    if fqn in out:
        raise ValueError(f"two entries flatten to the same key '{fqn}'; rename one (keys are joined by '.')")
    out[fqn] = node
    return {"x": fqn}


# bool, signed and unsigned ints, floats, complex: dtypes torch.from_numpy takes.
_NUMPY_KINDS = frozenset("biufc")


def _numpy_leaf(node: Any, fqn: str, out: dict[str, Any]) -> Any:
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
    _leaf(tensor, fqn, out)
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
