"""Collective error handling: one rank's failure reaches every rank, nobody hangs.

* ``assert_same_keys`` passes when every rank has the same keys and raises
  ``AssertionError`` naming the odd key on every rank otherwise.
* A state dict value that cannot be saved (``object()``) on one rank: that rank
  raises ``TypeError`` naming the key, the others raise ``CheckpointError``
  naming the failing rank, well before the process group's timeout, and no
  committed checkpoint is left at the path. The same when writing a shard
  fails on one rank (an injected storage error): the staging area is removed,
  and a checkpoint already at that path survives unchanged.

Both run in one 3-rank job (rank 0 is the coordinator, rank 2 a bystander),
and the group stays usable after the failed save.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.storage import LocalStorage

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

# Errors must reach every rank long before this; half of it is the test's bound (generous:
# three ranks on a busy 2-core machine).
PG_TIMEOUT = 60.0
BAD_RANK = 1


def _outcome(fn: Any) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        return {
            "type": type(exc).__name__,
            "msg": str(exc),
            "is_ckpt": isinstance(exc, ac.CheckpointError),
            "s": time.monotonic() - t0,
        }
    return {"type": None, "msg": "", "is_ckpt": False, "s": time.monotonic() - t0}


class _FailingStorage(LocalStorage):
    """The local file system, except that opening a shard fails on the chosen rank."""

    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail

    async def open_shard(self, location: str, token: str, name: str) -> Any:
        if self.fail:
            raise OSError(f"injected write failure for {name}")
        return await super().open_shard(location, token, name)


def _errors_body(rank: int, world: int, path: str, good_path: str, write_fail_path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base = {"model": {"w": torch.arange(6.0), "b": torch.ones(2)}, "step": 3}

    # assert_same_keys: equal keys pass, on every rank.
    ac.assert_same_keys(base)
    odd = {"model": {**base["model"]}, "step": 3}
    if rank == 1:
        odd["model"]["only_on_rank1"] = torch.zeros(1)
    out["same_keys"] = _outcome(lambda: ac.assert_same_keys(odd))
    # A key every rank but rank 2 has is named too.
    partial = {"a": 1} if rank == 2 else {"a": 1, "b": {"c": 2}}
    out["same_keys_missing"] = _outcome(lambda: ac.assert_same_keys(partial))

    # A value that cannot be saved on one rank.
    sd: dict[str, Any] = {"model": {**base["model"]}, "step": 3}
    if rank == BAD_RANK:
        sd["model"]["bad"] = object()
    out["save"] = _outcome(lambda: ac.save(sd, path))
    out["read_after"] = _outcome(lambda: ac.read_metadata(path))

    # The group still works: a good save and load afterwards.
    ac.save(base, good_path)
    target = {"model": {"w": torch.zeros(6), "b": torch.zeros(2)}, "step": 0}
    ac.load(target, good_path)
    assert torch.equal(target["model"]["w"], torch.arange(6.0)) and target["step"] == 3

    # A failure while writing shards (after the staging area exists), on one rank:
    # to a fresh path, and over the good checkpoint, which must survive unchanged.
    failing = _FailingStorage(fail=rank == BAD_RANK)
    newer = {"model": {"w": torch.arange(6.0) + 100, "b": torch.ones(2)}, "step": 4}
    out["write_fail"] = _outcome(lambda: ac.save(newer, write_fail_path, storage=failing))
    out["overwrite_fail"] = _outcome(lambda: ac.save(newer, good_path, storage=failing))
    target = {"model": {"w": torch.zeros(6), "b": torch.zeros(2)}, "step": 0}
    ac.load(target, good_path)
    assert torch.equal(target["model"]["w"], torch.arange(6.0)) and target["step"] == 3, target

    # A load that fails on one rank only (a key the checkpoint lacks) fails everywhere,
    # and leaves that rank's target untouched.
    target = {"model": {"w": torch.zeros(6), "b": torch.zeros(2)}, "step": 0}
    if rank == 2:
        target["model"]["extra"] = torch.zeros(3)
    out["load"] = _outcome(lambda: ac.load(target, good_path))
    out["load_untouched"] = bool(rank != 2 or (target["step"] == 0 and not target["model"]["w"].any()))
    return out


def test_errors_reach_every_rank(tmp_path: Path) -> None:
    path, good, write_fail = tmp_path / "ckpt", tmp_path / "good", tmp_path / "write_fail"
    results = run_ranks(
        3, _errors_body, str(path), str(good), str(write_fail), timeout=180.0, pg_timeout=PG_TIMEOUT
    )

    for rank, r in enumerate(results):
        sk = r["same_keys"]
        assert sk["type"] == "AssertionError", (rank, sk)
        assert "model.only_on_rank1" in sk["msg"], (rank, sk)
        assert "model.w" not in sk["msg"], (rank, sk)
        skm = r["same_keys_missing"]
        assert skm["type"] == "AssertionError" and "b.c" in skm["msg"], (rank, skm)

        save = r["save"]
        assert save["s"] < PG_TIMEOUT / 2, f"rank {rank} waited {save['s']:.1f}s: it hung until a timeout"
        if rank == BAD_RANK:
            assert save["type"] == "TypeError", (rank, save)
            assert "model.bad" in save["msg"], (rank, save)
        else:
            assert save["is_ckpt"], (rank, save)
            assert re.search(rf"\brank(\(s\))? {BAD_RANK}\b", save["msg"]), (rank, save)
        read = r["read_after"]
        assert read["is_ckpt"], (rank, read)

        load = r["load"]
        assert load["is_ckpt"] and load["s"] < PG_TIMEOUT / 2, (rank, load)
        if rank == 2:
            assert "model.extra" in load["msg"], (rank, load)
        else:
            assert re.search(r"\brank(\(s\))? 2\b", load["msg"]), (rank, load)
        assert r["load_untouched"], rank

        for what in ("write_fail", "overwrite_fail"):
            wf = r[what]
            assert wf["type"] is not None and wf["s"] < PG_TIMEOUT / 2, (rank, what, wf)
            assert "injected write failure" in wf["msg"], (rank, what, wf)
            if rank != BAD_RANK:
                assert wf["is_ckpt"], (rank, what, wf)
                assert re.search(rf"\brank(\(s\))? {BAD_RANK}\b", wf["msg"]), (rank, what, wf)

    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(path)
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(write_fail)
    # Nothing half-written (no staging directory) is left next to the checkpoints either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good"]
    assert ac.read_metadata(good).world_size == 3
