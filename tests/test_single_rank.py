"""One rank saving and loading alone in a 2-rank gloo job (``process_group=ac.SINGLE_RANK``).

Rank 0 saves (blocking, through an ``AsyncCheckpointer``, a ``CheckpointManager``
and ``async_save``) while rank 1 knows nothing of it and runs "training" steps:
gloo all_reduces that pair with rank 0's own steps. A save that touched the
default group (a gather, a barrier, a store rendezvous) would pair with one of
those all_reduces and hang or scramble them; here every step's sum is right and
rank 0's save completes while rank 1 sits in its collective. Then each rank
loads alone, and both load together over the default group. A DTensor of
which rank 0 holds only a shard is refused by key; a replicated one saves whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

import async_ckpt as ac

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

TIMEOUT = 60.0
STEPS = 12


def _state(rank: int) -> dict[str, Any]:
    return {
        "model": {"w": torch.arange(1000.0) + 100 * rank, "b": torch.full((3, 4), float(rank))},
        "step": 7 + rank,
    }


def _zeros() -> dict[str, Any]:
    return {"model": {"w": torch.zeros(1000), "b": torch.zeros(3, 4)}, "step": 0}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        torch.equal(a["model"]["w"], b["model"]["w"])
        and torch.equal(a["model"]["b"], b["model"]["b"])
        and a["step"] == b["step"]
    )


def _train_step(rank: int, i: int) -> None:
    t = torch.tensor([float(rank + 10 * i)])
    dist.all_reduce(t)
    # Both ranks' contributions, and only theirs: a save's collective mixed in would break this.
    assert t.item() == 1 + 20 * i, (i, t.item())


def _blocking_and_manager_on_rank_0(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rank == 0:
        md = ac.save(_state(0), os.path.join(root, "blocking"), process_group=ac.SINGLE_RANK)
        out["saved_keys"] = sorted(md.tensors)
        # Tensors do not go back through the harness's queue (their memory dies with the rank).
        loaded = ac.load_state_dict(os.path.join(root, "blocking"), process_group=ac.SINGLE_RANK)
        out["loaded"] = _same(loaded, _state(0))
        with ac.CheckpointManager(
            os.path.join(root, "steps"), keep_last=1, process_group=ac.SINGLE_RANK, timeout=TIMEOUT
        ) as mgr:
            mgr.save(1, _state(0))
            mgr.save(2, _state(0)).result(TIMEOUT)
            mgr.wait()
            out["steps"] = mgr.steps()
            target = _zeros()
            out["restored_step"] = mgr.restore(target)
            out["restored"] = _same(target, _state(0))
    # Rank 1 is inside this all_reduce for the whole of rank 0's saves above.
    for i in range(STEPS):
        _train_step(rank, i)
    return out


def test_a_blocking_save_and_a_manager_on_rank_0_alone_need_nothing_of_rank_1(tmp_path: Path) -> None:
    r0, r1 = run_ranks(2, _blocking_and_manager_on_rank_0, str(tmp_path), timeout=300.0, pg_timeout=120.0)
    assert r1 == {}
    assert r0["saved_keys"] == ["model.b", "model.w"]
    assert r0["loaded"], r0
    assert r0["steps"] == [2] and r0["restored_step"] == 2 and r0["restored"], r0
    # Saved by rank 0 alone, it reads in a plain process like any one-process checkpoint.
    assert ac.read_metadata(tmp_path / "blocking").world_size == 1


def _async_on_rank_0_while_rank_1_trains(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    path = os.path.join(root, "async")
    ck = ac.AsyncCheckpointer(process_group=ac.SINGLE_RANK, timeout=TIMEOUT) if rank == 0 else None
    pendings = []
    for i in range(STEPS):
        if ck is not None and i in (2, 6):
            # Staging and the worker's start are rank 0's alone; rank 1 is already in step i.
            pendings.append(ck.save(_state(0), f"{path}-{i}", overlap=i == 6))
            if i == 6:
                pendings[-1].staged.wait(TIMEOUT)
        _train_step(rank, i)
    out["trained"] = STEPS
    if ck is not None:
        out["metadata_world"] = [p.result(TIMEOUT * 2).world_size for p in pendings]
        worker = ck.worker_pid
        ck.close(timeout=TIMEOUT)
        out["worker_gone"] = worker is not None and ck.worker_pid is None and not _alive(worker)
    saved = f"{path}-6"

    # Each rank loads alone while the other waits in a collective of its own.
    alone = _zeros()
    if rank == 1:
        dist.barrier()
    ac.load(alone, saved, process_group=ac.SINGLE_RANK)
    if rank == 0:
        dist.barrier()
    out["alone"] = _same(alone, _state(0))
    out["alone_tree"] = _same(ac.load_state_dict(saved, process_group=ac.SINGLE_RANK), _state(0))

    # And together, over the default group: a collective load and a collective async save,
    # whose worker group must not be thrown off by rank 0's single-rank checkpointer.
    together = _zeros()
    ac.load(together, saved)
    out["together"] = _same(together, _state(0))
    with ac.AsyncCheckpointer(timeout=TIMEOUT) as both:
        md = both.save(_state(rank), os.path.join(root, "both")).result(TIMEOUT * 2)
    out["both_world"] = md.world_size
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: it only waits to be reaped.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_an_async_save_on_rank_0_alone_neither_hangs_nor_blocks_rank_1(tmp_path: Path) -> None:
    r0, r1 = run_ranks(
        2, _async_on_rank_0_while_rank_1_trains, str(tmp_path), timeout=400.0, pg_timeout=120.0
    )
    assert r0["trained"] == r1["trained"] == STEPS
    assert r0["metadata_world"] == [1, 1]
    assert r0["worker_gone"], r0
    for r in (r0, r1):
        assert r["alone"] and r["alone_tree"] and r["together"], r
        assert r["both_world"] == 2, r
    assert ac.read_metadata(tmp_path / "async-2").world_size == 1


def _dtensors_on_rank_0(rank: int, world: int, root: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    sharded = DTensor.from_local(torch.arange(4.0) + 4 * rank, mesh, [Shard(0)], run_check=False)
    replicated = DTensor.from_local(torch.arange(6.0), mesh, [Replicate()], run_check=False)
    out: dict[str, Any] = {}
    if rank == 0:
        bad = {"model": {"layer": {"weight": sharded}, "bias": replicated}}
        with pytest.raises(ValueError) as blocking:
            ac.save(bad, os.path.join(root, "sharded"), process_group=ac.SINGLE_RANK)
        out["blocking"] = str(blocking.value)
        with ac.AsyncCheckpointer(process_group=ac.SINGLE_RANK, timeout=TIMEOUT) as ck:
            with pytest.raises(ValueError) as background:
                ck.save(bad, os.path.join(root, "sharded-async"))
            out["async"] = str(background.value)
            # Replicated everywhere, this rank's shard is the whole tensor: that saves.
            ck.save({"bias": replicated}, os.path.join(root, "replicated")).result(TIMEOUT * 2)
        loaded = ac.load_state_dict(os.path.join(root, "replicated"), process_group=ac.SINGLE_RANK)
        out["replicated"] = loaded["bias"].tolist()
    dist.barrier()
    # Each rank alone fills its own shard of a sharded target.
    target = DTensor.from_local(torch.zeros(3), mesh, [Shard(0)], run_check=False)
    ac.load({"bias": target}, os.path.join(root, "replicated"), process_group=ac.SINGLE_RANK)
    out["shard"] = target.to_local().tolist()
    return out


def test_a_single_rank_save_refuses_a_dtensor_sharded_over_other_ranks_naming_the_key(tmp_path: Path) -> None:
    r0, r1 = run_ranks(2, _dtensors_on_rank_0, str(tmp_path), timeout=300.0, pg_timeout=120.0)
    for message in (r0["blocking"], r0["async"]):
        assert "'model.layer.weight'" in message and "full_tensor()" in message, message
        assert "model.bias" not in message, message
    assert r0["replicated"] == torch.arange(6.0).tolist()
    assert r0["shard"] == [0.0, 1.0, 2.0] and r1["shard"] == [3.0, 4.0, 5.0], (r0, r1)
    assert not (tmp_path / "sharded").exists() and not (tmp_path / "sharded-async").exists()


_EXIT_SCRIPT = """
import asyncio, os, sys
from datetime import timedelta
import torch, torch.distributed as dist
import async_ckpt as ac

rank, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
store = dist.TCPStore("127.0.0.1", port, 3, is_master=False, timeout=timedelta(seconds=60))
dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=120))

async def main():
    if rank == 0:
        state = {"w": torch.arange(100_000.0), "step": 3}
        await ac.async_save(state, os.path.join(root, "ckpt"), process_group=ac.SINGLE_RANK)
    for i in range(5):
        t = torch.tensor([float(rank + 10 * i)])
        dist.all_reduce(t)
        assert t.item() == 1 + 20 * i, t

asyncio.run(main())
dist.destroy_process_group()
print("trained", rank, flush=True)
"""


def test_async_save_on_rank_0_alone_is_committed_by_the_exit_of_rank_0(tmp_path: Path) -> None:
    # Real interpreter exits: rank 0 never awaits its save; the default checkpointer's
    # close at exit must finish it and stop the worker without waiting for rank 1.
    script = tmp_path / "rank.py"
    script.write_text(_EXIT_SCRIPT)
    store = dist.TCPStore(
        "127.0.0.1", 0, 3, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(store.port), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0 and f"trained {r}" in text, (r, p.returncode, text)
    loaded = ac.load_state_dict(tmp_path / "ckpt")
    assert torch.equal(loaded["w"], torch.arange(100_000.0)) and loaded["step"] == 3
