"""The saves a worker holds, from the trainer's side: who owns each staging slot.

A save's ``_InFlight`` record is published once its staging copy is complete
and its request is about to go to the worker. From then on the record owns the
save's staging slot, and ``release`` (under the lock, once per record) is the
only way it returns to the pool: on the worker's ``Released`` or ``Finished``,
on the worker's exit, or on the staging thread's error path, whichever comes
first. The listener thread of each worker calls ``on_message`` and ``on_exit``;
the staging thread calls ``publish`` and ``withdraw``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .dist import RanksFailedError
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CorruptCheckpointError,
)
from .format.values import PickleRefusedError
from .pending import PendingCheckpoint
from .staging import StagingPool, StagingSlot
from .storage.detect import StorageDetectionError
from .worker.client import WorkerClient, WorkerDiedError
from .worker.comm import RankTimeoutError, StoreLostError
from .worker.messages import Finished, Released, RoundWritten, StageOnly

__all__ = ["InFlight", "InFlightSaves", "RemoteError", "remote_error"]

log = logging.getLogger("async_ckpt")

_WAIT_REPORTED_S = 0.01
"""A shorter wait for a staging buffer is not worth a mention in the save's log line."""


@dataclass(eq=False)
class InFlight:
    pending: PendingCheckpoint
    slot: StagingSlot
    worker: WorkerClient
    waited: float
    """Seconds the save waited for another save to free a staging buffer."""
    released: bool = False
    on_round: Callable[[int], None] | None = None
    """A budgeted save's staging thread hears here that the worker wrote a round (``staged_rounds.py``)."""
    stage_only: Callable[[Any], None] | None = None
    """Told which items to stage for this save's layout from now on (None: all; replica_staging.py)."""


class RemoteError(Exception):
    """The traceback of an error raised in the worker process."""

    def __str__(self) -> str:
        return "\n" + str(self.args[0]) if self.args else ""


_REMOTE_TYPES: dict[str, type[CheckpointError]] = {
    cls.__name__: cls
    for cls in (
        CheckpointNotFoundError,
        CheckpointReplacedError,
        CorruptCheckpointError,
        PickleRefusedError,
        RanksFailedError,
        RankTimeoutError,
        StorageDetectionError,
        StoreLostError,
        WorkerDiedError,
    )
}
"""The public errors a worker may raise, rebuilt as themselves so ``except ac.RankTimeoutError`` works."""


def remote_error(checkpoint_id: Any, msg: Finished) -> CheckpointError:
    """The caller's error for a save the worker failed: its public type where it has one."""
    text = f"saving {checkpoint_id} failed in the background worker: {msg.error_type}: {msg.error}"
    cls = _REMOTE_TYPES.get(msg.error_type, CheckpointError)
    # Their constructors take what the worker had (step, ranks, timeout ...); the worker's
    # message already says all of it, so build the instance around that message instead.
    err = cls.__new__(cls)
    CheckpointError.__init__(err, text)
    for name, value in msg.error_fields:
        setattr(err, name, value)
    err.__cause__ = RemoteError(msg.traceback)
    return err


class InFlightSaves:
    def __init__(self, pool: StagingPool, lock: threading.RLock) -> None:
        self._pool = pool
        self._lock = lock
        self._records: dict[int, InFlight] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def publish(self, record: InFlight) -> None:
        """Hand ``record``'s slot over to the record; its worker must still be alive."""
        with self._lock:
            if not record.worker.alive:  # its exit was handled already, and would miss this record
                raise WorkerDiedError(f"the async_ckpt worker (pid {record.worker.pid}) is gone")
            self._records[record.pending.save_id] = record

    def withdraw(self, record: InFlight) -> None:
        """The request never reached the worker: forget the record, freeing its slot once."""
        with self._lock:
            if self._records.get(record.pending.save_id) is record:
                del self._records[record.pending.save_id]
            self._release(record)

    def clear(self) -> None:
        with self._lock:
            self._records.clear()

    def _release(self, record: InFlight) -> None:
        if not record.released:
            record.released = True
            self._pool.release(record.slot)

    def on_message(self, msg: Any) -> None:
        if isinstance(msg, StageOnly):
            with self._lock:
                f = self._records.get(msg.save_id)
            if f is not None and f.stage_only is not None:
                f.stage_only(msg.keys)
        elif isinstance(msg, Released):
            with self._lock:
                f = self._records.get(msg.save_id)
                if f is not None:
                    self._release(f)
        elif isinstance(msg, Finished):
            with self._lock:
                f = self._records.pop(msg.save_id, None)
                if f is not None:
                    self._release(f)
            if f is not None:
                self._finish(f, msg)
        elif isinstance(msg, RoundWritten):
            with self._lock:
                f = self._records.get(msg.save_id)
            if f is not None and f.on_round is not None:
                f.on_round(msg.index)

    @staticmethod
    def _finish(f: InFlight, msg: Finished) -> None:
        if msg.metadata is None:
            if f.stage_only is not None:
                # The next save of this layout stages everything: it may have failed because
                # some item was staged by no rank (the ranks' state dicts changed differently).
                f.stage_only(None)
            f.pending._fail(remote_error(f.pending.checkpoint_id, msg))
            return
        s = msg.metadata.stats
        if s is not None:  # logged first: whoever waits on the pending sees the line
            waited = f"; waited {f.waited:.3f}s for a staging buffer" if f.waited > _WAIT_REPORTED_S else ""
            log.info(
                "async_ckpt: saved %s (save %d): %s%s",
                f.pending.checkpoint_id,
                msg.save_id,
                s.describe(),
                waited,
            )
        f.pending._resolve(msg.metadata)

    def on_exit(self, worker: WorkerClient, reason: str) -> None:
        # Every save sent to this worker, even if a newer worker has replaced it already.
        with self._lock:
            lost = [f for f in self._records.values() if f.worker is worker]
            for f in lost:
                del self._records[f.pending.save_id]
                self._release(f)
        for f in lost:
            f.pending._fail(
                WorkerDiedError(
                    f"{reason} while saving {f.pending.checkpoint_id}; the save did not complete "
                    "(it is committed only if the worker died after writing metadata.json: "
                    "read_metadata tells). The next save starts a new worker."
                )
            )
