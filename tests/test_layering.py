"""The package's layering, read from the source (docs/architecture.md, "Rooms").

A room is a top-level module or subpackage of ``async_ckpt`` (``save_flow``,
``worker/``, ``planning/`` ...). Every import counts, at module level or inside
a function: a lazy import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import async_ckpt

PACKAGE = Path(async_ckpt.__file__).parent
PURE_ROOMS = ("planning", "format")
# A leaf every room may use: it imports nothing of the project itself.
SHARED_LEAVES = frozenset({"errors"})
ROOT = "async_ckpt"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from pkg import sub`` imports the submodule where there is one.
            subs = {f"{module}.{a.name}" for a in node.names} & known
            out.update(subs or {module})
    return {m for m in out if m == ROOT or m.startswith(ROOT + ".")}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _room_graph() -> dict[str, dict[str, set[str]]]:
    """room -> imported room -> the importing modules (for the failure message)."""
    mods = _modules()
    known = set(mods)
    graph: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for name, path in mods.items():
        for target in _imports(name, path, known):
            a, b = _room(name), _room(target)
            if a != b:
                graph[a][b].add(name)
    return graph


def _cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one room (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_scan_sees_function_level_and_relative_imports() -> None:
    # The scan itself: a lazy import inside a function counts, and relative imports resolve.
    graph = _room_graph()
    assert "_tree" in graph["state_dict"], "state_dict imports _tree (module level)"
    assert "planning" in graph["local_plan"]
    assert {"_faults", "storage"} <= set(graph["stage_send"])
    assert graph["__init__"], "the package root imports its rooms"


def test_no_two_rooms_import_each_other() -> None:
    graph = _room_graph()
    mutual = sorted(
        f"{a} <-> {b} ({', '.join(sorted(graph[a][b]))} / {', '.join(sorted(graph[b][a]))})"
        for a in graph
        for b in graph[a]
        if a < b and a in graph.get(b, {})
    )
    assert not mutual, "rooms importing each other:\n" + "\n".join(mutual)


def test_rooms_import_one_way() -> None:
    # Longer loops (a -> b -> c -> a) tangle the rooms just as much as a pair does.
    assert not _cycles(_room_graph())


def test_pure_rooms_import_nothing_above_them() -> None:
    graph = _room_graph()
    for room in PURE_ROOMS:
        above = {
            target: sorted(importers)
            for target, importers in graph.get(room, {}).items()
            if target not in PURE_ROOMS and target not in SHARED_LEAVES
        }
        assert not above, f"{room}/ imports rooms above it: {above}"


def test_shared_leaves_import_nothing_of_the_project() -> None:
    graph = _room_graph()
    for leaf in SHARED_LEAVES:
        assert not graph.get(leaf), f"{leaf} imports {dict(graph[leaf])}"


def test_integrations_are_imported_by_nothing_else() -> None:
    graph = _room_graph()
    importers = sorted(m for room, targets in graph.items() for m in targets.get("integrations", ()))
    assert not importers, f"integrations/ is imported by {importers}"


def test_no_module_extends_all_after_defining_it() -> None:
    # One ``__all__`` at the top says what a module exports; additions at the bottom go unseen.
    late = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                if node.target.id == "__all__":
                    late.append(f"{name}:{node.lineno}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "__all__":
                    late.append(f"{name}:{node.lineno}")
    assert not late, f"__all__ extended after its definition: {late}"
