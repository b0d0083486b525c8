"""The staging half of a save: copy the prepared state into a slot (or round by round), then send it.

``AsyncCheckpointer`` prepares a save (flatten, cached plan) and hands the
``Job`` here: on the caller's thread for a plain ``save``, on its single
staging thread for ``overlap`` and ``async_save``. A slot belongs to this code
from ``acquire`` until the save's record is published in ``InFlightSaves``;
from then on to the record, which returns it to the pool once
(``inflight.py``). A failure here fails the save's pending checkpoint and,
unless the worker already heard of the save, tells the other ranks' workers,
so that none waits for this rank at the commit barrier.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from ._faults import hook_point, kill_point
from .errors import CheckpointError
from .inflight import InFlight, InFlightSaves
from .layout_cache import LayoutCache, Prepared
from .pending import PendingCheckpoint
from .save_options import SaveOptions
from .staged_rounds import RoundStager
from .staging import DeviceCopies, StagingPool, StagingSlot
from .storage import Storage
from .worker.client import WorkerClient
from .worker.messages import DropSlot, SaveRequest

__all__ = ["Job", "StageSender"]


@dataclass
class Job:
    """One prepared save, on its way to the staging copy."""

    pending: PendingCheckpoint
    storage: Storage
    location: str
    prepared: Prepared
    t0: float
    statefuls: list[tuple[Any, int]]
    """Where the overlap guard looks for optimizers (``Flat.statefuls``)."""
    d2h: DeviceCopies | None
    """CUDA tensors' copies, ordered after the work queued before the call."""


class StageSender:
    """Stages jobs and hands them to this rank's worker.

    ``worker()`` returns the live worker (starting one if needed, under the
    checkpointer's lock), ``rank()`` this rank in the worker group, and
    ``report_failure(save_id, exc)`` tells the other ranks that a save failed here.
    """

    def __init__(
        self,
        *,
        pool: StagingPool,
        inflight: InFlightSaves,
        layouts: LayoutCache,
        options: SaveOptions,
        budget: int | None,
        timeout: float,
        worker: Callable[[], WorkerClient],
        rank: Callable[[], int],
        report_failure: Callable[[int, BaseException], None],
    ) -> None:
        self._pool = pool
        self._inflight = inflight
        self._layouts = layouts
        self._options = options
        self._budget = budget
        self._timeout = timeout
        self._worker = worker
        self._rank = rank
        self._report_failure = report_failure

    def send(self, job: Job) -> None:
        """Stage ``job`` and send it; a failure fails its pending (a non-Exception is raised on)."""
        if self._budget is not None:
            self._send_in_rounds(job, self._budget)
            return
        pending = job.pending
        sent = False
        try:
            worker = self._worker()
            slot, waited = self._pool.acquire(
                job.prepared.layout, timeout=self._timeout, cuda_devices=job.prepared.cuda_devices
            )
            record: InFlight | None = None
            try:
                self.hand_over(worker, slot, job.prepared)
                t_stage = time.perf_counter()
                rank = self._rank()
                tensors = job.prepared.local.tensors
                event = slot.copy_in(tensors, job.d2h, on_half=lambda: _half_staged(pending.save_id, rank))
                if event is not None:
                    event.synchronize()
                stage_s = time.perf_counter() - t_stage
                layout_id = job.prepared.layout_id
                record = InFlight(
                    pending, slot, worker, waited, stage_only=partial(self._layouts.subsets.record, layout_id)
                )
                self._inflight.publish(record)
                worker.send(self._request(job, slot.slot_id, stage_s, time.perf_counter() - job.t0))
                sent = True
            except BaseException:
                if record is None:
                    self._pool.release(slot)
                else:
                    self._inflight.withdraw(record)
                raise
            kill_point("staged", pending.save_id, rank)
            pending._set_staged(stage_s)
        except BaseException as exc:
            self._failed(pending, exc, worker_told=sent)
            if not isinstance(exc, Exception):
                raise

    def _send_in_rounds(self, job: Job, budget: int) -> None:
        """``send`` for a budgeted checkpointer: the state in rounds (``staged_rounds.py``)."""
        pending = job.pending
        stager: RoundStager | None = None
        try:
            worker = self._worker()
            prepared = job.prepared
            stager = RoundStager(
                self._pool,
                self._inflight,
                worker,
                budget,
                staged=tuple(prepared.local.tensors) if prepared.subset else None,
                stage_only=partial(self._layouts.subsets.record, prepared.layout_id),
            )
            rank = self._rank()
            stage_s = stager.run(
                self._request(job, -1, 0.0, 0.0),
                pending,
                prepared.local.tensors,
                hand_over=lambda slot: self.hand_over(worker, slot, prepared),
                d2h=job.d2h,
                on_half=lambda: _half_staged(pending.save_id, rank),
                timeout=self._timeout,
                t0=job.t0,
            )
            kill_point("staged", pending.save_id, rank)
            pending._set_staged(stage_s)
        except BaseException as exc:
            self._failed(pending, exc, worker_told=stager is not None and stager.begun)
            if not isinstance(exc, Exception):
                raise

    def _request(self, job: Job, slot_id: int, stage_s: float, stall_s: float) -> SaveRequest:
        return SaveRequest(
            save_id=job.pending.save_id,
            slot_id=slot_id,
            layout_key=job.prepared.layout.key,
            layout_id=job.prepared.layout_id,
            storage=job.storage,
            location=job.location,
            values=job.prepared.local.values,
            options=self._options,
            stage_s=stage_s,
            stall_s=stall_s,
        )

    def _failed(self, pending: PendingCheckpoint, exc: BaseException, *, worker_told: bool) -> None:
        """Fail ``pending`` with ``exc`` as a CheckpointError (the caller re-raises a non-Exception)."""
        err = exc if isinstance(exc, CheckpointError) else CheckpointError(f"staging failed: {exc}")
        if err is not exc:
            err.__cause__ = exc
        pending._fail(err)
        if not worker_told:
            # As for a failure while preparing: the other ranks must not wait for this one.
            self._report_failure(pending.save_id, err)

    def hand_over(self, worker: WorkerClient, slot: StagingSlot, prepared: Prepared) -> None:
        """Make sure the worker maps ``slot`` and knows the plan; drop what it no longer needs."""
        # A slot evicted for another layout is free here, but its memory lives on
        # until the worker unmaps it too: 64 MiB per layout change otherwise.
        for slot_id in self._pool.take_evicted():
            worker.send(DropSlot(slot_id))
        if slot.registered_with != worker.pid:
            worker.register(slot)
        worker.register_layout(prepared.layout_id, prepared.local.plan, prepared.tree)


def _half_staged(save_id: int, rank: int) -> None:
    kill_point("stage", save_id, rank)
    hook_point("stage")
