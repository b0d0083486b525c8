"""The save methods the background-checkpointing benchmarks compare, each as a ``Mode``.

A ``Mode`` says how to issue one save to a path, wait until it is staged (the
trainer may change the tensors again), ask whether it is durable, and wait until
it is. ``bench_async.py``, ``bench_gpu.py`` and ``multirank.py`` time the same
modes: async_ckpt's (``ac_modes``) and torch DCP's (``dcp_modes``, ``DcpStaged``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from _common import release_free_memory

__all__ = [
    "ASYNC_KEYS",
    "LABELS",
    "DcpStaged",
    "Mode",
    "ac_modes",
    "dcp_mode",
    "dcp_modes",
    "init_process_group",
    "renice_tree",
    "stderr_to",
]

# The background methods, whose training-step slowdown is measured.
ASYNC_KEYS = ("ac", "dcp_thread", "dcp_process")
LABELS = {
    "ac": "async_ckpt AsyncCheckpointer.save",
    "ac_overlap": "async_ckpt save(overlap=True)",
    "ac_blocking": "async_ckpt ac.save (blocking)",
    "dcp_save": "DCP save (blocking)",
    "dcp_thread": "DCP async_save THREAD",
    "dcp_process": "DCP async_save PROCESS",
}


@dataclass
class Mode:
    """How to issue one save, wait until it is staged / durable, and ask whether it is done."""

    name: str
    issue: Callable[[str], Any]
    staged: Callable[[Any], None]
    done: Callable[[Any], bool]
    wait: Callable[[Any], Any]


# --------------------------------------------------------------------------- async_ckpt


def ac_modes(ac: Any, ck: Any, sd: dict[str, Any]) -> dict[str, Mode]:
    """``ck.save``, ``ck.save(overlap=True)`` and blocking ``ac.save``; ``wait`` returns the metadata."""
    return {
        "ac": Mode(
            "ac", lambda path: ck.save(sd, path), lambda p: None, lambda p: p.done(), lambda p: p.result()
        ),
        "ac_overlap": Mode(
            "ac_overlap",
            lambda path: ck.save(sd, path, overlap=True),
            lambda p: p.staged.wait(),
            lambda p: p.done(),
            lambda p: p.result(),
        ),
        "ac_blocking": Mode(
            "ac_blocking", lambda path: ac.save(sd, path), lambda h: None, lambda h: True, lambda h: h
        ),
    }


def renice_tree(pid: int, nice: int) -> None:
    """Re-nice every thread of ``pid`` (the library starts its worker at nice 15)."""
    for task in glob.glob(f"/proc/{pid}/task/*"):
        with contextlib.suppress(OSError, ValueError):
            os.setpriority(os.PRIO_PROCESS, int(os.path.basename(task)), nice)


# --------------------------------------------------------------------------- torch DCP


def init_process_group() -> bool:
    """A 1-rank gloo group (TCPStore on port 0), which DCP's PROCESS mode needs; False if one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=600), wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return True


def dcp_mode(name: str, call: Callable[[str], Any]) -> Mode:
    """A ``dcp.async_save`` call as a Mode: a Future, or an AsyncSaveResponse (async staging)."""

    def staged(h: Any) -> None:
        sc = getattr(h, "staging_completion", None)
        if sc is not None:
            sc.result()

    def upload(h: Any) -> concurrent.futures.Future[Any]:
        return h if isinstance(h, concurrent.futures.Future) else h.upload_completion

    return Mode(name, call, staged, lambda h: upload(h).done(), lambda h: upload(h).result())


def dcp_modes(sd: dict[str, Any]) -> dict[str, Mode]:
    """Blocking ``dcp.save`` and ``dcp.async_save`` in THREAD mode (DCP's default stager)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    return {
        "dcp_save": Mode(
            "dcp_save",
            lambda path: dcp.save(sd, checkpoint_id=path),
            lambda h: None,
            lambda h: True,
            lambda h: h,
        ),
        "dcp_thread": dcp_mode(
            "dcp_thread",
            lambda path: dcp.async_save(
                sd, checkpoint_id=path, async_checkpointer_type=AsyncCheckpointerType.THREAD
            ),
        ),
    }


class DcpStaged:
    """``dcp.async_save`` with a persistent ``DefaultStager``, where this torch has one.

    ``process=True``: PROCESS mode staging into shared memory (how its helper
    process gets the tensors cheaply), synchronous staging. ``process=False``:
    THREAD mode staging into pinned memory with asynchronous, non-blocking copies
    (the GPU comparison).
    """

    def __init__(self, name: str, sd: dict[str, Any], *, process: bool) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.process = process
        self.stager: Any = None
        kind = AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD
        kwargs: dict[str, Any] = {"async_checkpointer_type": kind}
        if "async_stager" in inspect.signature(dcp.async_save).parameters:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self.stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=not process,
                    use_shared_memory=process,
                    use_async_staging=not process,
                    use_non_blocking_copy=not process,
                )
            )
            kwargs["async_stager"] = self.stager
        if self.stager is None:
            self.description = "default stager (no DefaultStager in this torch)"
        elif process:
            self.description = "DefaultStager(shared memory, synchronous staging)"
        else:
            self.description = "DefaultStager(pinned, async staging, non-blocking copies)"
        self.mode = dcp_mode(name, lambda path: dcp.async_save(sd, checkpoint_id=path, **kwargs))

    def close(self) -> None:
        if self.process:
            self._stop_helper_process()
        if self.stager is not None:
            with contextlib.suppress(Exception):
                self.stager.close()
            self.stager = None
        release_free_memory()

    @staticmethod
    def _stop_helper_process() -> None:
        # DCP keeps its PROCESS-mode helper in a module global and offers no public way to stop it.
        try:
            import torch.distributed.checkpoint._async_process_executor as ape
        except ImportError:
            return
        proc = getattr(ape, "_CHECKPOINT_PROCESS", None)
        ape._CHECKPOINT_PROCESS = None
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.__del__()  # sends TERMINATE and joins the helper process


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Point fd 2 at ``path`` meanwhile: DCP's PROCESS-mode helper, spawned in here,
    inherits it and logs every request at INFO level."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
