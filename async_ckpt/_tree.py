"""What a state dict is made of, shared by flattening (save) and the load view.

Containers are dicts, lists, tuples and namedtuples; ``Stateful`` objects
stand for their own state dict. A list or tuple that holds no tensor, dict,
namedtuple or ``Stateful`` at any depth is one plain value (as in DCP): it is
saved whole and replaced whole on load, so lists that change length between
runs (an optimizer's ``param_groups[i]["params"]``) load. ``torch.Size`` is a
value too, never a container.

The saved tree (docs/format.md section 3.4) has one-key nodes: ``{"d": [[key,
node], ...]}`` dict, ``{"l": [...]}`` list, ``{"t": [...]}`` tuple, ``{"n":
[[field, node], ...]}`` namedtuple, ``{"x": fqn}`` leaf (``{"x": fqn, "np": 1}``
for a numpy array saved as a tensor, restored as an array). A dict node of an
``OrderedDict`` or ``defaultdict`` also has ``"kind"`` (and a defaultdict whose
factory is a builtin in :data:`DICT_FACTORIES`, ``"factory"``), so loading
without a target gives that type back; nothing named in a file is imported.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import CorruptCheckpointError
from .format.value_kinds import DICT_FACTORIES

__all__ = [
    "DICT_FACTORIES",
    "MAX_DEPTH",
    "dict_kind",
    "make_dict",
    "Stateful",
    "index_tree",
    "is_numpy_leaf",
    "is_stateful",
    "join",
    "namedtuple_fields",
    "node_parts",
    "plain_sequence",
    "tensor_to_numpy",
    "tree_leaves",
]

MAX_DEPTH = 200


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> Any: ...


_NEVER_STATEFUL = (dict, list, tuple, torch.Tensor, int, float, str, bytes, type(None))
_PLAIN = (bool, int, float, str, bytes)


def is_stateful(value: object) -> bool:
    # What isinstance(value, Stateful) decides, minus the protocol machinery,
    # which cost ~5 us per leaf: thousands per load.
    if isinstance(value, _NEVER_STATEFUL):
        return False
    return callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None))


def join(prefix: str, key: object) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def namedtuple_fields(node: object) -> tuple[str, ...] | None:
    """The field names of a namedtuple instance; None for anything else (torch.Size included)."""
    cls = type(node)
    if cls is tuple or not isinstance(node, tuple):
        return None
    fields = getattr(cls, "_fields", None)
    if isinstance(fields, tuple) and callable(getattr(cls, "_make", None)):
        return fields
    return None


def plain_sequence(node: list[Any] | tuple[Any, ...], fqn: str, depth: int = 0) -> bool:
    """Whether a list or tuple (exactly those types) is one value: nothing in it needs a key."""
    if depth > MAX_DEPTH:
        raise ValueError(f"key '{fqn}': state dict nested over {MAX_DEPTH} levels (a cycle?)")
    for item in node:
        if item is None or isinstance(item, _PLAIN):
            continue
        if isinstance(item, (torch.Tensor, dict)):
            return False
        if isinstance(item, (list, tuple)):
            kind = type(item)
            if kind is torch.Size:
                continue
            if (kind is not list and kind is not tuple) or not plain_sequence(item, fqn, depth + 1):
                return False
        elif is_stateful(item):
            return False
    return True


def dict_kind(node: dict[Any, Any]) -> dict[str, str]:
    """The extra members of the saved node of dict ``node``: none for a plain dict."""
    cls = type(node)
    if cls is collections.OrderedDict:
        return {"kind": "OrderedDict"}
    if cls is collections.defaultdict:
        factory = node.default_factory  # type: ignore[attr-defined]
        name = getattr(factory, "__name__", "")
        if factory is not None and DICT_FACTORIES.get(name) is factory:
            return {"kind": "defaultdict", "factory": name}
        return {"kind": "defaultdict"}
    return {}


def make_dict(node: Any, items: Iterator[tuple[Any, Any]]) -> dict[Any, Any]:
    """A dict of ``items`` of the kind saved node ``node`` records; a plain dict if unknown."""
    kind = node.get("kind") if isinstance(node, dict) else None
    if kind == "OrderedDict":
        return collections.OrderedDict(items)
    if kind == "defaultdict":
        factory = node.get("factory")
        return collections.defaultdict(
            DICT_FACTORIES.get(factory) if isinstance(factory, str) else None, items
        )
    return dict(items)


def is_numpy_leaf(node: Any) -> bool:
    """Whether saved node ``node`` is a tensor leaf that was a numpy array."""
    return isinstance(node, dict) and node.get("np") == 1 and isinstance(node.get("x"), str)


def tensor_to_numpy(tensor: torch.Tensor, fqn: str, location: str) -> Any:
    """A loaded CPU tensor of a leaf saved as a numpy array, as that array (sharing its memory)."""
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError) as exc:
        raise CorruptCheckpointError(
            f"{location}: key '{fqn}' is marked as a numpy array but holds {tensor.dtype}: {exc}"
        ) from exc


def node_parts(node: Any) -> tuple[str, Any]:
    """``(kind, body)`` of a well-formed saved tree node, ``("?", None)`` otherwise."""
    if isinstance(node, dict) and len(node) == 2 and is_numpy_leaf(node):
        return "x", node["x"]
    if isinstance(node, dict) and len(node) > 1 and isinstance(node.get("d"), list):
        if node.keys() <= {"d", "kind", "factory"}:
            return "d", node["d"]
        return "?", None
    if isinstance(node, dict) and len(node) == 1:
        ((kind, body),) = node.items()
        if kind in ("d", "l", "t", "n") and isinstance(body, list):
            return kind, body
        if kind == "x" and isinstance(body, str):
            return kind, body
    return "?", None


def children(kind: str, body: list[Any], fqn: str) -> Iterator[tuple[Any, str, Any]]:
    """``(key or field, child fqn, child node)`` of a container node; malformed entries skipped."""
    if kind in ("l", "t"):
        for i, child in enumerate(body):
            yield i, join(fqn, i), child
        return
    for i, pair in enumerate(body):
        if isinstance(pair, list) and len(pair) == 2:
            # Namedtuple items are keyed by position, like tuples, so old checkpoints load.
            yield pair[0], join(fqn, i if kind == "n" else pair[0]), pair[1]


def index_tree(tree: Any) -> dict[str, Any]:
    """Saved nodes by their fqn prefix."""
    index: dict[str, Any] = {}
    stack: list[tuple[Any, str]] = [(tree, "")]
    while stack:
        node, fqn = stack.pop()
        index[fqn] = node
        kind, body = node_parts(node)
        if kind in ("d", "l", "t", "n"):
            stack.extend((child, cfqn) for _, cfqn, child in children(kind, body, fqn))
    return index


def tree_leaves(node: Any, fqn: str = "") -> Iterator[str]:
    """Every leaf fqn under a saved tree node."""
    kind, body = node_parts(node)
    if kind == "x":
        yield body
    elif kind != "?":
        for _, cfqn, child in children(kind, body, fqn):
            yield from tree_leaves(child, cfqn)
