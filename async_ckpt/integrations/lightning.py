"""PyTorch Lightning: ``AsyncCkptIO``, a ``CheckpointIO`` that saves in the background.

``Trainer(plugins=[AsyncCkptIO()])`` routes every checkpoint Lightning writes
(``ModelCheckpoint``, ``trainer.save_checkpoint``) through one
``AsyncCheckpointer``: ``save_checkpoint`` returns once the checkpoint dict is
staged, and the write goes on in the worker process while training continues.
Lightning's checkpoint dict (hparams with dtypes and paths, loop and callback
state, optimizer state with int keys) saves as it is, without pickle.

Each checkpoint is a directory at the path Lightning chose (``epoch=3-step=40.ckpt``,
``last.ckpt``). Lightning calls ``save_checkpoint`` and ``remove_checkpoint`` on
global rank 0 only, so saves use ``process_group=SINGLE_RANK``: no collective
with ranks that never join. Loads (every rank, on resume) read alone too.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import async_ckpt as ac
from async_ckpt.checkpointer import PendingCheckpoint
from async_ckpt.errors import CheckpointError
from async_ckpt.storage import LocalStorage, Storage, detect_storage

__all__ = ["AsyncCkptIO"]

log = logging.getLogger("async_ckpt")


class AsyncCkptIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stages each checkpoint and writes it in the background.

    ``max_in_flight`` (default 2) is how many saves may be writing at once, and
    so how many host copies of the state the staging pool may hold: two, so that
    the top-k save and ``last.ckpt`` at the same step both return once staged.
    ``start_worker`` starts the worker process on a background thread when the
    plugin is created (on the process that will be global rank 0), so the first
    save does not wait for it. ``allow_pickle`` lets values that have no safe
    encoding be pickled (and loaded back). ``verify`` checks checksums on load.
    Other keyword arguments go to ``AsyncCheckpointer`` (``pin_memory``,
    ``worker_nice``, ``timeout``, ...).
    """

    def __init__(
        self,
        *,
        max_in_flight: int = 2,
        storage: Storage | None = None,
        allow_pickle: bool = False,
        verify: bool = True,
        start_worker: bool = True,
        **checkpointer_kwargs: Any,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        self._max_in_flight = max_in_flight
        self._storage = storage
        self._allow_pickle = allow_pickle
        self._verify = verify
        self._start_worker = start_worker
        self._checkpointer_kwargs = checkpointer_kwargs
        self._reset()
        if start_worker and _may_be_global_rank_zero():
            self._start_in_background()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._ckpt: ac.AsyncCheckpointer | None = None
        self._owner_pid = os.getpid()
        self._starter: threading.Thread | None = None
        self._pending: dict[str, PendingCheckpoint] = {}
        """The latest save to each path, until it is seen to succeed."""

    # ``ddp_spawn`` pickles the plugin into each process: locks and the
    # checkpointer (its worker, its shared memory) stay behind.
    def __getstate__(self) -> dict[str, Any]:
        keep = ("_max_in_flight", "_storage", "_allow_pickle", "_verify", "_start_worker")
        return {k: self.__dict__[k] for k in (*keep, "_checkpointer_kwargs")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    @property
    def checkpointer(self) -> ac.AsyncCheckpointer:
        """This process's ``AsyncCheckpointer`` (created on first use; a fork gets a new one)."""
        with self._lock:
            if self._owner_pid != os.getpid():
                # A fork copied the parent's checkpointer: its worker and buffers are not ours.
                self._reset_after_fork()
            if self._ckpt is None:
                self._ckpt = ac.AsyncCheckpointer(
                    ac.SINGLE_RANK,
                    self._max_in_flight,
                    storage=self._storage,
                    allow_pickle=self._allow_pickle,
                    **self._checkpointer_kwargs,
                )
            return self._ckpt

    def _reset_after_fork(self) -> None:
        self._ckpt = None
        self._owner_pid = os.getpid()
        self._starter = None
        self._pending = {}

    def _start_in_background(self) -> None:
        def start() -> None:
            try:
                self.checkpointer.start()
            except Exception as exc:  # noqa: BLE001 - the first save starts it again and raises
                log.warning("async_ckpt: starting the checkpoint worker failed: %s", exc)

        self._starter = threading.Thread(target=start, name="async_ckpt-lightning-start", daemon=True)
        self._starter.start()

    def _wait_for_starter(self) -> None:
        starter = self._starter
        if starter is not None and self._owner_pid == os.getpid():
            starter.join()
            self._starter = None

    # ------------------------------------------------------------- CheckpointIO

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Stage ``checkpoint`` and return; it becomes durable at ``path`` in the background.

        An earlier save that failed raises here (once), as ``CheckpointError``.
        """
        if storage_options is not None:
            raise TypeError(
                "AsyncCkptIO.save_checkpoint takes no storage_options (got "
                f"{storage_options!r}); pass storage= to AsyncCkptIO instead"
            )
        self._raise_failed()
        self._wait_for_starter()
        key = _key(path)
        backend, location = detect_storage(key, self._storage)
        if isinstance(backend, LocalStorage):
            # The worker creates it only later; ModelCheckpoint(save_last="link")
            # links to this path right after this call returns.
            os.makedirs(os.path.dirname(location), exist_ok=True)
        pending = self.checkpointer.save(checkpoint, key)
        self._pending[key] = pending

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load the checkpoint at ``path`` as a new dict (waiting for a save to it still in flight).

        A regular file (a ``torch.save`` checkpoint from before the switch) is
        read by Lightning's ``TorchCheckpointIO`` instead.
        """
        key = _key(path)
        self._wait_for(key)
        if os.path.isfile(key):
            return TorchCheckpointIO().load_checkpoint(key, map_location, weights_only)
        return ac.load_state_dict(
            key,
            map_location=_device(map_location),
            process_group=ac.SINGLE_RANK,
            storage=self._storage,
            allow_pickle=self._allow_pickle,
            verify=self._verify,
        )

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Remove the checkpoint at ``path``, after a save to it still in flight has finished."""
        key = _key(path)
        try:
            self._wait_for(key)
        except CheckpointError as exc:
            log.warning("async_ckpt: removing %s, whose save failed: %s", key, exc)
        # A link (ModelCheckpoint(save_last="link")) or a torch.save file goes alone:
        # deleting through a link would remove the checkpoint it points to.
        if os.path.islink(key) or os.path.isfile(key):
            os.remove(key)
            return
        backend, location = detect_storage(key, self._storage)
        backend.delete(location)

    def teardown(self) -> None:
        """Wait for every save in flight, stop the worker and free the staging memory.

        Raises ``CheckpointError`` if a save failed. A later save starts a new worker.
        """
        if self._owner_pid != os.getpid():
            return
        self._wait_for_starter()
        try:
            self._raise_failed(wait=True)
        finally:
            with self._lock:
                ckpt, self._ckpt = self._ckpt, None
            if ckpt is not None:
                ckpt.close()

    # ------------------------------------------------------------- helpers

    def _wait_for(self, key: str) -> None:
        pending = self._pending.get(key)
        if pending is None:
            return
        try:
            pending.result()
        except Exception as exc:
            raise CheckpointError(f"the background save to {key} failed") from exc
        finally:
            self._pending.pop(key, None)

    def _raise_failed(self, *, wait: bool = False) -> None:
        """Forget saves that succeeded; raise for the first one that failed (waiting for all if ``wait``)."""
        for key, pending in list(self._pending.items()):
            if not (wait or pending.done()):
                continue
            del self._pending[key]
            exc = pending.exception()
            if exc is not None:
                raise CheckpointError(f"the background save to {key} failed: {exc}") from exc


def _key(path: str | os.PathLike[str]) -> str:
    return os.fspath(path)


def _device(map_location: Any) -> str | torch.device:
    # torch.load also takes a callable or a dict over saved devices; this format
    # records none, so both mean "where torch.load's identity mapping puts it": CPU.
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return "cpu"
    if isinstance(map_location, (str, torch.device)):
        return map_location
    raise TypeError(f"map_location must be a device, its name, a callable or a dict, not {map_location!r}")


def _may_be_global_rank_zero() -> bool:
    """Whether this process may become global rank 0: only rank 0 saves, so only it needs the worker early.

    Launchers (torchrun, Lightning's own) set these before the script runs; the
    process that launches Lightning's other ranks has none of them and is rank 0.
    """
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(name)
        if value not in (None, "", "0"):
            return False
    return True
