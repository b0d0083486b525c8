"""``CheckpointManager``: numbered checkpoints under one root, retention, resume.

Checkpoints live at ``<root>/step-<step:08d>`` (any ``step-<digits>`` name is
recognised when listing). A step is *committed* when its ``metadata.json`` is
in place, or when it holds a DCP checkpoint (``.metadata``, no ``metadata.json``:
``load`` reads those); nothing else under the root counts.

Retention runs after each save of this manager commits, on a helper thread
(deleting a large checkpoint must not hold up the checkpointer's message
thread). It keeps the newest ``keep_last`` committed steps, every step
divisible by ``keep_every``, the newest committed step and the one that just
committed, and never touches a step that is being saved. It also removes
leftovers of interrupted saves (staging directories, ``step-<n>`` entries
without ``metadata.json``), whatever the keep policy, but only while this
manager has no save in flight: on disk an in-flight save looks exactly like an
interrupted one. So do not point two jobs at one root. With several ranks,
only rank 0 of the group deletes anything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._faults import hook_point
from .api import load
from .checkpointer import AsyncCheckpointer, PendingCheckpoint
from .dist import comm_for
from .errors import CheckpointError, CheckpointNotFoundError
from .format.metadata import METADATA_FILE
from .interop.dcp_detect import DCP_METADATA_FILE, is_dcp_checkpoint
from .single_rank import ProcessGroupArg
from .storage import LocalStorage, Storage, detect_storage

__all__ = ["CheckpointManager", "RootEntry", "parse_step", "remove_uncommitted", "scan_root", "step_name"]

log = logging.getLogger("async_ckpt")

_STEP = re.compile(r"step-(\d+)")


def step_name(step: int) -> str:
    """The directory name of ``step``: ``step-00000042``."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a ``step-<digits>`` name, else ``None``."""
    m = _STEP.fullmatch(name)
    return int(m[1]) if m else None


@dataclass(frozen=True, slots=True)
class RootEntry:
    """One entry directly under a root."""

    name: str
    location: str
    step: int | None
    state: str
    """``committed``, ``uncommitted`` (no metadata.json), ``unreadable``, or ``file``."""

    @property
    def committed(self) -> bool:
        return self.state == "committed"


def _basename(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


def _metadata_state(backend: Storage, location: str) -> str:
    if isinstance(backend, LocalStorage):
        # Cheap: do not read a metadata file that may be megabytes just to list.
        path = Path(location)
        if not path.is_dir():
            return "file"
        meta = path / METADATA_FILE
        if meta.is_file():
            return "committed"
        if meta.exists():
            return "unreadable"
        # A DCP checkpoint (a run begun with DCP, resumed with us) is a checkpoint, not a leftover.
        return "committed" if (path / DCP_METADATA_FILE).is_file() else "uncommitted"
    try:
        backend.read_metadata(location)
    except CheckpointNotFoundError:
        return "committed" if is_dcp_checkpoint(backend, location) else "uncommitted"
    except CheckpointError:
        return "unreadable"
    return "committed"


def scan_root(backend: Storage, root: str) -> list[RootEntry]:
    """Every entry under ``root`` (hidden ones excluded), steps first in step order."""
    entries = []
    for location in backend.list_children(root):
        name = _basename(location)
        entries.append(RootEntry(name, location, parse_step(name), _metadata_state(backend, location)))
    entries.sort(key=lambda e: (e.step is None, e.step or 0, e.name))
    return entries


def remove_uncommitted(backend: Storage, root: str) -> list[str]:
    """Remove interrupted saves' leftovers and ``step-<n>`` entries without metadata; return them.

    Only safe while nothing is saving under ``root``: an in-flight save looks the same.
    """
    removed = list(backend.remove_uncommitted(root))
    for e in scan_root(backend, root):
        if e.step is not None and e.state == "uncommitted":
            backend.delete(e.location)
            removed.append(e.location)
    return removed


@dataclass(frozen=True, slots=True, kw_only=True)
class _Config:
    keep_last: int | None
    keep_every: int | None
    max_in_flight: int
    timeout: float

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "max_in_flight"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise TypeError(f"{name} must be an int or None, got {type(v).__qualname__}.")
        if self.keep_last is not None and self.keep_last < 0:
            raise ValueError("keep_last cannot be negative.")
        if self.keep_every is not None and self.keep_every <= 0:
            raise ValueError("keep_every must be positive (or None to keep no extra steps).")
        if self.max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1.")
        if not self.timeout > 0:
            raise ValueError("timeout must be positive.")

    @property
    def retains(self) -> bool:
        return self.keep_last is not None or self.keep_every is not None


class CheckpointManager:
    """Numbered checkpoints under ``root``: save, retention, ``latest()`` and ``restore()``.

    ``keep_last=None`` and ``keep_every=None`` (the default) keep every
    committed step. ``keep_last=N`` keeps the newest N committed steps;
    ``keep_every=K`` also keeps every step divisible by K (alone, it keeps
    those and the newest). The newest committed step is always kept.
    ``wait()`` blocks until the saves in flight and their retention are done.

    Saves go through the manager's own ``AsyncCheckpointer`` (created on the
    first save with ``max_in_flight`` and ``timeout``, closed by ``close()``),
    or through ``checkpointer=``, which the manager then uses but never closes.
    Every rank of ``process_group`` creates its manager and saves the same
    steps in the same order.
    """

    def __init__(
        self,
        root: Any,
        *,
        keep_last: int | None = None,
        keep_every: int | None = None,
        process_group: ProcessGroupArg = None,
        storage: Storage | None = None,
        checkpointer: AsyncCheckpointer | None = None,
        max_in_flight: int = 1,
        timeout: float = 600.0,
    ) -> None:
        self._config = _Config(
            keep_last=keep_last, keep_every=keep_every, max_in_flight=max_in_flight, timeout=timeout
        )
        self._backend, self._root = detect_storage(root, storage)
        self._pg = process_group
        self._ckpt = checkpointer
        self._owns_ckpt = checkpointer is None
        self._is_coordinator: bool | None = None
        self._shared = False  # several ranks write under root
        self._swept = False
        self._cond = threading.Condition(threading.Lock())
        self._inflight: dict[int, int] = {}  # ticket -> step
        self._tickets = itertools.count()
        self._retention: concurrent.futures.ThreadPoolExecutor | None = None
        self._retention_closed = False
        self._closed = False

    # ------------------------------------------------------------ queries

    @property
    def root(self) -> str:
        return self._root

    @property
    def keep_last(self) -> int | None:
        return self._config.keep_last

    @property
    def keep_every(self) -> int | None:
        return self._config.keep_every

    def path(self, step: int) -> str:
        """Where ``step`` is (or would be) saved."""
        return f"{self._root.rstrip('/')}/{step_name(_check_step(step))}"

    def steps(self) -> list[int]:
        """Committed steps, ascending."""
        return sorted(
            {e.step for e in scan_root(self._backend, self._root) if e.committed and e.step is not None}
        )

    def latest(self) -> int | None:
        """The newest committed step, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    def restore(self, state_dict: dict[str, Any], step: int | None = None, *, strict: bool = True) -> int:
        """Load ``step`` (default: the newest committed one) into ``state_dict``; return the step.

        Collective with several ranks: rank 0 picks the step for everyone.
        """
        comm = comm_for(self._pg)
        if step is None:
            step = self.latest() if comm.rank == 0 else None
            if comm.world_size > 1:
                step = comm.broadcast(step)
            if step is None:
                raise CheckpointError(
                    f"no committed checkpoint under {self._root} (looked for step-<n> directories "
                    f"holding {METADATA_FILE}); nothing to restore"
                )
        load(state_dict, self._location(step), process_group=self._pg, storage=self._backend, strict=strict)
        return step

    def _location(self, step: int) -> str:
        # A committed non-canonical name (step-42) stands in when step-00000042 is absent.
        canonical = self.path(step)
        found = [e for e in scan_root(self._backend, self._root) if e.step == step and e.committed]
        if not found or any(e.name == step_name(step) for e in found):
            return canonical
        return found[0].location

    # -------------------------------------------------------------- saves

    def save(self, step: int, state_dict: dict[str, Any], *, overlap: bool = False) -> PendingCheckpoint:
        """Stage ``state_dict`` as ``step`` and return; it is written in the background.

        ``overlap=True`` as in ``AsyncCheckpointer.save``: wait for ``pending.staged``
        before modifying the tensors.
        """
        ckpt, ticket = self._begin(step)
        try:
            pending = ckpt.save(state_dict, self.path(step), overlap=overlap, storage=self._backend)
        except BaseException:
            self._forget(ticket)
            raise
        pending.add_done_callback(lambda p: self._on_done(ticket, step, p))
        return pending

    async def async_save(self, step: int, state_dict: dict[str, Any]) -> PendingCheckpoint:
        """``save`` for asyncio loops: returns once staged; await the result for the commit."""
        ckpt, ticket = self._begin(step)
        try:
            pending = await ckpt.async_save(state_dict, self.path(step), storage=self._backend)
        except BaseException:
            self._forget(ticket)
            raise
        pending.add_done_callback(lambda p: self._on_done(ticket, step, p))
        return pending

    def _begin(self, step: int) -> tuple[AsyncCheckpointer, int]:
        _check_step(step)
        if self._is_coordinator is None:
            comm = comm_for(self._pg)
            self._is_coordinator = comm.rank == 0
            self._shared = comm.world_size > 1
        with self._cond:
            if self._closed:
                raise CheckpointError("this CheckpointManager is closed")
            if self._shared and not self._swept and self._is_coordinator and self._owns_ckpt:
                # With several ranks, rank 0 cannot tell another rank's save in flight
                # from an interrupted save's leftover: once a plan is cached, a rank
                # starts writing a step before rank 0 has called save for it. Before
                # the first save of a fresh worker, no rank can (the first plan needs
                # rank 0), so leftovers are swept then, and only then.
                for removed in remove_uncommitted(self._backend, self._root):
                    log.info("async_ckpt: removed leftover of an interrupted save: %s", removed)
            self._swept = True
            if self._ckpt is None:
                self._ckpt = AsyncCheckpointer(
                    self._pg,
                    self._config.max_in_flight,
                    storage=self._backend,
                    timeout=self._config.timeout,
                )
            if self._is_coordinator and not self._shared and step not in self._inflight.values():
                # An interrupted save of this very step would block the new one
                # (a directory without metadata is never overwritten): clear it.
                location = self.path(step)
                if _metadata_state(self._backend, location) == "uncommitted":
                    self._backend.delete(location)
                    log.info("async_ckpt: removed uncommitted checkpoint %s before saving it again", location)
            # Registered before the save starts, so that retention never takes
            # this save's staging directory for an interrupted save's leftover.
            ticket = next(self._tickets)
            self._inflight[ticket] = step
            return self._ckpt, ticket

    def _forget(self, ticket: int) -> None:
        with self._cond:
            self._inflight.pop(ticket, None)
            self._cond.notify_all()

    def _on_done(self, ticket: int, step: int, pending: PendingCheckpoint) -> None:
        # Runs on the checkpointer's message thread: hand the deleting to our own thread.
        with self._cond:
            self._inflight.pop(ticket, None)
            committed = pending.exception() is None
            if committed and self._is_coordinator and not self._retention_closed:
                if self._retention is None:
                    self._retention = concurrent.futures.ThreadPoolExecutor(
                        1, thread_name_prefix="async_ckpt-retention"
                    )
                self._retention.submit(self._retain, step)
            self._cond.notify_all()

    # ---------------------------------------------------------- retention

    def _retain(self, just_committed: int) -> None:
        try:
            self._apply_retention(just_committed)
        except Exception:
            log.warning("async_ckpt: retention under %s failed", self._root, exc_info=True)

    def _apply_retention(self, just_committed: int) -> None:
        hook_point("retention")
        with self._cond:
            busy = set(self._inflight.values())
            if not busy and not self._shared:
                # Nothing of ours is being written, so every staging leftover is
                # from an interrupted save. The lock keeps new saves out meanwhile.
                for removed in remove_uncommitted(self._backend, self._root):
                    log.info("async_ckpt: removed leftover of an interrupted save: %s", removed)
        entries = scan_root(self._backend, self._root)
        committed = sorted({e.step for e in entries if e.committed and e.step is not None})
        if not committed or not self._config.retains:
            return
        keep = {committed[-1], just_committed} | busy
        if self._config.keep_last:
            keep.update(committed[-self._config.keep_last :])
        if self._config.keep_every:
            keep.update(s for s in committed if s % self._config.keep_every == 0)
        for e in entries:
            if e.committed and e.step is not None and e.step not in keep:
                self._backend.delete(e.location)
                log.info("async_ckpt: retention removed %s", e.location)

    # ----------------------------------------------------------- lifetime

    def wait(self, timeout: float | None = None) -> None:
        """Wait until this manager's saves are done and the retention they triggered has run.

        Failed saves do not raise here; their ``PendingCheckpoint`` carries the error.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{len(self._inflight)} save(s) still in flight after {timeout}s")
                self._cond.wait(left)
            executor = self._retention
        if executor is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            executor.submit(lambda: None).result(left)

    def close(self, timeout: float | None = None) -> None:
        """Wait for in-flight saves and their retention, then close the manager's own checkpointer."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            ckpt = self._ckpt
        try:
            if ckpt is not None and self._owns_ckpt:
                ckpt.close(timeout)
            self.wait(self._config.timeout if timeout is None else timeout)
        except TimeoutError as exc:
            log.warning("async_ckpt: CheckpointManager.close() stopped waiting: %s", exc)
        finally:
            with self._cond:
                self._retention_closed = True
                executor, self._retention = self._retention, None
            if executor is not None:
                executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> CheckpointManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        c = self._config
        return f"CheckpointManager({self._root!r}, keep_last={c.keep_last}, keep_every={c.keep_every})"


def _check_step(step: object) -> int:
    if not isinstance(step, int) or isinstance(step, bool):
        raise TypeError(f"step must be an int, got {type(step).__qualname__}")
    if step < 0:
        raise ValueError(f"step cannot be negative, got {step}")
    return step
