"""The async lifecycle on two ranks (gloo, spawned processes, one worker per rank).

A staging failure on one rank only (its shared memory cannot be allocated)
fails that rank's ``save()`` and every other rank's pending with the failing
rank's own error, without waiting for the timeout; the next save works on
every rank (no buffer is left held).
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.errors import CheckpointNotFoundError

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

TIMEOUT = 60.0


def _stage_fails_on_rank_1(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with ac.AsyncCheckpointer(timeout=TIMEOUT, max_in_flight=1) as ck:
        ck.save({"w": torch.arange(100.0)}, os.path.join(root, "a")).result(TIMEOUT * 2)
        # A new layout needs a new staging slot, which rank 1 cannot allocate.
        sd = {"w": torch.arange(100.0), "v": torch.ones(1000)}
        real = os.posix_fallocate
        if rank == 1:

            def full(fd: int, offset: int, length: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            os.posix_fallocate = full  # type: ignore[assignment]
        t0 = time.monotonic()
        try:
            ck.save(sd, os.path.join(root, "b")).result(TIMEOUT * 2)
            out["error"] = None
        except ac.CheckpointError as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["s"] = time.monotonic() - t0
        os.posix_fallocate = real  # type: ignore[assignment]
        # Nothing is left held: the next save of the same layout works everywhere.
        ck.save(sd, os.path.join(root, "c")).result(TIMEOUT * 2)
    return out


def test_a_staging_failure_on_one_rank_fails_every_rank_with_its_error(tmp_path: Path) -> None:
    r0, r1 = run_ranks(2, _stage_fails_on_rank_1, str(tmp_path), timeout=400.0, pg_timeout=120.0)
    assert r1["error"] and "cannot allocate" in r1["error"], r1
    assert r0["error"] and "cannot allocate" in r0["error"], r0
    assert "rank(s) 1" in r0["error"] and "did not respond" not in r0["error"], r0
    assert r0["s"] < TIMEOUT, r0  # at once, not at the timeout
    with pytest.raises(CheckpointNotFoundError):
        ac.read_metadata(tmp_path / "b")
    ac.read_metadata(tmp_path / "c")
