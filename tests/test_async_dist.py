"""The async save path on several ranks (gloo, spawned processes, one worker per rank).

* 2 and 4 ranks: ``await ck.async_save`` of replicated tensors, uneven
  ``Shard(0)`` DTensors and per-rank values; loaded back bit-exact on the ranks
  (DTensors into DTensors, per-rank values per rank) and in the parent as plain
  tensors; the second save of the same layout uses the cached plan.
* 2 ranks, faults: a ``TypeError`` in ``save()`` on rank 1 only fails rank 0's
  pending promptly; a rank-1 worker SIGKILLed while writing fails rank 0's
  pending within the timeout with an error naming rank 1; both ranks' next
  save succeeds after each.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.testing import same_bits

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

TIMEOUT = 10.0
KILL_ENV = "ASYNC_CKPT_KILL_AT"


def _full(world: int, version: int) -> dict[str, torch.Tensor]:
    """The global tensors of save ``version`` (identical on every rank and in the parent)."""
    g = torch.Generator().manual_seed(1000 + version)
    return {
        "rep": torch.randn(257, 3, generator=g),
        "rep_bf16": torch.randn(40, generator=g).to(torch.bfloat16),
        "rep_int": torch.randint(0, 1 << 30, (11,), generator=g),
        # Shard(0), uneven: 7 rows -> 4+3 on 2 ranks, 2+2+2+1 on 4 ranks.
        "sharded": torch.randn(7, 5, generator=g),
        # world + 1 rows -> 2+1 on 2 ranks, 2+2+1+0 (an empty shard) on 4 ranks.
        "sharded_f16": torch.randn(world + 1, 2, generator=g).half(),
    }


def _state(world: int, rank: int, version: int, mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    f = _full(world, version)
    return {
        "model": {
            "rep": f["rep"],
            "rep_bf16": f["rep_bf16"],
            "rep_int": f["rep_int"],
            "sharded": distribute_tensor(f["sharded"], mesh, [Shard(0)]),
            "sharded_f16": distribute_tensor(f["sharded_f16"], mesh, [Shard(0)]),
        },
        "step": 100 + version,
        "rank_name": f"rank{rank}-v{version}",
        "rank_data": {"r": rank, "list": [rank, version, "x"]},
    }


def _blank(world: int, rank: int, mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    f = _full(world, 0)
    return {
        "model": {
            "rep": torch.zeros_like(f["rep"]),
            "rep_bf16": torch.zeros_like(f["rep_bf16"]),
            "rep_int": torch.zeros_like(f["rep_int"]),
            "sharded": distribute_tensor(torch.zeros_like(f["sharded"]), mesh, [Shard(0)]),
            "sharded_f16": distribute_tensor(torch.zeros_like(f["sharded_f16"]), mesh, [Shard(0)]),
        },
        "step": -1,
        "rank_name": "",
        "rank_data": {"r": -1, "list": [-1, -1, ""]},
    }


def _check_loaded(got: dict[str, Any], want: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor

    for k, w in want["model"].items():
        g = got["model"][k]
        if isinstance(w, DTensor):
            assert isinstance(g, DTensor), k
            assert same_bits(g.to_local(), w.to_local()), k
            assert same_bits(g.full_tensor(), w.full_tensor()), k
        else:
            assert same_bits(g, w), k
    for k in ("step", "rank_name", "rank_data"):
        assert got[k] == want[k], (k, got[k], want[k])


def _mutate_in_place(sd: dict[str, Any]) -> None:
    with torch.no_grad():
        for t in sd["model"].values():
            local = t.to_local() if hasattr(t, "to_local") else t
            local.add_(3)


# ------------------------------------------------------------ save and load


def _outcome(exc: BaseException | None, t0: float) -> dict[str, Any]:
    return {
        "type": None if exc is None else type(exc).__name__,
        "ckpt": isinstance(exc, ac.CheckpointError),
        "msg": "" if exc is None else str(exc),
        "s": time.monotonic() - t0,
    }


async def _try_save(ck: ac.AsyncCheckpointer, sd: dict[str, Any], path: str) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        await (await ck.async_save(sd, path))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        return _outcome(exc, t0)
    return _outcome(None, t0)


def _committed(path: str) -> bool:
    try:
        ac.read_metadata(path)
    except ac.CheckpointError:
        return False
    return True


async def _save_body(rank: int, world: int, root: str, faults: bool) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    if faults and rank == 1:
        # Rank 1's worker dies while writing its shards of save 3 (inherited at worker start).
        os.environ[KILL_ENV] = "write:3:1"
    try:
        # A short timeout where the test is about it; a generous one otherwise (loaded CI machines).
        ck = ac.AsyncCheckpointer(timeout=TIMEOUT if faults else 60.0, start=True)
        dist.barrier()
        async with ck:
            # Saves 0 and 1: same layout, new values; the second uses the cached plan.
            for version in (0, 1):
                sd = _state(world, rank, version, mesh)
                expected = _state(world, rank, version, mesh)
                pending = await ck.async_save(sd, f"{root}/v{version}")
                _mutate_in_place(sd)  # after the await: must not change what is saved
                md = await pending
                assert isinstance(md, ac.Metadata) and md.stats is not None
                out[f"cached{version}"] = md.stats.plan_cached
                out[f"world{version}"] = md.world_size
                target = _blank(world, rank, mesh)
                ac.load(target, f"{root}/v{version}")
                _check_loaded(target, expected)
            out["pid"] = ck.worker_pid
            if not faults:
                return out

            # Save 2: a value that cannot be saved, on rank 1 only.
            sd = _state(world, rank, 0, mesh)
            bad = {**sd, "bad": object()} if rank == 1 else sd
            out["bad"] = await _try_save(ck, bad, f"{root}/bad")
            out["bad_committed"] = _committed(f"{root}/bad")

            # Save 3: rank 1's worker is SIGKILLed while writing.
            dist.barrier()
            out["killed"] = await _try_save(ck, sd, f"{root}/k1")
            out["killed_committed"] = _committed(f"{root}/k1")
            # Restart the worker before the next save, so that its start-up time
            # (long on a loaded machine) does not count against the other rank's timeout.
            ck.start()
            out["new_pid"] = ck.worker_pid != out["pid"]
            dist.barrier()

            # Save 4 works on both ranks.
            out["after"] = await _try_save(ck, sd, f"{root}/k2")
            target = _blank(world, rank, mesh)
            ac.load(target, f"{root}/k2")
            _check_loaded(target, _state(world, rank, 0, mesh))
    finally:
        os.environ.pop(KILL_ENV, None)
    return out


def _check_parent_load(root: Path, name: str, world: int, version: int) -> None:
    """The parent (no process group) loads the tensors as plain tensors, resharded whole."""
    f = _full(world, version)
    target = {"model": {k: torch.zeros_like(v) for k, v in f.items()}}
    ac.load(target, root / name)
    for k, v in f.items():
        assert same_bits(target["model"][k], v), (name, k)
    md = ac.read_metadata(root / name)
    assert md.tensors["model.sharded"].shape == tuple(f["sharded"].shape)
    assert md.tensors["model.sharded"].dtype == torch.float32


def _check_saves(results: list[dict[str, Any]], root: Path, world: int) -> None:
    for rank, r in enumerate(results):
        assert r["cached0"] is False and r["cached1"] is True, (rank, r)
        assert r["world0"] == world and r["world1"] == world, (rank, r)
    assert len({r["pid"] for r in results}) == world
    for version in (0, 1):
        _check_parent_load(root, f"v{version}", world, version)


def test_async_save_four_ranks(tmp_path: Path) -> None:
    results = run_ranks(4, _save_body, str(tmp_path), False, timeout=170.0, pg_timeout=60.0)
    _check_saves(results, tmp_path, 4)


def test_async_save_two_ranks_with_faults(tmp_path: Path) -> None:
    results = run_ranks(2, _save_body, str(tmp_path), True, timeout=170.0, pg_timeout=60.0)
    _check_saves(results, tmp_path, 2)
    r0, r1 = results

    # TypeError on rank 1 only: rank 1 raises it from save(), rank 0's pending
    # fails promptly (well within the timeout), naming rank 1; nothing committed.
    assert r1["bad"]["type"] == "TypeError" and "bad" in r1["bad"]["msg"], r1["bad"]
    assert r0["bad"]["ckpt"], r0["bad"]
    assert r0["bad"]["s"] < TIMEOUT, r0["bad"]
    assert re.search(r"rank(\(s\))?\s*1\b", r0["bad"]["msg"]), r0["bad"]["msg"]
    assert not r0["bad_committed"] and not r1["bad_committed"]

    # Rank 1's worker died writing: its own pending fails at once; rank 0's
    # fails within about the timeout, with an error naming rank 1.
    assert r1["killed"]["ckpt"], r1["killed"]
    assert r0["killed"]["ckpt"], r0["killed"]
    # Bounded well below the 60 s trainer group timeout, with room for a busy machine.
    assert r0["killed"]["s"] < TIMEOUT + 40, r0["killed"]
    assert re.search(r"rank(\(s\))?\s*1\b", r0["killed"]["msg"]), r0["killed"]["msg"]
    assert not r0["killed_committed"] and not r1["killed_committed"]

    # Both ranks' next save succeeded; rank 1 on a new worker.
    assert r0["after"]["type"] is None and r1["after"]["type"] is None, (r0["after"], r1["after"])
    assert r1["new_pid"] and not r0["new_pid"]
    _check_parent_load(tmp_path, "k2", 2, 0)
