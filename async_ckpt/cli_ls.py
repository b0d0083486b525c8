"""``async-ckpt ls`` and ``async-ckpt gc``: the commands that look at a root of checkpoints."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .cli_output import age, human, say
from .errors import CheckpointError
from .format.metadata import METADATA_FILE, decode_metadata
from .manager import RootEntry, remove_uncommitted, scan_root
from .storage import LocalStorage, Storage, detect_storage
from .storage.local import hidden_leftovers

__all__ = ["cmd_gc", "cmd_ls"]


def cmd_ls(args: argparse.Namespace, out: Console, err: Console) -> int:
    backend, root = detect_storage(args.root)
    _check_local_root(backend, root)
    entries = _expand_manager_roots(backend, scan_root(backend, root))
    if not entries:
        say(out, f"nothing under {root}")
    else:
        out.print(_table(backend, root, entries))
    # fsspec saves stage in place (visible, uncommitted rows); only local ones hide their leftovers.
    leftovers = hidden_leftovers(root) if isinstance(backend, LocalStorage) else []
    if leftovers:
        say(
            out,
            f"{len(leftovers)} hidden leftover(s) of interrupted saves; `async-ckpt gc {root}` removes them "
            "(never while a job is saving there)",
            "yellow",
        )
    return 0


def _check_local_root(backend: Storage, root: str) -> None:
    if not isinstance(backend, LocalStorage):
        return
    path = Path(root)
    if not path.exists():
        raise CheckpointError(f"{root} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{root} is not a directory")


def _expand_manager_roots(backend: Storage, entries: list[RootEntry]) -> list[RootEntry]:
    """A CheckpointManager root among the entries (a directory of ``step-<n>``) shows as its steps."""
    shown: list[RootEntry] = []
    for e in entries:
        inner = scan_root(backend, e.location) if e.state == "uncommitted" and e.step is None else []
        if any(sub.step is not None for sub in inner):
            shown.extend(dataclasses.replace(sub, name=f"{e.name}/{sub.name}") for sub in inner)
        else:
            shown.append(e)
    return shown


def _table(backend: Storage, root: str, entries: list[RootEntry]) -> Table:
    table = Table(show_edge=False, title=Text(root), title_justify="left")
    table.add_column("name", overflow="fold")
    table.add_column("step", justify="right")
    table.add_column("size", justify="right")
    table.add_column("committed")
    table.add_column("age", justify="right")
    for e in entries:
        size, state = _entry_size(backend, e)
        style = {"yes": "green", "no": "yellow"}.get(state, "red")
        table.add_row(
            e.name,
            "" if e.step is None else str(e.step),
            human(size),
            Text(state, style=style),
            age(_mtime(backend, e)),
        )
    return table


def _entry_size(backend: Storage, e: RootEntry) -> tuple[int | None, str]:
    """(total bytes, committed column) of one entry."""
    if e.state == "committed":
        try:
            raw = backend.read_metadata(e.location)
            md = decode_metadata(raw, where=f"{e.location}/{METADATA_FILE}")
        except CheckpointError:
            return None, "corrupt"
        return len(raw) + sum(f.size for f in md.files.values()), "yes"
    state = {"uncommitted": "no", "file": "not a checkpoint"}.get(e.state, e.state)
    if isinstance(backend, LocalStorage):
        path = Path(e.location)
        if path.is_file():
            return path.stat().st_size, state
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()), state
    return None, state


def _mtime(backend: Storage, e: RootEntry) -> float | None:
    if isinstance(backend, LocalStorage):
        path = Path(e.location)
        meta = path / METADATA_FILE
        try:
            return (meta if e.committed else path).stat().st_mtime
        except OSError:
            return None
    fs_for = getattr(backend, "fs_for", None)
    if fs_for is None:
        return None
    try:
        fs = fs_for(e.location)
        return float(fs.modified(fs._strip_protocol(f"{e.location}/{METADATA_FILE}")).timestamp())
    except (OSError, NotImplementedError, ValueError, AttributeError, TypeError):
        return None


def cmd_gc(args: argparse.Namespace, out: Console, err: Console) -> int:
    backend, root = detect_storage(args.root)
    _check_local_root(backend, root)
    removed = remove_uncommitted(backend, root)
    for location in removed:
        say(out, f"removed {location}")
    say(out, f"{len(removed)} leftover(s) removed from {root}" if removed else f"nothing to remove in {root}")
    return 0
