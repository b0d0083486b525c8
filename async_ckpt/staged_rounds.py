"""Staging under a budget: a state larger than ``staging_budget`` goes to the worker round by round.

Host memory for staging is then the budget, not the state; the price is a
longer stall, since the trainer waits for the worker to write a round before
it copies over that round's bytes. One save, on the staging thread:

    acquire the round buffer (a pool slot of ``budget`` bytes, in one or two segments)
    send RoundsBegin              (the workers agree on the plan before anything is written)
    for each round i:
        wait for RoundWritten(i - segments)   (the worker is done with that piece)
        copy round i's tensors into segment i % segments, send Round(i)
    staged                        (the call returns; the worker writes the last round,
                                   releases the buffer and commits with the other ranks)

A round is a run of whole items, in state-dict order, that fits one
segment. A tensor larger than half the budget was planned as several chunks
of at most half the budget (``piece_bytes``; ``local_plan.split_boxes``), so
every item fits one of the buffer's two halves, and the copy of round i+1
overlaps the write of round i. (Only a budget under twice ``MIN_PIECE_BYTES``
can leave an item larger than half: it is a round of its own, in a buffer of
max(budget, item).) A state within the budget is one round, in a
buffer of its own size, and the call waits for no write. Every save of a
budgeted checkpointer takes this path, so that all ranks speak the same
protocol to their workers whatever their state's size (hence every rank must
pass the same ``staging_budget``). Rounds are the trainer's business alone:
the plan and its cache are the same as for an unbudgeted save of that state.
After a layout's first save, the tensors are only the items this rank writes
(replica-sharded staging, ``replica_staging.py``): fewer rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .buffer_layout import ALIGN, BufferSpec, Key, Layout, item_start
from .errors import CheckpointError
from .format.dtypes import dtype_name
from .inflight import InFlight, InFlightSaves
from .pending import PendingCheckpoint
from .staging import DeviceCopies, StagingPool, StagingSlot
from .worker.client import WorkerClient, WorkerDiedError
from .worker.messages import Round, RoundsAbort, RoundsBegin, SaveRequest

__all__ = ["MIN_PIECE_BYTES", "RoundStager", "buffer_layout", "piece_bytes", "split_rounds"]

MIN_PIECE_BYTES = 64 << 10
"""No tensor is split into chunks smaller than this, however small the budget: a chunk is an
item of its own in the plan and the metadata, and millions of them would cost more than the memory."""

_WAKE_S = 1.0
"""How often a wait for a round re-checks its save (a wake-up also comes when the save settles)."""


def piece_bytes(budget: int) -> int:
    """The largest item a budgeted save stages whole: half the budget (two halves alternate)."""
    return max(budget // 2 // ALIGN * ALIGN, MIN_PIECE_BYTES)


def buffer_layout(tensors: Mapping[Key, torch.Tensor], budget: int) -> Layout:
    """The round buffer for ``tensors``: the state if it fits the budget (one round), else two
    halves of the budget, or one piece when a tensor needs more than half."""
    total = 0
    for t in tensors.values():
        total = item_start(total, _nbytes(t)) + _aligned(_nbytes(t))
    largest = max((_aligned(_nbytes(t)) for t in tensors.values()), default=0)
    half = budget // 2 // ALIGN * ALIGN
    if total <= budget:
        count, size = 1, max(total, ALIGN)
    elif largest <= half:
        count, size = 2, half
    else:
        count, size = 1, max(budget, largest, ALIGN)
    return Layout((), (size,) * count, f"rounds-{count}x{size}")


def split_rounds(tensors: Mapping[Key, torch.Tensor], capacity: int) -> list[list[tuple[Key, int, int]]]:
    """Whole tensors, in order, grouped into rounds of at most ``capacity`` bytes: (key, offset, nbytes)."""
    rounds: list[list[tuple[Key, int, int]]] = []
    current: list[tuple[Key, int, int]] = []
    pos = 0
    for key, t in tensors.items():
        nbytes = _nbytes(t)
        start = item_start(pos, nbytes)
        if current and start + nbytes > capacity:
            rounds.append(current)
            current, start = [], 0
        current.append((key, start, nbytes))
        pos = start + _aligned(nbytes)
    if current or not rounds:
        rounds.append(current)
    return rounds


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Progress:
    """Which rounds of one save the worker has written (in any order).

    A waiter also wakes when the save settles.
    """

    def __init__(self, pending: PendingCheckpoint) -> None:
        self._cond = threading.Condition()
        self._written: set[int] = set()
        self._pending = pending
        pending.add_done_callback(lambda _: self._wake())

    def written(self, index: int) -> None:
        with self._cond:
            self._written.add(index)
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait(self, index: int) -> None:
        """Until round ``index`` (if any) is written; raises once the save has settled (it failed)."""
        with self._cond:
            while self._pending.done() or (index >= 0 and index not in self._written):
                if self._pending.done():
                    raise CheckpointError(
                        f"saving {self._pending.checkpoint_id} ended while its rounds were being staged"
                    )
                self._cond.wait(_WAKE_S)


class RoundStager:
    """Stages one save in rounds (see the module docstring); ``begun`` once the worker heard of it.

    ``staged``: the keys of the tensors given to ``run`` when they are only the
    items this rank writes (replica-sharded staging), for the worker's plan;
    ``stage_only``: told which items to stage next time (``InFlight.stage_only``).
    """

    def __init__(
        self,
        pool: StagingPool,
        inflight: InFlightSaves,
        worker: WorkerClient,
        budget: int,
        *,
        staged: tuple[Key, ...] | None = None,
        stage_only: Callable[[Any], None] | None = None,
    ) -> None:
        self._pool = pool
        self._inflight = inflight
        self._worker = worker
        self._budget = budget
        self._staged = staged
        self._stage_only = stage_only
        self.begun = False

    def run(
        self,
        request: SaveRequest,
        pending: PendingCheckpoint,
        tensors: Mapping[Key, torch.Tensor],
        *,
        hand_over: Callable[[StagingSlot], None],
        d2h: DeviceCopies | None,
        on_half: Callable[[], None],
        timeout: float,
        t0: float,
    ) -> float:
        """Stage every round and send it; returns the seconds spent copying (the staging time).

        ``request.slot_id`` is filled in here, with the round buffer's.
        """
        layout = buffer_layout(tensors, self._budget)
        rounds = split_rounds(tensors, layout.segment_sizes[0])
        devices = d2h.devices if d2h is not None else ()
        slot, waited = self._pool.acquire(layout, timeout=timeout, cuda_devices=devices)
        request = dataclasses.replace(request, slot_id=slot.slot_id)
        progress = _Progress(pending)
        record: InFlight | None = None
        try:
            hand_over(slot)
            record = InFlight(
                pending, slot, self._worker, waited, on_round=progress.written, stage_only=self._stage_only
            )
            self._inflight.publish(record)
            self._worker.send(RoundsBegin(request, self._staged))
        except BaseException:
            if record is None:
                self._pool.release(slot)
            else:
                self._inflight.withdraw(record)
            raise
        self.begun = True
        try:
            return self._send_rounds(request, slot, rounds, tensors, progress, d2h, on_half, t0)
        except BaseException as exc:
            # The worker waits for the next round: tell it there is none, so that
            # every rank's save fails at its commit barrier instead of hanging.
            if not pending.done():
                with contextlib.suppress(WorkerDiedError):
                    self._worker.send(RoundsAbort(request.save_id, f"{type(exc).__name__}: {exc}"))
            raise

    def _send_rounds(
        self,
        request: SaveRequest,
        slot: StagingSlot,
        rounds: list[list[tuple[Key, int, int]]],
        tensors: Mapping[Key, torch.Tensor],
        progress: _Progress,
        d2h: DeviceCopies | None,
        on_half: Callable[[], None],
        t0: float,
    ) -> float:
        segments = len(slot.layout.segment_sizes)
        stage_s = 0.0
        for i, members in enumerate(rounds):
            progress.wait(i - segments)  # the round that last used this piece is written
            if i == len(rounds) // 2:
                on_half()
            seg = i % segments
            specs = tuple(
                BufferSpec(key, tuple(tensors[key].shape), dtype_name(tensors[key].dtype), seg, off, n)
                for key, off, n in members
            )
            t_copy = time.perf_counter()
            event = slot.carve(specs).copy_in({key: tensors[key] for key, _, _ in members}, d2h)
            if event is not None:
                event.synchronize()
            stage_s += time.perf_counter() - t_copy
            last = i == len(rounds) - 1
            self._worker.send(
                Round(
                    request.save_id,
                    i,
                    specs,
                    last,
                    stage_s=stage_s if last else 0.0,
                    stall_s=time.perf_counter() - t0 if last else 0.0,
                )
            )
        return stage_s
