"""CheckpointManager on several ranks: rank 0's housekeeping never touches another rank's save in flight."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt import _faults
from async_ckpt.manager import step_name

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow


def _body(rank: int, world: int, root: str) -> dict[str, Any]:
    if rank == 0:
        # Rank 0's retention after step 2 runs late, when rank 1's worker (with the
        # plan cached) is already writing step 4: it must not take that for a leftover.
        _faults.set_hook("retention", lambda: time.sleep(3.0))
    # Replicated tensors: the planner spreads their writing over both ranks.
    state: dict[str, Any] = {f"w{i}": torch.full((16384,), float(i)) for i in range(8)}
    state["step"] = 0
    pendings = []
    with ac.CheckpointManager(root, keep_last=2) as mgr:
        for step in (2, 4, 6):
            state["step"] = step
            for i in range(8):
                state[f"w{i}"].add_(1.0)
            pending = mgr.save(step, state)
            pendings.append(pending)
            if rank == 0:
                pending.result(timeout=120)
                time.sleep(4.0)  # rank 1 runs ahead into the next save meanwhile
        mgr.wait(timeout=120)
        steps = mgr.steps()
        errors = [repr(p.exception(timeout=120)) for p in pendings if p.exception(timeout=120) is not None]
    assert not errors, f"rank {rank}: {errors}"
    return {"steps": steps}


def test_rank_zeros_retention_never_removes_another_ranks_save_in_flight(tmp_path: Path) -> None:
    # An interrupted earlier run's leftovers are still swept, before the first save.
    root = tmp_path / "run"
    leftover = root / ".step-00000001.tmp-deadbeefdeadbeef"
    leftover.mkdir(parents=True)
    (leftover / "shard-r00000-00.safetensors").write_bytes(b"x" * 100)
    (root / step_name(3)).mkdir()
    results = run_ranks(2, _body, str(root), timeout=300)
    assert results[0]["steps"] == [4, 6]
    assert not leftover.exists() and not (root / step_name(3)).exists()
    for step in (4, 6):
        got: dict[str, Any] = {f"w{i}": torch.zeros(16384) for i in range(8)}
        got["step"] = 0
        ac.load(got, tmp_path / "run" / step_name(step))
        assert got["step"] == step
        for i in range(8):
            assert torch.equal(got[f"w{i}"], torch.full((16384,), float(i + step // 2)))
