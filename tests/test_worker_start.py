"""The worker starts in the background when the checkpointer is created (issue 14, item 4).

``AsyncCheckpointer()`` returns at once; its worker process comes up on a thread
of its own, and the first save (or ``start()``) waits for it. ``start=False``
keeps the lazy start, ``start=True`` the start that waits in the constructor.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist

import async_ckpt as ac
from async_ckpt._faults import FAIL_ENV
from async_ckpt.testing import assert_state_dicts_equal

WAIT_S = 120.0
"""A hang guard for the waits below, not a speed check: a cold start takes seconds on a loaded machine."""

START_THREAD = "async_ckpt-worker-start"


def _workers(pid: int | None = None) -> list[psutil.Process]:
    """The async_ckpt worker processes that ``pid`` (default: this process) started and that still run."""
    out = []
    for p in psutil.Process(pid).children():
        try:
            if "async_ckpt.worker.main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_for_workers(n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = _workers()
        if len(found) >= n:
            return found
        time.sleep(0.02)
    raise AssertionError(f"expected {n} worker process(es) before any save, found {len(_workers())}")


def _gone(pid: int) -> bool:
    """Wait (bounded) for ``pid`` to exit; a zombie has exited."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}


def _loads_back(sd: dict[str, torch.Tensor], path: Path) -> None:
    back = {k: torch.zeros_like(v) for k, v in sd.items()}
    ac.load(back, path)
    assert_state_dicts_equal(back, sd)


def test_default_starts_the_worker_before_any_save(tmp_path: Path) -> None:
    assert not _workers()
    with ac.AsyncCheckpointer(timeout=WAIT_S) as ck:
        (early,) = _wait_for_workers(1)  # no save yet: only the constructor can have started it
        sd = _state()
        ck.save(sd, tmp_path / "a").result(WAIT_S)
        assert ck.worker_pid == early.pid, "the first save should use the worker started in the background"
        assert ck.worker_starts == 1
    _loads_back(sd, tmp_path / "a")
    assert _gone(early.pid)


def test_start_false_starts_nothing_until_the_first_save(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer(timeout=WAIT_S, start=False) as ck:
        assert not any(t.name == START_THREAD for t in threading.enumerate())
        assert not _workers() and ck.worker_pid is None and ck.worker_starts == 0
        sd = _state(1)
        ck.save(sd, tmp_path / "a").result(WAIT_S)
        assert ck.worker_starts == 1 and ck.worker_pid is not None
    _loads_back(sd, tmp_path / "a")


def test_start_true_waits_in_the_constructor() -> None:
    with ac.AsyncCheckpointer(timeout=WAIT_S, start=True) as ck:
        assert ck.worker_pid is not None and ck.worker_starts == 1


def test_start_refuses_other_values() -> None:
    with pytest.raises(ValueError, match="start"):
        ac.AsyncCheckpointer(start="later")  # type: ignore[arg-type]


@pytest.mark.parametrize("when", ["at once", "once spawned"])
def test_close_during_the_background_start_leaves_nothing_behind(when: str) -> None:
    before = set(threading.enumerate())
    ck = ac.AsyncCheckpointer(timeout=WAIT_S)
    pids = [p.pid for p in _wait_for_workers(1)] if when == "once spawned" else []
    ck.close()
    for t in set(threading.enumerate()) - before:
        t.join(WAIT_S)
        assert not t.is_alive(), f"thread {t.name} outlived close()"
    assert not _workers()
    assert all(_gone(pid) for pid in pids)
    with pytest.raises(ac.CheckpointError, match="closed"):
        ck.save(_state(), "unused")


def test_failed_background_start_surfaces_at_the_first_save_and_a_later_save_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAIL_ENV, "worker_start")
    with ac.AsyncCheckpointer(timeout=WAIT_S) as ck:
        with pytest.raises(ac.CheckpointError, match="worker could not start") as info:
            ck.save(_state(), tmp_path / "a")
        assert "injected fault at 'worker_start'" in str(info.value)
        assert not _workers()
        monkeypatch.delenv(FAIL_ENV)
        sd = _state(2)
        ck.save(sd, tmp_path / "b").result(WAIT_S)
        assert ck.worker_starts == 1
    _loads_back(sd, tmp_path / "b")
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(tmp_path / "a")


def test_background_start_timeout_kills_the_worker_and_names_the_limit(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer(timeout=WAIT_S, worker_start_timeout=0.001) as ck:
        with pytest.raises(ac.WorkerDiedError, match=r"did not start within 0\.001s"):
            ck.start()
        assert not _workers()
        assert ck.worker_starts == 0


_AT_EXIT = textwrap.dedent(
    """
    import sys, time
    import psutil
    import async_ckpt as ac

    ck = ac.AsyncCheckpointer()
    if sys.argv[1] == "ready":
        ck.start()
        pid = ck.worker_pid
    else:
        while True:
            kids = [p for p in psutil.Process().children() if "worker.main" in " ".join(p.cmdline())]
            if kids:
                pid = kids[0].pid
                break
            time.sleep(0.01)
    print(pid, flush=True)
    # no close(): the interpreter exits with the checkpointer still open
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["spawned", "ready"])
def test_an_unused_checkpointer_leaves_no_worker_at_interpreter_exit(when: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _AT_EXIT, when], capture_output=True, text=True, timeout=WAIT_S, check=False
    )
    assert proc.returncode == 0, proc.stderr
    pid = int(proc.stdout.strip())
    assert _gone(pid), f"the worker {pid} outlived its trainer"


@pytest.mark.slow
@pytest.mark.ranks(2)
def test_two_checkpointers_made_back_to_back_on_two_ranks(rank, ckpt_dir) -> None:  # type: ignore[no-untyped-def]
    a = ac.AsyncCheckpointer(timeout=WAIT_S)
    b = ac.AsyncCheckpointer(timeout=WAIT_S)
    try:
        _wait_for_workers(2)
        sd_a = {"w": torch.arange(16.0), f"own{rank.rank}": torch.full((4,), float(rank.rank))}
        sd_b = {"v": torch.arange(8.0) * 3, f"mine{rank.rank}": torch.full((2,), 10.0 + rank.rank)}
        # b saves first: the workers' groups must pair up by construction order, not by use.
        b.save(sd_b, f"{ckpt_dir}/b").result(WAIT_S)
        a.save(sd_a, f"{ckpt_dir}/a").result(WAIT_S)
        assert a.worker_starts == 1 and b.worker_starts == 1
    finally:
        b.close()
        a.close()
    _loads_back(sd_a, Path(f"{ckpt_dir}/a"))
    _loads_back(sd_b, Path(f"{ckpt_dir}/b"))
    assert {f"own{r}" for r in range(2)} <= set(ac.read_metadata(f"{ckpt_dir}/a").tensors)


@pytest.mark.slow
@pytest.mark.ranks(2)
def test_made_before_init_process_group_saves_with_every_rank(rank, ckpt_dir) -> None:  # type: ignore[no-untyped-def]
    store = dist.distributed_c10d._get_default_store()
    dist.destroy_process_group()
    ck = ac.AsyncCheckpointer(timeout=WAIT_S)  # no group yet: its background worker saves alone
    try:
        dist.init_process_group(
            "gloo", store=dist.PrefixStore("late", store), rank=rank.rank, world_size=rank.world_size
        )
        sd = {"w": torch.arange(16.0), f"own{rank.rank}": torch.full((4,), float(rank.rank))}
        ck.save(sd, ckpt_dir).result(WAIT_S)
    finally:
        ck.close()
    assert {f"own{r}" for r in range(2)} <= set(ac.read_metadata(ckpt_dir).tensors)
    _loads_back(sd, Path(ckpt_dir))
