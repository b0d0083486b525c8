"""The worker process: one per trainer rank, persistent, with its own event loop.

It maps the trainer's staging segments once per slot, joins the other ranks'
workers over a store of their own (never the trainer's process group), and
runs saves one at a time, in request order (every rank's worker sees the same
order, which the collectives rely on). A reader thread turns pipe messages
into queue items, so the loop stays free for the writer pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import traceback
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from typing import Any

from .._gc import gc_paused
from ..buffer_layout import Layout
from ..dist import Comm, LocalComm
from ..writer.loop import new_event_loop
from .comm import StoreComm
from .kvclient import StoreClient
from .messages import (
    DropLayout,
    DropSlot,
    Finished,
    LocalFailure,
    Ready,
    RegisterLayout,
    RegisterSlot,
    Released,
    Round,
    RoundsAbort,
    RoundsBegin,
    SaveRequest,
    Shutdown,
    StageOnly,
    WorkerConfig,
)
from .priority import lower_priority
from .save_job import SaveJobRunner
from .views import byte_views, close_maps, map_segments

__all__ = ["entry", "worker_main"]


class _MappedSlot:
    def __init__(self, layout: Layout, fds: list[int]) -> None:
        self.layout = layout
        self.maps = map_segments(fds, layout.segment_sizes)
        self.specs = {s.key: s for s in layout.specs}
        self.views = byte_views(self.maps, layout.specs)

    def close(self) -> None:
        views = list(self.views.values())
        self.views.clear()
        close_maps(self.maps, views)


def entry(fd: int) -> None:
    """``python -c 'from async_ckpt.worker.main import entry; entry(FD)'``: FD is our socket."""
    conn = Connection(fd)
    try:
        config = conn.recv()
    except (EOFError, OSError):
        return  # the trainer went away before we started: nothing to do, nothing to say
    if not isinstance(config, WorkerConfig):
        raise SystemExit("async_ckpt worker: expected a WorkerConfig first")
    worker_main(conn, config)


def _reply(conn: Connection, msg: Any) -> None:
    """Send ``msg`` to the trainer, if it is still there.

    A trainer gone (a second Ctrl-C, a crash) is no error of ours: the saves it
    staged still complete, and the worker exits quietly once its pipe is read
    to the end, instead of printing a BrokenPipeError traceback.
    """
    with contextlib.suppress(OSError):  # BrokenPipeError, ConnectionResetError
        conn.send(msg)


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    # Ctrl-C goes to the whole process group; the trainer decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s async_ckpt.worker[%(process)d] %(message)s"
    )
    # First, before this process starts threads of its own: they inherit it.
    lower_priority(config.nice, config.idle)
    comm = _connect(config)
    try:
        conn.send(Ready(os.getpid()))
    except OSError:
        return  # the trainer gave up waiting for us, or is gone
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(conn, comm, config))


def _connect(config: WorkerConfig) -> Comm:
    if config.world_size == 1 or config.store_host is None or config.store_port is None:
        return LocalComm()
    store = StoreClient(config.store_host, config.store_port, config.store_secret, config.timeout)
    return StoreComm(
        store,
        config.rank,
        config.world_size,
        timeout=config.timeout,
        prefix=config.store_prefix,
        address=f"{config.store_host}:{config.store_port}",
    )


async def _serve(conn: Connection, comm: Comm, config: WorkerConfig) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
    slots: dict[int, _MappedSlot] = {}

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
                if isinstance(msg, RegisterSlot):
                    fds = [recv_handle(conn) for _ in msg.layout.segment_sizes]
                    msg = (msg, fds)
            except (EOFError, OSError):
                msg = Shutdown()  # the trainer is gone
            asyncio.run_coroutine_threadsafe(queue.put(msg), loop).result()
            if isinstance(msg, Shutdown):
                return

    threading.Thread(target=reader, name="async_ckpt-worker-pipe", daemon=True).start()
    runner = SaveJobRunner(comm, config.session)
    layouts: dict[str, RegisterLayout] = {}  # kept until the trainer drops them (worker/client.py)
    while True:
        msg = await queue.get()
        if isinstance(msg, Shutdown):
            break
        if _admin(msg, slots, layouts):
            pass
        elif isinstance(msg, SaveRequest):
            await _one_save(conn, runner, msg, slots, layouts.get(msg.layout_id))
        elif isinstance(msg, LocalFailure):
            # No reply: the trainer already raised. This only fails the other ranks promptly.
            with contextlib.suppress(Exception):
                await runner.fail(msg.save_id, msg.error)
        elif isinstance(msg, RoundsBegin):
            if not await _rounds_save(conn, runner, msg, slots, layouts, queue):
                break
        elif isinstance(msg, (Round, RoundsAbort)):
            pass  # sent for a budgeted save that had already failed here: nothing reads it
    for slot in slots.values():
        slot.close()


def _admin(msg: Any, slots: dict[int, _MappedSlot], layouts: dict[str, RegisterLayout]) -> bool:
    """Handle a message that maps or forgets slots and layouts; False for any other message."""
    if isinstance(msg, tuple):
        reg, fds = msg
        if reg.slot_id in slots:
            slots.pop(reg.slot_id).close()
        slots[reg.slot_id] = _MappedSlot(reg.layout, fds)
    elif isinstance(msg, DropSlot):
        if msg.slot_id in slots:
            slots.pop(msg.slot_id).close()
    elif isinstance(msg, RegisterLayout):
        layouts[msg.layout_id] = msg
    elif isinstance(msg, DropLayout):
        layouts.pop(msg.layout_id, None)
    else:
        return False
    return True


async def _rounds_save(
    conn: Connection,
    runner: SaveJobRunner,
    begin: RoundsBegin,
    slots: dict[int, _MappedSlot],
    layouts: dict[str, RegisterLayout],
    queue: asyncio.Queue[Any],
) -> bool:
    """A budgeted save (``rounds.py``); False when the trainer stopped the worker during it."""
    req = begin.request
    stopped = False

    async def next_round() -> Round | RoundsAbort | None:
        nonlocal stopped
        while True:
            msg = await queue.get()
            if isinstance(msg, Shutdown):
                stopped = True
                return None
            if isinstance(msg, (Round, RoundsAbort)):
                if msg.save_id == req.save_id:
                    return msg
            elif not _admin(msg, slots, layouts):  # the trainer sends the next save after the last round
                raise RuntimeError(
                    f"{type(msg).__name__} arrived in the middle of save {req.save_id}'s rounds"
                )

    try:
        slot, layout = _registered(req, slots, layouts.get(req.layout_id))
        with gc_paused():
            md = await runner.run_rounds(
                req, layout.plan, layout.tree, slot.maps, next_round, lambda m: _reply(conn, m), begin.staged
            )
        if runner.stage_only is not None:
            # Before Finished: the trainer's next save of this layout stages only these.
            _reply(conn, StageOnly(req.save_id, req.layout_id, runner.stage_only))
        reply = Finished(req.save_id, metadata=md)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the trainer
        reply = _failed(req.save_id, exc)
    _reply(conn, Released(req.save_id))
    _reply(conn, reply)
    return not stopped


async def _one_save(
    conn: Connection,
    runner: SaveJobRunner,
    req: SaveRequest,
    slots: dict[int, _MappedSlot],
    layout: RegisterLayout | None,
) -> None:
    try:
        slot, registered = _registered(req, slots, layout)
        with gc_paused():
            md = await runner.run(req, registered.plan, registered.tree, slot.specs, slot.views)
        if runner.stage_only is not None:
            # Before Finished: the trainer's next save of this layout stages only these.
            _reply(conn, StageOnly(req.save_id, req.layout_id, runner.stage_only))
        reply = Finished(req.save_id, metadata=md)
    except Exception as exc:  # noqa: BLE001 - every failure goes back to the trainer
        reply = _failed(req.save_id, exc)
    _reply(conn, Released(req.save_id))
    _reply(conn, reply)


def _registered(
    req: SaveRequest, slots: dict[int, _MappedSlot], layout: RegisterLayout | None
) -> tuple[_MappedSlot, RegisterLayout]:
    """The slot and layout ``req`` names, which the trainer registered before sending it."""
    slot = slots.get(req.slot_id)
    if slot is None:
        raise RuntimeError(f"staging slot {req.slot_id} was never registered with this worker")
    if layout is None:
        raise RuntimeError(f"layout {req.layout_id} was never registered with this worker")
    return slot, layout


def _failed(save_id: int, exc: BaseException) -> Finished:
    return Finished(
        save_id,
        error=str(exc),
        error_type=type(exc).__name__,
        error_fields=_public_fields(exc),
        traceback="".join(traceback.format_exception(exc)),
    )


def _public_fields(exc: BaseException) -> tuple[tuple[str, Any], ...]:
    """The attributes a caller may read on the error (``RankTimeoutError.ranks`` ...), to rebuild it there."""
    return tuple((k, v) for k, v in vars(exc).items() if not k.startswith("_") and k in _CARRIED_FIELDS)


_CARRIED_FIELDS = frozenset({"ranks", "failures"})
