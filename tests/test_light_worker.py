"""The worker runs without torch (issue 14, "a light worker").

It writes bytes from shared memory: plan, layout, metadata and the bytes it
writes are torch-free, so the process never loads libtorch. Checked from the
outside, on the worker's memory map, after saves that take every worker path:
a planned save, a cached-plan save, a replica-subset save on 2 ranks (the
workers' own store and collectives), and a budgeted save in rounds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.testing import same_bits


def _libtorch_mapped(pid: int) -> list[str]:
    """torch's own files mapped by ``pid``: by torch's install folder, never by a path's wording.

    A virtual environment under ``/opt/torch/`` maps numpy from a path with ``/torch/`` in it.
    """
    torch_dir = os.path.dirname(torch.__file__) + os.sep
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split()[-1] for line in f if line.rstrip().count(" ") >= 5}
    return sorted(
        p for p in paths if p.startswith(torch_dir) or os.path.basename(p).startswith(("libtorch", "libc10"))
    )


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 7, generator=g),
        "b16": torch.randn(65, generator=g).to(torch.bfloat16),
        "i8": torch.randint(-100, 100, (33,), dtype=torch.int8, generator=g),
        "flag": torch.tensor([True, False]),
        "empty": torch.empty(0, 3),
        "step": seed,
        "dtype": torch.float16,
    }


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
def test_worker_never_loads_torch(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer(start=True, timeout=120) as ck:
        pid = ck.worker_pid
        assert pid is not None
        for i in range(3):  # a planned save, then cached-plan saves
            ck.save(_state(i), tmp_path / f"c{i}").result(timeout=120)
        assert _libtorch_mapped(pid) == []
    assert _libtorch_mapped(os.getpid()), "the check finds torch where it is loaded: this process"
    for i in range(3):
        out = ac.load_state_dict(tmp_path / f"c{i}")
        want = _state(i)
        assert out.keys() == want.keys()
        for k, v in want.items():
            assert same_bits(out[k], v) if isinstance(v, torch.Tensor) else out[k] == v, k


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
def test_budgeted_worker_never_loads_torch(tmp_path: Path) -> None:
    state = {f"t{i}": torch.full((64, 64), float(i)) for i in range(12)}
    with ac.AsyncCheckpointer(start=True, timeout=120, staging_budget=64 << 10) as ck:
        pid = ck.worker_pid
        assert pid is not None
        ck.save(state, tmp_path / "c").result(timeout=120)
        assert _libtorch_mapped(pid) == []
    out = ac.load_state_dict(tmp_path / "c")
    assert all(same_bits(out[k], v) for k, v in state.items())


def test_worker_modules_import_without_torch() -> None:
    """What the worker imports, in a fresh interpreter: no torch, and no module that needs it."""
    code = (
        "import sys; import async_ckpt.worker.main; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _two_rank_body(rank: int, world: int, root: str) -> list[str]:
    import torch.distributed as dist

    state = {"rep": torch.arange(4096.0), "mine": torch.full((10,), float(rank)), "step": 7}
    with ac.AsyncCheckpointer(start=True, timeout=60) as ck:
        pid = ck.worker_pid
        assert pid is not None
        for i in range(3):  # planned, then replica-subset staging with a cached plan
            ck.save(state, f"{root}/c{i}").result(timeout=120)
        mapped = _libtorch_mapped(pid)
    dist.barrier()
    return mapped


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/maps")
def test_two_rank_workers_never_load_torch(tmp_path: Path) -> None:
    results = run_ranks(2, _two_rank_body, str(tmp_path), timeout=170.0, pg_timeout=60.0)
    assert results == [[], []]
    out = ac.load_state_dict(tmp_path / "c2")
    assert same_bits(out["rep"], torch.arange(4096.0))
