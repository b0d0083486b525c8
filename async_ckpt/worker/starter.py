"""A worker start on a thread of its own, while the trainer goes on (``AsyncCheckpointer``'s default).

The constructor takes the group's instance number on the caller's thread, in
construction order as every rank does (``group.take_instance``), so the ranks
agree however the threads of several checkpointers are scheduled. The thread
then joins the workers' group (a rank other than 0 blocks until rank 0 has
published its address) and starts the process until it says Ready. The first
save (or ``start()``) takes the outcome with ``outcome()``: the group, the
worker, or why it could not start.

A checkpointer made before ``init_process_group`` cannot know its group yet:
the thread starts a worker that saves alone, and ``outcome()`` stops it again
when the trainer has a group of several ranks by then (the first save then
starts one that joins them, as a lazy start does).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch.distributed as dist

from .._faults import fail_point
from ..single_rank import SINGLE_RANK, ProcessGroupArg, SingleRank
from .client import WorkerClient, WorkerDiedError
from .group import WorkerGroup, join_worker_group, take_instance

__all__ = ["BackgroundStart"]

log = logging.getLogger("async_ckpt")

THREAD_NAME = "async_ckpt-worker-start"


class BackgroundStart:
    """Join the workers' group and start a worker on a daemon thread; ``outcome()`` waits for it.

    ``_lock`` orders ``cancel`` against the thread creating its client: once
    cancelled, no process is spawned, and one being started is killed.
    """

    def __init__(
        self,
        process_group: ProcessGroupArg,
        timeout: float,
        start_timeout: float,
        new_worker: Callable[[WorkerGroup], WorkerClient],
    ) -> None:
        self._pg = process_group
        self._timeout = timeout
        self._start_timeout = start_timeout
        self._new_worker = new_worker
        self._alone = not isinstance(process_group, SingleRank) and not _dist_ready()
        """No trainer group at construction: this worker saves alone (see the module docstring)."""
        self._instance = None if self._alone else take_instance(process_group)
        self._lock = threading.Lock()
        self._cancelled = False
        self._group: WorkerGroup | None = None
        self._client: WorkerClient | None = None
        self._error: BaseException | None = None
        # A daemon: an interpreter that exits mid-start must not wait for it (the
        # worker reads the end of its socket then, and exits).
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            group = join_worker_group(SINGLE_RANK if self._alone else self._pg, self._timeout, self._instance)
            with self._lock:
                self._group = group
                if self._cancelled:
                    return
                fail_point("worker_start", group.rank)
                client = self._client = self._new_worker(group)
            client.start(self._start_timeout)
        except BaseException as exc:  # noqa: BLE001 - outcome() hands it to the first save
            self._error = exc

    def outcome(self) -> tuple[WorkerGroup | None, WorkerClient | None, WorkerDiedError | None]:
        """Wait for the start: the group joined (or None), the worker started (or None), and why not."""
        self._thread.join()
        group, client, error = self._group, self._client, self._error
        if error is not None:
            if client is not None:
                client.kill()  # start() kills on its own failures, not on every exception
            err = WorkerDiedError(
                f"the async_ckpt worker could not start (started in the background when the "
                f"AsyncCheckpointer was created): {type(error).__name__}: {error}. The next save tries again"
            )
            err.__cause__ = error
            return group, None, err
        if self._alone and _several_ranks(self._pg):
            # init_process_group came after the checkpointer: this worker would save alone.
            log.debug("async_ckpt: the worker started before init_process_group is replaced")
            self._stop(self._start_timeout)
            return None, None, None
        return group, client, None

    def cancel(self, timeout: float) -> None:
        """Stop the start, or the worker it started (the checkpointer closes before taking it)."""
        with self._lock:
            self._cancelled = True
            client = self._client
        if client is not None and not client.alive:
            client.abort_start()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Only the group join can take this long (waiting for rank 0's address);
            # no process is started after it, and the daemon thread ends with its timeout.
            log.warning(
                "async_ckpt: the background worker start did not end within %.0fs of close()", timeout
            )
        self._stop(timeout)

    def _stop(self, timeout: float) -> None:
        if self._client is not None:
            self._client.stop(timeout)
        if self._group is not None:
            self._group.close()


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _several_ranks(pg: ProcessGroupArg) -> bool:
    return not isinstance(pg, SingleRank) and _dist_ready() and dist.get_world_size(pg) > 1
