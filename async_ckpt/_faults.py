"""Deterministic fault injection for crash-consistency tests.

``ASYNC_CKPT_KILL_AT=<point>[:<save id>[:<rank>]]`` makes the process that
reaches ``<point>`` (for that save, on that rank) SIGKILL itself there. Trainer
points: ``stage`` (half way through the staging copy) and ``staged`` (after
the request reached the worker). Worker points: ``plan``, ``write`` (after
this rank's shards are written), ``before_commit`` and ``after_commit``.
Unset, each check is one dictionary lookup.

``set_hook(point, fn)`` runs ``fn`` in this process whenever ``hook_point(point)``
is reached: how a test does something (commit another save) at an exact
moment of a load. Load points: ``load_metadata_read`` (metadata.json read and
decoded, no shard opened yet). Save points: ``stage`` (half way through an
``AsyncCheckpointer`` save's staging copy, on the thread that stages).

``ASYNC_CKPT_FAIL_AT=<spec>[,<spec>...]``, each spec as for ``KILL_AT``, makes
``fail_point`` raise ``InjectedFault`` instead: how a test fails one rank at
one step of a save and checks that every rank hears of it. Save points (blocking
and worker): ``plan`` (the coordinator planning), ``write_jobs`` (a rank turning
its assignment into file jobs) and ``commit`` (the coordinator committing).
A blocking save has no save id: only specs without one match it. Trainer point:
``worker_start`` (a background worker start, before its process is spawned;
no save id, the rank in the workers' group).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

__all__ = ["FAIL_ENV", "KILL_ENV", "InjectedFault", "fail_point", "hook_point", "kill_point", "set_hook"]

KILL_ENV = "ASYNC_CKPT_KILL_AT"
FAIL_ENV = "ASYNC_CKPT_FAIL_AT"


def kill_point(name: str, save_id: int, rank: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    parts = spec.split(":")
    if parts[0] != name:
        return
    if len(parts) > 1 and parts[1] and int(parts[1]) != save_id:
        return
    if len(parts) > 2 and parts[2] and int(parts[2]) != rank:
        return
    os.kill(os.getpid(), signal.SIGKILL)


_HOOKS: dict[str, Callable[[], None]] = {}


def set_hook(name: str, fn: Callable[[], None] | None) -> None:
    """Run ``fn`` at ``hook_point(name)`` from now on; ``None`` removes it. For tests."""
    if fn is None:
        _HOOKS.pop(name, None)
    else:
        _HOOKS[name] = fn


def hook_point(name: str) -> None:
    fn = _HOOKS.get(name)
    if fn is not None:
        fn()


class InjectedFault(RuntimeError):
    """Raised at a ``fail_point`` named by ``ASYNC_CKPT_FAIL_AT`` (tests only)."""


def fail_point(name: str, rank: int, save_id: int | None = None) -> None:
    specs = os.environ.get(FAIL_ENV)
    if not specs:
        return
    for spec in specs.split(","):
        parts = spec.split(":")
        if parts[0] != name:
            continue
        if len(parts) > 1 and parts[1] and (save_id is None or int(parts[1]) != save_id):
            continue
        if len(parts) > 2 and parts[2] and int(parts[2]) != rank:
            continue
        raise InjectedFault(f"injected fault at '{name}' on rank {rank}")
