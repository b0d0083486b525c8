"""``PendingCheckpoint``: the handle on one save in flight (a future, plus its staging event)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any

from .format.metadata import Metadata

__all__ = ["PendingCheckpoint", "StagedHandle"]


class StagedHandle:
    """Resolves when a save's staging copy is complete (awaitable, or ``wait()``)."""

    def __init__(self) -> None:
        self._future: concurrent.futures.Future[float] = concurrent.futures.Future()

    def __await__(self) -> Generator[Any, None, float]:
        return asyncio.wrap_future(self._future).__await__()

    def wait(self, timeout: float | None = None) -> float:
        """Block until staged; returns the staging time in seconds."""
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()


class PendingCheckpoint:
    """A save in flight. Await it (or call ``result()``) for the committed ``Metadata``."""

    def __init__(self, checkpoint_id: Any, save_id: int) -> None:
        self.checkpoint_id = checkpoint_id
        self.save_id = save_id
        self.staged = StagedHandle()
        self._future: concurrent.futures.Future[Metadata] = concurrent.futures.Future()

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

    # called by the checkpointer
    def _fail(self, error: BaseException) -> None:
        if not self.staged.done():
            self.staged._future.set_exception(error)
        if not self._future.done():
            self._future.set_exception(error)
