"""``AsyncCheckpointer`` and ``PendingCheckpoint``: lifetime, staging, backpressure.

A save on the trainer side is: flatten, take a staging slot (waiting while
``max_in_flight`` saves still hold theirs), copy into it, send the worker a
small request, return. The worker's replies arrive on a listener thread:
``Released`` frees the slot, ``Finished`` resolves the pending checkpoint.
This class never touches files.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ._faults import kill_point
from ._gc import gc_paused
from .errors import CheckpointError
from .layout_cache import LayoutCache, Prepared
from .pending import PendingCheckpoint
from .save_flow import SaveOptions
from .staging import StagingPool, StagingSlot
from .state_dict import flatten
from .storage import Storage, detect_storage
from .worker.client import WorkerClient, WorkerDiedError
from .worker.group import WorkerGroup, join_worker_group
from .worker.messages import DropSlot, Finished, LocalFailure, Released, SaveRequest, WorkerConfig

__all__ = ["AsyncCheckpointer", "PendingCheckpoint"]

log = logging.getLogger("async_ckpt")


@dataclass
class _InFlight:
    pending: PendingCheckpoint
    slot: StagingSlot
    released: bool = False


class AsyncCheckpointer:
    """Saves in the background through one persistent worker process per rank.

    Every rank of ``process_group`` (default: the default group, or none) must
    create its checkpointer and call ``save`` in the same order.
    ``max_in_flight`` bounds how many saves may be staged but not yet written,
    and so the staging memory (``max_in_flight`` copies of the state dict).
    ``start=True`` starts the worker now, so the first save does not pay for
    it (collective when there are several ranks). ``timeout`` bounds every wait
    on another rank's worker. ``worker_nice`` is added to the worker's niceness:
    the default yields the cores to training, so a save slows training steps
    little; lower it if checkpoints must become durable sooner on busy cores.
    """

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        max_in_flight: int = 1,
        *,
        storage: Storage | None = None,
        timeout: float = 600.0,
        start: bool = False,
        allow_pickle: bool = False,
        verify_replicas: bool = False,
        pin_memory: bool | None = None,
        close_timeout: float = 600.0,
        worker_start_timeout: float = 120.0,
        worker_nice: int = 15,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self._pg = process_group
        self._storage = storage
        self._timeout = timeout
        self._close_timeout = close_timeout
        self._start_timeout = worker_start_timeout
        self._worker_nice = worker_nice
        self._options = SaveOptions(allow_pickle=allow_pickle, verify_replicas=verify_replicas)
        self._pool = StagingPool(max_in_flight, pin=pin_memory)
        self._lock = threading.RLock()
        self._inflight: dict[int, _InFlight] = {}
        self._next_save = 0
        self._group: WorkerGroup | None = None
        self._worker: WorkerClient | None = None
        self._closed = False
        self._stream: Any = None
        self._stager = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="async_ckpt-stage")
        self._layouts = LayoutCache()
        self.worker_starts = 0
        if start:
            self.start()

    # ------------------------------------------------------------- lifetime

    def start(self, state_dict: dict[str, Any] | None = None) -> None:
        """Start the background worker now (idempotent).

        Given a ``state_dict`` shaped like the ones that will be saved, also
        allocate and map its staging buffers and hand them and its plan to the
        worker, so that the first save costs what later saves cost (backing
        fresh shared memory takes several times a warm copy).
        """
        with self._lock:
            worker = self._ensure_worker()
        if state_dict is None:
            return
        with gc_paused():
            flat = flatten(state_dict, allow_pickle=self._options.allow_pickle)
            prepared = self._layouts.prepare(
                flat, allow_pickle=self._options.allow_pickle, verify_replicas=self._options.verify_replicas
            )
            slot, _ = self._pool.acquire(prepared.layout, timeout=self._timeout)
            try:
                self._hand_over(worker, slot, prepared)
            finally:
                self._pool.release(slot)

    @property
    def worker_pid(self) -> int | None:
        w = self._worker
        return w.pid if w is not None and w.alive else None

    def _ensure_worker(self) -> WorkerClient:
        if self._closed:
            raise CheckpointError("this AsyncCheckpointer is closed")
        if self._group is None:
            self._group = join_worker_group(self._pg, self._timeout)
        if self._worker is not None and self._worker.alive:
            return self._worker
        g = self._group
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
        )
        worker = WorkerClient(config, self._on_message, self._on_exit)
        worker.start(self._start_timeout)
        self._worker = worker
        self.worker_starts += 1
        return worker

    def close(self, timeout: float | None = None) -> None:
        """Wait for in-flight saves (up to ``timeout``), then stop the worker and free buffers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [f.pending for f in self._inflight.values()]
        limit = self._close_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        for p in pending:
            try:
                p.result(max(0.0, deadline - time.monotonic()))
            except concurrent.futures.TimeoutError:
                log.warning("async_ckpt: close() gave up waiting for %r after %.0fs", p, limit)
                break
            except Exception:  # noqa: BLE001 - the save's own caller sees its error
                pass
        worker = self._worker
        if worker is not None:
            worker.stop(max(1.0, min(30.0, deadline - time.monotonic())))
        with self._lock:
            for f in list(self._inflight.values()):
                f.pending._fail(CheckpointError("the AsyncCheckpointer was closed before this save finished"))
            self._inflight.clear()
        self._stager.shutdown(wait=True)
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
    ) -> PendingCheckpoint:
        """Stage ``state_dict`` and return; the write happens in the background.

        Blocks until staged (the caller may then modify its tensors), unless
        ``overlap=True``: then staging runs on a helper thread and the caller
        must wait for ``pending.staged`` before modifying the tensors (before
        the next optimizer step).
        """
        with gc_paused():
            job = self._prepare(state_dict, checkpoint_id, storage)
            if overlap:
                self._stager.submit(self._stage_and_send, job)
            else:
                self._stage_and_send(job)
                job.pending.staged.wait()
        return job.pending

    async def async_save(
        self,
        state_dict: dict[str, Any],
        checkpoint_id: Any,
        *,
        overlap: bool = False,
        storage: Storage | None = None,
    ) -> PendingCheckpoint:
        """``save`` for asyncio loops: waits for staging (and for a free buffer) without blocking the loop."""
        with gc_paused():
            job = self._prepare(state_dict, checkpoint_id, storage)
        fut = asyncio.wrap_future(self._stager.submit(self._stage_and_send, job))
        if not overlap:
            await fut
            await job.pending.staged
        return job.pending

    def _prepare(self, state_dict: dict[str, Any], checkpoint_id: Any, storage: Storage | None) -> _Job:
        t0 = time.perf_counter()
        with self._lock:
            if self._closed:
                raise CheckpointError("this AsyncCheckpointer is closed")
            save_id = self._next_save
            self._next_save += 1
        pending = PendingCheckpoint(checkpoint_id, save_id)
        try:
            backend, location = detect_storage(checkpoint_id, storage or self._storage)
            flat = flatten(state_dict, allow_pickle=self._options.allow_pickle)
            prepared = self._layouts.prepare(
                flat,
                allow_pickle=self._options.allow_pickle,
                verify_replicas=self._options.verify_replicas,
            )
        except BaseException as exc:
            # The other ranks' workers must still hear about this save, or they
            # would wait for this rank at the commit barrier until the timeout.
            self._report_local_failure(save_id, exc)
            raise
        return _Job(pending, backend, location, prepared, t0)

    def _report_local_failure(self, save_id: int, exc: BaseException) -> None:
        try:
            with self._lock:
                worker = self._ensure_worker()
            worker.send(LocalFailure(save_id, f"{type(exc).__name__}: {exc}"))
        except Exception:
            log.debug("async_ckpt: could not report a local failure", exc_info=True)

    def _stage_and_send(self, job: _Job) -> None:
        pending = job.pending
        try:
            with self._lock:
                worker = self._ensure_worker()
            slot, waited = self._pool.acquire(job.prepared.layout, timeout=self._timeout)
            try:
                self._hand_over(worker, slot, job.prepared)
                t_stage = time.perf_counter()
                rank = self._group.rank if self._group is not None else 0
                tensors = job.prepared.local.tensors
                event = slot.copy_in(
                    tensors,
                    self._cuda_stream(job.prepared.on_cuda),
                    on_half=lambda: kill_point("stage", pending.save_id, rank),
                )
                if event is not None:
                    event.synchronize()
                stage_s = time.perf_counter() - t_stage
                with self._lock:
                    self._inflight[pending.save_id] = _InFlight(pending, slot)
                worker.send(
                    SaveRequest(
                        save_id=pending.save_id,
                        slot_id=slot.slot_id,
                        layout_key=job.prepared.layout.key,
                        layout_id=job.prepared.layout_id,
                        storage=job.storage,
                        location=job.location,
                        values=job.prepared.local.values,
                        options=self._options,
                        stage_s=stage_s,
                        stall_s=time.perf_counter() - job.t0,
                    )
                )
            except BaseException:
                with self._lock:
                    self._inflight.pop(pending.save_id, None)
                self._pool.release(slot)
                raise
            kill_point("staged", pending.save_id, rank)
            if waited > 0.001:
                log.info("async_ckpt: save %d waited %.3fs for a staging buffer", pending.save_id, waited)
            pending.staged._future.set_result(stage_s)
        except BaseException as exc:
            err = exc if isinstance(exc, CheckpointError) else CheckpointError(f"staging failed: {exc}")
            if err is not exc:
                err.__cause__ = exc
            pending._fail(err)
            if not isinstance(exc, Exception):
                raise

    def _hand_over(self, worker: WorkerClient, slot: StagingSlot, prepared: Prepared) -> None:
        """Make sure the worker maps ``slot`` and knows the plan; drop what it no longer needs."""
        # A slot evicted for another layout is free here, but its memory lives on
        # until the worker unmaps it too: 64 MiB per layout change otherwise.
        for slot_id in self._pool.take_evicted():
            worker.send(DropSlot(slot_id))
        if slot.registered_with != worker.pid:
            worker.register(slot)
        worker.register_layout(prepared.layout_id, prepared.local.plan, prepared.tree)

    def _cuda_stream(self, on_cuda: bool) -> Any:
        if not on_cuda:
            return None
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    # ----------------------------------------------------- worker callbacks

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, Released):
            with self._lock:
                f = self._inflight.get(msg.save_id)
                if f is not None and not f.released:
                    f.released = True
                    self._pool.release(f.slot)
        elif isinstance(msg, Finished):
            with self._lock:
                f = self._inflight.pop(msg.save_id, None)
                if f is not None and not f.released:
                    f.released = True
                    self._pool.release(f.slot)
            if f is None:
                return
            if msg.metadata is not None:
                f.pending._future.set_result(msg.metadata)
                s = msg.metadata.stats
                if s is not None:
                    log.info(
                        "async_ckpt: saved %s (save %d): %s",
                        f.pending.checkpoint_id,
                        msg.save_id,
                        s.describe(),
                    )
            else:
                err = CheckpointError(
                    f"saving {f.pending.checkpoint_id} failed in the background worker: "
                    f"{msg.error_type}: {msg.error}"
                )
                err.__cause__ = RemoteError(msg.traceback)
                f.pending._future.set_exception(err)

    def _on_exit(self, worker: WorkerClient, reason: str) -> None:
        with self._lock:
            if worker is not self._worker:
                return
            lost = list(self._inflight.values())
            self._inflight.clear()
            for f in lost:
                if not f.released:
                    self._pool.release(f.slot)
        for f in lost:
            f.pending._fail(
                WorkerDiedError(
                    f"{reason} while saving {f.pending.checkpoint_id}; the save did not complete "
                    "(it is committed only if the worker died after writing metadata.json: "
                    "read_metadata tells). The next save starts a new worker."
                )
            )


class RemoteError(Exception):
    """The traceback of an error raised in the worker process."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


@dataclass
class _Job:
    pending: PendingCheckpoint
    storage: Storage
    location: str
    prepared: Prepared
    t0: float
