"""The trainer's handle on its worker process: start it, talk to it, notice when it dies.

The worker is started with ``subprocess`` running ``python -c`` (not
multiprocessing's spawn), so the trainer's ``__main__`` is never re-imported
in it, whatever the training script looks like. The two talk over a Unix
socket pair; staging segments travel over it as file descriptors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from typing import Any

from ..errors import CheckpointError
from ..staging import StagingSlot
from .messages import DropLayout, Ready, RegisterLayout, RegisterSlot, Shutdown, WorkerConfig

__all__ = ["WorkerClient", "WorkerDiedError"]

log = logging.getLogger("async_ckpt")

_LAYOUTS_KEPT = 8
"""Layouts (plan and tree) a worker holds; each costs about a plan's size in its memory."""


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""The directory of the ``async_ckpt`` package this trainer runs."""

_ENTRY = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location(
    "async_ckpt", {package!r} + "/__init__.py", submodule_search_locations=[{package!r}]
)
package = importlib.util.module_from_spec(spec)
sys.modules["async_ckpt"] = package
spec.loader.exec_module(package)
from async_ckpt.worker.main import entry
entry({fd})
"""
"""The worker's program: the trainer's own package, loaded from where the trainer has it.

``python -c`` would otherwise import whatever ``async_ckpt`` comes first on
its path, the working directory's included: a checkout or a stale copy there
would run in the worker, a different version from the trainer's, or none.
"""


class WorkerDiedError(CheckpointError):
    """The background worker process exited while saves were in flight."""


class WorkerClient:
    def __init__(
        self,
        config: WorkerConfig,
        on_message: Callable[[Any], None],
        on_exit: Callable[[WorkerClient, str], None],
    ) -> None:
        self.config = config
        self._on_message = on_message
        self._on_exit = on_exit
        self._send_lock = threading.Lock()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.alive = False
        self._stopping = False
        self._layouts: OrderedDict[str, None] = OrderedDict()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        code = _ENTRY.format(package=_PACKAGE_DIR, fd=child.fileno())
        try:
            # -P: the working directory is not on the worker's path (``_ENTRY`` says why).
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-c", code], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL
            )
        finally:
            child.close()
        self.conn = Connection(parent.detach())
        if self._stopping:  # abort_start() came before there was a process to kill
            self.kill()
            self.conn.close()
            raise WorkerDiedError("the async_ckpt worker start was cancelled")
        self.conn.send(self.config)
        if not self.conn.poll(timeout):
            self.kill()
            raise WorkerDiedError(f"the async_ckpt worker did not start within {timeout:g}s")
        try:
            ready = self.conn.recv()
        except (EOFError, OSError):
            code_ = self.proc.wait(5)
            raise WorkerDiedError(f"the async_ckpt worker exited during start (exit code {code_})") from None
        assert isinstance(ready, Ready)
        self.alive = True
        threading.Thread(target=self._listen, name="async_ckpt-listener", daemon=True).start()

    def abort_start(self) -> None:
        """End a ``start`` running on another thread: it raises WorkerDiedError soon after.

        ``start`` sets ``proc`` before it reads ``_stopping``, and this sets
        ``_stopping`` before it reads ``proc``: one of the two kills the process.
        """
        self._stopping = True
        self.kill()

    def register(self, slot: StagingSlot) -> None:
        assert self.conn is not None and self.proc is not None
        with self._send_lock:
            self.conn.send(RegisterSlot(slot.slot_id, slot.layout))
            for seg in slot.segments:
                send_handle(self.conn, seg.fd, self.proc.pid)
        slot.registered_with = self.proc.pid

    def register_layout(self, layout_id: str, plan: Any, tree: Any) -> None:
        """Send a layout's plan and tree once per worker; later saves only name it.

        This side alone decides which layouts the worker keeps: it drops the
        least recently used one explicitly, so the two cannot disagree.
        """
        if layout_id in self._layouts:
            self._layouts.move_to_end(layout_id)
            return
        self.send(RegisterLayout(layout_id, plan, tree))
        self._layouts[layout_id] = None
        while len(self._layouts) > _LAYOUTS_KEPT:
            old, _ = self._layouts.popitem(last=False)
            self.send(DropLayout(old))

    def send(self, msg: Any) -> None:
        if self.conn is None or not self.alive:
            raise WorkerDiedError("the async_ckpt worker is not running")
        try:
            with self._send_lock:
                self.conn.send(msg)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            raise WorkerDiedError(f"the async_ckpt worker (pid {self.pid}) is gone: {exc}") from exc

    def _listen(self) -> None:
        assert self.conn is not None and self.proc is not None
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                break
            try:
                self._on_message(msg)
            except Exception:
                log.exception("async_ckpt: error handling a worker message")
        self.alive = False
        # The dead worker's socket is closed here, not when this client is
        # collected: a failed save's traceback keeps the client alive for as
        # long as the caller holds that save.
        with self._send_lock, contextlib.suppress(OSError):
            self.conn.close()
        code = self.proc.poll()
        if code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self.proc.wait(5)
        reason = "stopped" if self._stopping else f"died (exit code {code})"
        self._on_exit(self, f"the async_ckpt worker (pid {self.proc.pid}) {reason}")

    def stop(self, timeout: float) -> None:
        self._stopping = True
        if self.proc is None:
            return
        with contextlib.suppress(WorkerDiedError):
            self.send(Shutdown())
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, 9)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                # A killed worker still needs CPU time to exit, which a starved one
                # (SCHED_IDLE on busy cores) may not get for a while: reap it later
                # rather than leave a zombie and a still-running Popen behind.
                threading.Thread(target=self.proc.wait, name="async_ckpt-reaper", daemon=True).start()
