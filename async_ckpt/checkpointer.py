"""``AsyncCheckpointer`` and ``PendingCheckpoint``: lifetime, staging, backpressure.

A save on the trainer side is: flatten, look up the cached plan, then
(``stage_send.py``) take a staging slot (waiting while ``max_in_flight``
saves still hold theirs), copy into it, send the worker a small request,
return. The worker's replies arrive on a listener thread: ``Released``
frees the slot, ``Finished`` resolves the pending checkpoint.
This class never touches files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from typing import Any, Literal

import torch

from ._gc import gc_paused
from .errors import CheckpointError
from .inflight import InFlightSaves, RemoteError
from .layout_cache import LayoutCache
from .overlap_guard import GuardArg, check_guard, guard_step, optimizers_to_guard
from .pending import PendingCheckpoint
from .save_options import SaveOptions
from .save_target import check_save_target
from .single_rank import ProcessGroupArg, SingleRank, check_whole_on_this_rank
from .stage_send import Job, StageSender
from .staged_rounds import buffer_layout, piece_bytes
from .staging import DeviceCopies, StagingPool
from .state_dict import flatten
from .storage import Storage, detect_storage
from .worker.client import WorkerClient, WorkerDiedError
from .worker.group import WorkerGroup, join_worker_group
from .worker.messages import LocalFailure, WorkerConfig
from .worker.starter import BackgroundStart

__all__ = ["AsyncCheckpointer", "PendingCheckpoint", "RemoteError", "WorkerDiedError"]

log = logging.getLogger("async_ckpt")


class AsyncCheckpointer:
    """Saves in the background through one persistent worker process per rank.

    Every rank of ``process_group`` (default: the default group, or none) must
    create its checkpointer and call ``save`` in the same order; with
    ``SINGLE_RANK`` this rank saves alone (its worker joins no other rank's).
    ``max_in_flight`` bounds how many saves may be staged but not yet written,
    and so the staging memory (``max_in_flight`` copies of the state dict).
    ``start`` says when the worker starts: ``"background"`` (the default) on a
    thread now, so the constructor returns at once and the first save (or
    ``start()``) waits only for what is left of the start, raising its error if
    it failed (a later save tries again); ``True`` now, waiting for it; ``False``
    at the first save. The start is collective when there are several ranks: every
    rank creates its checkpointers in the same order. ``timeout`` bounds every wait
    on another rank's worker. ``worker_nice`` is added to the worker's niceness:
    the default yields the cores to training, so a save slows training steps
    little; lower it if checkpoints must become durable sooner on busy cores.
    ``worker_idle=True`` also puts the worker under ``SCHED_IDLE`` and the idle
    I/O class where the OS allows: it then runs only on CPU and disk time
    nothing else wants, which slows training steps less during a save, but a
    trainer that keeps every core busy can starve it for minutes (and the
    other ranks' workers may time out waiting for it); hence off by default.
    ``staging_budget`` (bytes; the same on every rank) bounds the staging
    memory per save in flight: a state that needs more is staged round by
    round (``staged_rounds.py``), each round written before its memory is
    reused, so the call stalls longer; after a layout's first save only the
    items this rank writes are staged, as without a budget.

    Threads and who owns what. The caller's thread (or, for ``overlap`` and
    ``async_save``, the single staging thread) prepares, stages and sends a
    save; each worker's listener thread handles its replies and its exit.
    ``_lock`` guards ``_inflight``, ``_started``, ``_worker``, ``_bg`` (the
    background start, until a save or ``close`` takes it) and the closing
    flags. A staging slot belongs to the staging thread from ``acquire`` until
    it publishes the save's record in ``_inflight``; from then on it belongs to
    the record, which returns it to the pool once (see ``inflight.py``).
    """

    def __init__(
        self,
        process_group: ProcessGroupArg = None,
        max_in_flight: int = 1,
        *,
        storage: Storage | None = None,
        timeout: float = 600.0,
        start: bool | Literal["background"] = "background",
        allow_pickle: bool = False,
        verify_replicas: bool = False,
        pin_memory: bool | None = None,
        close_timeout: float = 600.0,
        worker_start_timeout: float = 120.0,
        worker_nice: int = 15,
        worker_idle: bool = False,
        staging_budget: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if start not in (True, False, "background"):
            raise ValueError(f"start must be True, False or 'background', got {start!r}")
        self._budget = _check_budget(staging_budget)
        self._owner_pid = os.getpid()
        self._pg = process_group
        self._storage = storage
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._start_timeout = worker_start_timeout
        self._worker_nice = worker_nice
        self._worker_idle = worker_idle
        self._options = SaveOptions(allow_pickle=allow_pickle, verify_replicas=verify_replicas)
        self._pool = StagingPool(max_in_flight, pin=pin_memory)
        self._lock = threading.RLock()
        self._inflight = InFlightSaves(self._pool, self._lock)
        self._started: dict[int, PendingCheckpoint] = {}
        """Every save from ``_prepare`` until its pending settles: what ``close`` waits for."""
        self._next_save = 0
        self._group: WorkerGroup | None = None
        self._worker: WorkerClient | None = None
        self._closed = False
        """No new saves; those already started go on."""
        self._stopping = False
        """The worker is being stopped: no new one may start."""
        self._streams: dict[int, Any] = {}
        """The side stream that stages from each CUDA device (``DeviceCopies``)."""
        self._stager = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-stage")
        self._tail: concurrent.futures.Future[None] | None = None
        """The last job handed to the staging thread (the worker must hear of saves in order)."""
        # Under a budget, a tensor larger than half of it is planned as several chunks, so that
        # the rounds' buffer stays within the budget (staged_rounds.py).
        self._layouts = LayoutCache(split_bytes=None if self._budget is None else piece_bytes(self._budget))
        self._sender = StageSender(
            pool=self._pool,
            inflight=self._inflight,
            layouts=self._layouts,
            options=self._options,
            budget=self._budget,
            timeout=timeout,
            worker=self._locked_worker,
            rank=lambda: self._group.rank if self._group is not None else 0,
            report_failure=self._report_local_failure,
        )
        self.worker_starts = 0
        """Workers started and taken into use (a background start counts when a save takes it)."""
        self._bg: BackgroundStart | None = None
        if start == "background":
            self._bg = BackgroundStart(process_group, timeout, worker_start_timeout, self._new_worker)
        elif start:
            self.start()

    # ------------------------------------------------------------- lifetime

    def start(self, state_dict: dict[str, Any] | None = None) -> None:
        """Start the background worker now (idempotent); after a background start, wait for it.

        Given a ``state_dict`` shaped like the ones that will be saved, also
        allocate and map its staging buffers and hand them and its plan to the
        worker, so that the first save costs what later saves cost (backing
        fresh shared memory takes several times a warm copy).
        """
        self._check_process()
        with self._lock:
            if self._closed:
                raise CheckpointError("this AsyncCheckpointer is closed")
            worker = self._ensure_worker()
        if state_dict is None:
            return
        with gc_paused():
            flat = flatten(state_dict, allow_pickle=self._options.allow_pickle)
            prepared = self._layouts.prepare(
                flat, allow_pickle=self._options.allow_pickle, verify_replicas=self._options.verify_replicas
            )
            layout = prepared.layout
            if self._budget is not None:
                layout = buffer_layout(prepared.local.tensors, self._budget)
            slot, _ = self._pool.acquire(layout, timeout=self._timeout, cuda_devices=prepared.cuda_devices)
            try:
                self._sender.hand_over(worker, slot, prepared)
            finally:
                self._pool.release(slot)

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return w.pid if w is not None and w.alive else None

    @property
    def staging_bytes(self) -> int:
        """Bytes of staging memory this rank's pool holds now (shared with its worker).

        At most ``max_in_flight`` buffers. With replica-sharded staging (the
        default; ``docs/api.md``) each is about this rank's share of the state
        dict, after the first save of a layout; with ``staging_budget``, each is
        within the budget (or the largest tensor, if that is larger).
        """
        return self._pool.held_bytes()

    @property
    def staging_allocations(self) -> int:
        """How many staging buffers this checkpointer has allocated: a steady state adds none."""
        return self._pool.allocations

    def _check_process(self) -> None:
        if os.getpid() != self._owner_pid:
            raise CheckpointError(
                f"this AsyncCheckpointer belongs to process {self._owner_pid}, and this process "
                f"({os.getpid()}) is a fork() of it: its worker and staging buffers are the "
                "parent's. Create a new AsyncCheckpointer in the child"
            )

    def _locked_worker(self) -> WorkerClient:
        with self._lock:
            return self._ensure_worker()

    def _ensure_worker(self) -> WorkerClient:
        if self._stopping:
            raise CheckpointError("this AsyncCheckpointer is closed")
        if self._bg is not None:
            self._take_background()
        if self._group is None:
            self._group = join_worker_group(self._pg, self._timeout)
        if self._worker is not None and self._worker.alive:
            return self._worker
        worker = self._new_worker(self._group)
        worker.start(self._start_timeout)
        self._worker = worker
        self.worker_starts += 1
        return worker

    def _take_background(self) -> None:
        """Take what the constructor's background start gave (waiting for it), or raise why it failed."""
        bg, self._bg = self._bg, None
        assert bg is not None
        group, worker, error = bg.outcome()
        if group is not None:
            self._group = group
        if worker is not None:
            self._worker = worker
            self.worker_starts += 1
        if error is not None:
            raise error

    def _new_worker(self, g: WorkerGroup) -> WorkerClient:
        """A client for a worker in group ``g``, not started yet (also called on the start thread)."""
        config = WorkerConfig(
            rank=g.rank,
            world_size=g.world_size,
            store_host=g.host,
            store_port=g.port,
            store_prefix=f"{g.session}/",
            session=g.session,
            timeout=self._timeout,
            log_level=logging.getLogger("async_ckpt").getEffectiveLevel(),
            nice=self._worker_nice,
            idle=self._worker_idle,
            store_secret=g.secret,
        )
        return WorkerClient(config, self._inflight.on_message, self._inflight.on_exit)

    def close(self, timeout: float | None = None) -> None:
        """Wait for every save started (up to ``timeout``), then stop the worker and free buffers.

        That includes saves still staging on the helper thread (``overlap=True``
        or ``async_save``). In a ``fork()``ed child this does nothing: the
        worker and the buffers are the parent's.
        """
        if os.getpid() != self._owner_pid:
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = list(self._started.values())
        limit = self._close_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for p in started:
            try:
                p.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                log.warning("async_ckpt: close() gave up waiting for %r after %.0fs", p, limit)
                break
            except Exception:  # noqa: BLE001 - the save's own caller sees its error
                pass
        with self._lock:
            self._stopping = True
            worker = self._worker
            bg, self._bg = self._bg, None
        if bg is not None:  # never taken by a save: stop the start, or its worker
            bg.cancel(max(1.0, min(30.0, deadline - time.monotonic())))
        if worker is not None:
            worker.stop(max(1.0, min(30.0, deadline - time.monotonic())))
        # A save still waiting for a buffer gives up; one still copying finishes
        # before its memory is unmapped below.
        self._pool.interrupt()
        with self._lock:
            unfinished = list(self._started.values())
        for p in unfinished:
            p._fail(CheckpointError("the AsyncCheckpointer was closed before this save finished"))
        self._stager.shutdown(wait=True)
        self._inflight.clear()
        self._pool.close()
        if self._group is not None:
            self._group.close()

    def __enter__(self) -> AsyncCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AsyncCheckpointer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # ---------------------------------------------------------------- saves

    def save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: Any,
        *,
        overlap: bool = False,
        storage: Storage | None = None,
        guard: GuardArg = True,
    ) -> PendingCheckpoint:
        """Stage ``state_dict`` and return; the write happens in the background.

        Blocks until staged (the caller may then modify its tensors), unless
        ``overlap=True``: then staging runs on a helper thread and the call
        returns at once. The next ``step()`` of every optimizer in the state
        dict (directly, in its containers, or held by a ``Stateful`` wrapper)
        then waits for the copy; ``guard=[opt, ...]`` adds optimizers it cannot
        see, ``guard=False`` turns that off. Other in-place changes (BatchNorm
        statistics in forward, EMA updates) must wait for ``pending.staged``.
        """
        with gc_paused():
            explicit = check_guard(guard)
            job = self._prepare(state_dict, checkpoint_id, storage)
            if overlap:
                guard_step(optimizers_to_guard(job.statefuls, guard, explicit), job.pending.staged)
                self._submit(self._sender.send, job)
            else:
                # Saves reach the worker in order: earlier overlapped ones first.
                tail = self._tail
                if tail is not None:
                    concurrent.futures.wait([tail])
                self._sender.send(job)
                job.pending.staged.wait()
        return job.pending

    async def async_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: Any,
        *,
        overlap: bool = False,
        storage: Storage | None = None,
        guard: GuardArg = True,
    ) -> PendingCheckpoint:
        """``save`` for asyncio loops: waits for staging (and for a free buffer) without blocking the loop.

        ``overlap`` and ``guard`` as for ``save``. Cancelling the awaiting task
        ends the wait only: the save goes on.
        """
        with gc_paused():
            explicit = check_guard(guard)
            job = self._prepare(state_dict, checkpoint_id, storage)
            if overlap:
                guard_step(optimizers_to_guard(job.statefuls, guard, explicit), job.pending.staged)
        self._submit(self._sender.send, job)
        if not overlap:
            await job.pending.staged
        return job.pending

    def _submit(self, fn: Any, *args: Any) -> None:
        self._tail = self._stager.submit(fn, *args)

    def _prepare(self, state_dict: dict[str, Any], checkpoint_id: Any, storage: Storage | None) -> Job:
        self._check_process()
        t0 = time.perf_counter()
        with self._lock:
            if self._closed:
                raise CheckpointError("this AsyncCheckpointer is closed")
            save_id = self._next_save
            self._next_save += 1
            pending = PendingCheckpoint(checkpoint_id, save_id)
            self._started[save_id] = pending
        pending.add_done_callback(self._forget)
        try:
            backend, location = detect_storage(checkpoint_id, storage or self._storage)
            check_save_target(backend, location, rank=self._rank_hint())
            flat = flatten(state_dict, allow_pickle=self._options.allow_pickle)
            if isinstance(self._pg, SingleRank):
                check_whole_on_this_rank(flat.entries)
            prepared = self._layouts.prepare(
                flat,
                allow_pickle=self._options.allow_pickle,
                verify_replicas=self._options.verify_replicas,
            )
        except BaseException as exc:
            pending._fail(exc)  # nobody holds it; settling it lets close() skip it
            # The other ranks' workers must still hear about this save, or they
            # would wait for this rank at the commit barrier until the timeout;
            # through the staging thread, after any save still staging there.
            with contextlib.suppress(RuntimeError):  # the stager is shut down: closing
                self._submit(self._report_local_failure, save_id, exc)
            raise
        # On this thread, before the call returns: what the copies must wait for.
        d2h = DeviceCopies(self._streams, prepared.cuda_devices) if prepared.cuda_devices else None
        return Job(pending, backend, location, prepared, t0, flat.statefuls, d2h)

    def _rank_hint(self) -> int | None:
        """This rank in the saving group, known without a collective; None when it saves alone."""
        if isinstance(self._pg, SingleRank) or not torch.distributed.is_initialized():
            return None
        if self._group is not None:
            return self._group.rank
        return torch.distributed.get_rank(self._pg)

    def _forget(self, pending: PendingCheckpoint) -> None:
        with self._lock:
            self._started.pop(pending.save_id, None)

    def _report_local_failure(self, save_id: int, exc: BaseException) -> None:
        try:
            with self._lock:
                if self._bg is not None:
                    self._take_background()
                if self._group is None:
                    self._group = join_worker_group(self._pg, self._timeout)
                if self._group.world_size == 1:
                    return
                worker = self._ensure_worker()
            worker.send(LocalFailure(save_id, f"{type(exc).__name__}: {exc}"))
        except Exception:
            log.debug("async_ckpt: could not report a local failure", exc_info=True)


def _check_budget(budget: int | None) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise TypeError(
            f"staging_budget must be a number of bytes (int) or None, got {type(budget).__qualname__}"
        )
    if budget <= 0:
        raise ValueError(f"staging_budget must be positive, got {budget}")
    return budget
