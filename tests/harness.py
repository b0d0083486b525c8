"""Run a function on N gloo ranks: the pooled ranks of ``async_ckpt.testing``.

    results = run_ranks(2, _body, tmp_path)      # _body(rank, world_size, tmp_path)

The ranks are spawned once per world size and reused across calls (and tests);
a call that fails, dies or hangs on any rank ends its pool, and the next call
spawns a new one. ``fresh=True`` spawns processes for one call alone: for a
body that kills its rank, or must start from a clean interpreter (env read at
import, a worker started with a fault armed in its environment).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from async_ckpt.testing import RankFailed, run_ranks

__all__ = ["RankFailed", "local_bytes", "restart_worker", "run_ranks"]


def restart_worker(ck: Any, kill: bool) -> bool:
    """SIGKILL ``ck``'s worker if ``kill``, wait until the checkpointer has seen it die, start one.

    Returns whether the checkpointer now has another worker than before.
    """
    pid = ck.worker_pid
    if kill and pid is not None:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while ck.worker_pid is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    ck.start()
    return bool(ck.worker_pid != pid)


def local_bytes(sd: dict[str, Any]) -> int:
    """Bytes of this rank's data under ``sd["model"]`` (a DTensor's local shard)."""
    n = 0
    for t in sd["model"].values():
        t = t.to_local() if hasattr(t, "to_local") else t
        n += t.numel() * t.element_size()
    return n
