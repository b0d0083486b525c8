"""Pools of spawned rank processes, one per world size, reused across tests.

The parent hosts a TCPStore on a port the OS picks (port 0: no free-port race).
Each rank process joins it once, initialises gloo, then serves calls sent over
its own pipe until told to stop. A call that fails or times out on any rank
ends the whole pool: a rank that raised may have left its peers inside a
collective, so the group is no longer trusted and the next call spawns afresh.

torch is imported only when a pool starts, so the pytest plugin that imports
this module stays cheap.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from ._call import DEFAULT_PG_TIMEOUT, Call

__all__ = ["Call", "RankFailed", "RankPool", "close_pools", "get_pool", "run_call"]

# After one rank fails, how long the others get to report before they are
# presumed stuck in a collective with it.
_FAIL_GRACE_S = 3.0
# Pools kept alive at once: each rank process holds a torch import (~200 MB).
MAX_POOLS = 2
# Set by the plugin's --ranks-fresh: every call spawns its own processes (to
# compare against, or to rule the pool out when a test misbehaves).
always_fresh = False


class RankFailed(AssertionError):
    """A rank raised, died or did not finish; the message names the rank(s)."""


class RankPool:
    """``world`` spawned rank processes in one gloo group."""

    def __init__(self, world: int) -> None:
        import torch.distributed as dist

        from . import _rank

        self.world = world
        self.broken = False
        self.generation = 0
        self._pg_timeout = DEFAULT_PG_TIMEOUT
        self._dumps = Path(tempfile.mkdtemp(prefix=f"async_ckpt_ranks{world}_"))
        self._store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for r in range(world):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(
                target=_rank.main,
                args=(r, world, self._store.port, child_end, str(self._dumps / f"rank{r}.txt")),
                name=f"async_ckpt-rank{r}of{world}",
                daemon=True,
            )
            p.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(p)

    def run(self, call: Call, timeout: float) -> list[Any]:
        """Run ``call`` on every rank; return the results by rank or raise :class:`RankFailed`."""
        if self.broken:
            raise RuntimeError("this rank pool is closed")
        if call.pg_timeout != self._pg_timeout:
            self.generation += 1
            self._pg_timeout = call.pg_timeout
        try:
            return self._run(call, timeout)
        except BaseException:
            # Interrupted (pytest-timeout, Ctrl-C) or failed: ranks may still be in the
            # call, so their answers would reach the next one. End the pool.
            if not self.broken:
                self.close(kill=True)
            raise

    def _run(self, call: Call, timeout: float) -> list[Any]:
        for conn in self._conns:
            conn.send((self.generation, call))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        grace_end: float | None = None
        waiting = {conn: r for r, conn in enumerate(self._conns)}
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        while waiting:
            end = deadline if grace_end is None else min(deadline, grace_end)
            left = end - time.monotonic()
            if left <= 0:
                break
            live = [s for s, r in sentinels.items() if r in waiting.values()]
            for obj in wait([*waiting, *live], left):
                if isinstance(obj, int):
                    r = sentinels[obj]
                    conn = self._conns[r]
                    if conn in waiting and not conn.poll():
                        errors[r] = f"rank {r} died (exit code {self._procs[r].exitcode})"
                        del waiting[conn]
                    continue
                assert isinstance(obj, Connection)
                if obj not in waiting:
                    continue
                r = waiting.pop(obj)
                try:
                    status, payload, intact = obj.recv()
                except (EOFError, OSError):
                    errors[r] = f"rank {r} died (exit code {self._procs[r].exitcode})"
                    continue
                if status == "ok":
                    results[r] = payload
                    if not intact:
                        # The body left the default group destroyed or changed: every
                        # rank builds a new one before the next call.
                        self.generation += 1
                else:
                    errors[r] = payload
            if errors and grace_end is None:
                grace_end = time.monotonic() + _FAIL_GRACE_S
        if errors or waiting:
            stuck = sorted(waiting.values())
            dumps = self._dump_stacks(stuck)
            self.close(kill=True)
            raise RankFailed(_failure_message(call, timeout, errors, stuck, bool(errors), dumps))
        return [results[r] for r in range(self.world)]

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        """Ask each stuck rank for its Python stacks (faulthandler on SIGUSR1)."""
        if not ranks or not hasattr(signal, "SIGUSR1"):
            return {}
        for r in ranks:
            p = self._procs[r]
            if p.is_alive() and p.pid is not None:
                try:
                    os.kill(p.pid, signal.SIGUSR1)
                except OSError:
                    pass
        time.sleep(1.0)
        out = {}
        for r in ranks:
            try:
                out[r] = (self._dumps / f"rank{r}.txt").read_text(errors="replace")[-6000:]
            except OSError:
                pass
        return out

    def close(self, kill: bool = False) -> None:
        self.broken = True
        if not kill:
            for conn in self._conns:
                try:
                    conn.send(None)
                except OSError:
                    pass
            for p in self._procs:
                p.join(30)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        for conn in self._conns:
            conn.close()
        for f in self._dumps.glob("*"):
            f.unlink(missing_ok=True)
        self._dumps.rmdir()
        del self._store


def _failure_message(
    call: Call, timeout: float, errors: dict[int, str], stuck: list[int], failed: bool, dumps: dict[int, str]
) -> str:
    what = f" in {call.label}" if call.label else ""
    parts = []
    for r in sorted(errors):
        parts.append(f"rank {r} failed{what}:\n{errors[r]}")
    if stuck:
        why = (
            f"still running {_FAIL_GRACE_S:.0f}s after rank(s) {sorted(errors)} failed"
            if failed
            else f"did not finish within {timeout:.0f}s"
        )
        parts.insert(0 if not failed else len(parts), f"rank(s) {stuck} {why}{what}")
        for r, text in dumps.items():
            if text.strip():
                parts.append(f"--- rank {r} stacks when stopped ---\n{text}")
    return "\n\n".join(parts)


_pools: OrderedDict[int, RankPool] = OrderedDict()
_lock = threading.Lock()


def get_pool(world: int) -> RankPool:
    """The live pool of ``world`` ranks, spawned on first use (or after a failure ended it)."""
    with _lock:
        pool = _pools.get(world)
        if pool is not None and not pool.broken:
            _pools.move_to_end(world)
            return pool
        while len(_pools) >= MAX_POOLS:
            _, old = _pools.popitem(last=False)
            if not old.broken:
                old.close()
        pool = _pools[world] = RankPool(world)
        return pool


def close_pools() -> None:
    with _lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        if not pool.broken:
            pool.close()


def run_call(world: int, call: Call, timeout: float, fresh: bool = False) -> list[Any]:
    """Run ``call`` on ``world`` ranks: the shared pool, or a pool of its own when ``fresh``."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    # The ranks were spawned with the environment of an earlier moment; a session
    # fixture may have set variables since (an S3 endpoint and its keys, say).
    call = Call(**{**_fields(call), "sys_path": tuple(sys.path), "env": dict(os.environ)})
    if fresh or always_fresh:
        pool = RankPool(world)
        try:
            return pool.run(call, timeout)
        finally:
            if not pool.broken:
                pool.close()
    return get_pool(world).run(call, timeout)


def _fields(call: Call) -> dict[str, Any]:
    return {name: getattr(call, name) for name in Call.__slots__}  # type: ignore[attr-defined]
