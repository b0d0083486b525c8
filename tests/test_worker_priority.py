"""The worker's priority: nice by default; with ``worker_idle=True`` only the time training leaves.

SCHED_IDLE is opt-in: a trainer that keeps every core busy can starve an
idle-class worker for minutes (measured: one save took 196 s to become
durable instead of about 3 s; docs/benchmarks.md), and a starved worker can
make the other ranks' workers time out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

import async_ckpt as ac
from async_ckpt.worker.priority import IOPRIO_CLASS_IDLE, ioprio_class

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes"
)


def _threads(pid: int) -> list[int]:
    return [int(t) for t in os.listdir(f"/proc/{pid}/task")]


def _nice(tid: int) -> int:
    # Field 19 of /proc/<tid>/stat; the name in field 2 may hold spaces, so count from its ')'.
    stat = Path(f"/proc/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_a_started_worker_runs_under_sched_idle_and_idle_io(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer(start=True, timeout=120, worker_idle=True) as ck:
        pid = ck.worker_pid
        assert pid is not None
        # A save first: the threads its writer starts must inherit the classes too.
        ck.save({"w": torch.arange(1000.0)}, tmp_path / "c").result(timeout=120)
        tids = _threads(pid)
        assert tids
        for tid in tids:
            assert os.sched_getscheduler(tid) == os.SCHED_IDLE, f"thread {tid} of worker {pid}"
            assert ioprio_class(tid) == IOPRIO_CLASS_IDLE, f"thread {tid} of worker {pid}"
            assert _nice(tid) >= min(19, os.nice(0) + 15), f"thread {tid} of worker {pid}"


def test_worker_idle_false_keeps_the_normal_classes(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer(start=True, timeout=120, worker_idle=False, worker_nice=3) as ck:
        pid = ck.worker_pid
        assert pid is not None
        ck.save({"w": torch.arange(10.0)}, tmp_path / "c").result(timeout=120)
        for tid in _threads(pid):
            assert os.sched_getscheduler(tid) == os.SCHED_OTHER
            assert ioprio_class(tid) != IOPRIO_CLASS_IDLE
            assert _nice(tid) == min(19, os.nice(0) + 3)


def test_the_default_worker_is_nice_but_not_idle_class(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer(start=True, timeout=120) as ck:
        pid = ck.worker_pid
        assert pid is not None
        ck.save({"w": torch.arange(10.0)}, tmp_path / "c").result(timeout=120)
        for tid in _threads(pid):
            assert os.sched_getscheduler(tid) == os.SCHED_OTHER, f"thread {tid} of worker {pid}"
            assert ioprio_class(tid) != IOPRIO_CLASS_IDLE, f"thread {tid} of worker {pid}"
            assert _nice(tid) >= min(19, os.nice(0) + 15), f"thread {tid} of worker {pid}"
