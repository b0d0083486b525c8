"""``PendingCheckpoint``: the handle on one save in flight (a future, plus its staging event).

Both futures are marked running when created, so nothing outside can cancel
them: ``asyncio.wrap_future`` cancels its source future when the awaiting
task is cancelled (``asyncio.wait_for`` timing out, ``task.cancel()``), and
that used to turn a committed save into ``CancelledError`` for good. An
awaiter's cancellation now ends only its own wait; the save goes on, and the
handle reports what reached the disk. The checkpointer resolves each future
through ``_set_staged``, ``_resolve`` and ``_fail``, which settle it at most
once and never raise, whichever of its threads gets there first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from .format.metadata import Metadata

__all__ = ["PendingCheckpoint", "StagedHandle"]

T = TypeVar("T")


def _uncancellable() -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut.set_running_or_notify_cancel()  # a running future refuses cancel()
    return fut


def _settle(fut: concurrent.futures.Future[T], result: T | None, error: BaseException | None) -> bool:
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]
    except concurrent.futures.InvalidStateError:
        return False
    return True


class StagedHandle:
    """Resolves when a save's staging copy is complete (awaitable, or ``wait()``)."""

    def __init__(self) -> None:
        self._future: concurrent.futures.Future[float] = _uncancellable()

    def __await__(self) -> Generator[Any, None, float]:
        return asyncio.wrap_future(self._future).__await__()

    def wait(self, timeout: float | None = None) -> float:
        """Block until staged; returns the staging time in seconds."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()


class PendingCheckpoint:
    """A save in flight. Await it (or call ``result()``) for the committed ``Metadata``.

    Awaiting it from several tasks is fine, and cancelling one of them (or a
    timed-out ``asyncio.wait_for``) does not affect the save.
    """

    def __init__(self, checkpoint_id: Any, save_id: int) -> None:
        self.checkpoint_id = checkpoint_id
        self.save_id = save_id
        self.staged = StagedHandle()
        self._future: concurrent.futures.Future[Metadata] = _uncancellable()

    def __await__(self) -> Generator[Any, None, Metadata]:
        return asyncio.wrap_future(self._future).__await__()

    def result(self, timeout: float | None = None) -> Metadata:
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)

    def done(self) -> bool:
        return self._future.done()

    def add_done_callback(self, fn: Callable[[PendingCheckpoint], Any]) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<PendingCheckpoint {self.checkpoint_id!s} save {self.save_id} {state}>"

    # Called by the checkpointer. Each returns whether it settled anything.

    def _set_staged(self, stage_s: float) -> bool:
        return _settle(self.staged._future, stage_s, None)

    def _resolve(self, metadata: Metadata) -> bool:
        return _settle(self._future, metadata, None)

    def _fail(self, error: BaseException) -> bool:
        staged = _settle(self.staged._future, None, error)
        return _settle(self._future, None, error) or staged
