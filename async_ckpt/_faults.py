"""Deterministic fault injection for crash-consistency tests.

``ASYNC_CKPT_KILL_AT=<point>[:<save id>[:<rank>]]`` makes the process that
reaches ``<point>`` (for that save, on that rank) SIGKILL itself there. Trainer
points: ``stage`` (half way through the staging copy) and ``staged`` (after
the request reached the worker). Worker points: ``plan``, ``write`` (after
this rank's shards are written), ``before_commit`` and ``after_commit``.
Unset, each check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_ENV", "kill_point"]

KILL_ENV = "ASYNC_CKPT_KILL_AT"


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
