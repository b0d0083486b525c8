"""Errors raised in the background worker reach the caller as their own public type.

A caller of ``pending.result()`` catches ``ac.RankTimeoutError`` or
``ac.RanksFailedError`` like any other exception the package exports; the
worker's traceback stays attached as the cause.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.inflight import RemoteError

pytestmark = pytest.mark.slow


def _rank_1_never_saves(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with ac.AsyncCheckpointer(timeout=5.0) as ck:
        ck.start()
        if rank == 0:
            try:
                ck.save({"w": torch.arange(10.0)}, os.path.join(root, "a")).result(120)
            except ac.CheckpointError as exc:
                out["type"] = type(exc).__name__
                out["is_timeout"] = isinstance(exc, ac.RankTimeoutError)
                out["ranks"] = getattr(exc, "ranks", None)
                out["message"] = str(exc)
                out["cause"] = type(exc.__cause__).__name__
    return out


def test_a_rank_timeout_in_the_worker_is_raised_as_rank_timeout_error(tmp_path: Path) -> None:
    r0, _ = run_ranks(2, _rank_1_never_saves, str(tmp_path), timeout=300.0)
    assert r0["is_timeout"], r0
    assert r0["ranks"] == [1], r0
    assert (
        "rank(s) 1 did not respond" in r0["message"] and "failed in the background worker" in r0["message"]
    ), r0
    assert r0["cause"] == RemoteError.__name__, r0


def test_an_unknown_error_type_stays_a_checkpoint_error() -> None:
    from async_ckpt.inflight import remote_error
    from async_ckpt.worker.messages import Finished

    err = remote_error("ck", Finished(1, error="boom", error_type="KeyError", traceback="tb"))
    assert type(err) is ac.CheckpointError and "KeyError: boom" in str(err)
    err = remote_error("ck", Finished(1, error="x: rank(s) 1 did not respond", error_type="RankTimeoutError"))
    assert type(err) is ac.RankTimeoutError and "did not respond" in str(err)
