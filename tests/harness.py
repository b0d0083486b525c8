"""Run a function on N spawned processes joined in a gloo process group.

    results = run_ranks(2, _body, tmp_path)      # _body(rank, world_size, tmp_path)

The parent hosts the TCPStore on a port the OS picks (port 0), so there is no
free-port race; children join it, initialise gloo, run the body (a plain or an
``async def`` function), and send back its result or traceback. Any rank's
failure fails the test with that rank's traceback; stragglers are killed after
the timeout; shared memory the children leave behind is reported.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

__all__ = ["RankFailed", "run_ranks"]


class RankFailed(AssertionError):
    pass


def _child(
    rank: int,
    world: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    out: Any,
    pg_timeout: float,
) -> None:
    try:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=timedelta(seconds=60))
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=pg_timeout)
        )
        try:
            result = fn(rank, world, *args)
            if inspect.iscoroutine(result):
                result = asyncio.run(result)
        finally:
            dist.destroy_process_group()
        out.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        out.put((rank, "error", traceback.format_exc()))


def run_ranks(
    world: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 180.0,
    pg_timeout: float = 60.0,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` processes; return results by rank."""
    ctx = mp.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_child, args=(r, world, store.port, fn, args, out, pg_timeout), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, status, payload = out.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RankFailed(
                        f"rank(s) {dead} died with exit code(s) {[procs[r].exitcode for r in dead]}"
                    ) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world)) - set(results))
                    raise RankFailed(f"rank(s) {missing} did not finish within {timeout:.0f}s") from None
                continue
            if status == "error":
                raise RankFailed(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        out.close()
        del store
    return [results[r] for r in range(world)]
