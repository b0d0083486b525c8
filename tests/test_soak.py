"""Soak: 300 consecutive async saves through one AsyncCheckpointer leak nothing.

The saves rotate over five checkpoint paths (so most saves replace an existing
checkpoint: the old one is moved aside and deleted), and every tenth save is
loaded back and compared bit for bit. After a warm-up of 30 saves the
resources of the trainer (this process) and its worker are measured, and
again after the last save:

* RSS of trainer + worker: within 10% + 8 MB (allocator arenas and the
  page cache of freshly written files are not byte-stable);
* open file descriptors, trainer threads, child processes, staging memfds
  and /dev/shm entries: equal. Slack: /dev/shm entries other processes make
  (this machine runs other test suites concurrently; multiprocessing's
  ``sem.mp-*``), since nothing this test runs creates one; the worker's
  thread count may grow up to asyncio's default-executor bound (see below).

``pytest -s`` prints the figures; they are in the assertion messages too.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

import async_ckpt as ac

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

N_SAVES = 300
WARMUP = 30
N_PATHS = 5
KILL_ENV = "ASYNC_CKPT_KILL_AT"
MB = 1 << 20


def _memfds(pid: int) -> int:
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if "async_ckpt" in os.readlink(fd):
                n += 1
        except OSError:
            pass
    return n


def _settled_threads(proc: psutil.Process) -> int:
    """The thread count without threads that are just exiting (a joined thread lingers briefly)."""
    samples = []
    for _ in range(10):
        samples.append(proc.num_threads())
        time.sleep(0.01)
    return min(samples)


def _figures(ck: ac.AsyncCheckpointer) -> dict[str, Any]:
    trainer = psutil.Process()
    assert ck.worker_pid is not None
    worker = psutil.Process(ck.worker_pid)
    return {
        "rss_mb": (trainer.memory_info().rss + worker.memory_info().rss) / MB,
        "trainer_rss_mb": trainer.memory_info().rss / MB,
        "worker_rss_mb": worker.memory_info().rss / MB,
        "fds": trainer.num_fds() + worker.num_fds(),
        "trainer_threads": _settled_threads(trainer),
        "worker_threads": _settled_threads(worker),
        "children": len(trainer.children(recursive=True)),
        "memfds": _memfds(trainer.pid) + _memfds(worker.pid),
        "shm": set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set(),
        "worker_pid": worker.pid,
    }


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            f"layer{i}": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}
            for i in range(6)
        },
        "optim": {"lr": 1e-3, "betas": [0.9, 0.999]},
        "step": 0,
    }


@pytest.mark.timeout(900)
def test_soak_300_async_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KILL_ENV, raising=False)
    sd = _state()
    t0 = time.monotonic()
    loads = 0
    with ac.AsyncCheckpointer() as ck:
        for i in range(1, N_SAVES + 1):
            sd["step"] = i
            for layer in sd["model"].values():  # a training step: the values change in place
                layer["w"].add_(0.001 * i)
            path = tmp_path / f"ckpt-{i % N_PATHS}"
            md = ck.save(sd, path).result(60)
            assert md.stats is not None and (md.stats.plan_cached or i == 1)
            if i % 10 == 0:
                target: dict[str, Any] = {
                    "model": {
                        k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in sd["model"].items()
                    },
                    "optim": {"lr": 0.0, "betas": [0.0, 0.0]},
                    "step": 0,
                }
                ac.load(target, path)
                loads += 1
                assert target["step"] == i and target["optim"] == sd["optim"]
                for k, v in sd["model"].items():
                    for n, t in v.items():
                        assert torch.equal(target["model"][k][n].view(torch.int32), t.view(torch.int32)), (
                            i,
                            k,
                            n,
                        )
            if i == WARMUP:
                warm = _figures(ck)
        end = _figures(ck)
        assert ck.worker_starts == 1
    elapsed = time.monotonic() - t0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"ckpt-{k}" for k in range(N_PATHS))

    new_shm = end["shm"] - warm["shm"]
    foreign_shm = {n for n in new_shm if n.startswith(("sem.mp-", "mp-"))}
    summary = (
        f"{N_SAVES} saves + {loads} loads in {elapsed:.1f}s ({elapsed / N_SAVES * 1000:.0f} ms/save); "
        f"after save {WARMUP} -> after save {N_SAVES}: "
        f"RSS trainer+worker {warm['rss_mb']:.1f} -> {end['rss_mb']:.1f} MB "
        f"(trainer {warm['trainer_rss_mb']:.1f} -> {end['trainer_rss_mb']:.1f}, "
        f"worker {warm['worker_rss_mb']:.1f} -> {end['worker_rss_mb']:.1f}); "
        f"fds {warm['fds']} -> {end['fds']}; "
        f"threads trainer {warm['trainer_threads']} -> {end['trainer_threads']}, "
        f"worker {warm['worker_threads']} -> {end['worker_threads']}; "
        f"children {warm['children']} -> {end['children']}; "
        f"staging memfds {warm['memfds']} -> {end['memfds']}; "
        f"/dev/shm entries {len(warm['shm'])} -> {len(end['shm'])} (new: {sorted(new_shm)})"
    )
    print(f"\n[soak] {summary}")
    assert end["worker_pid"] == warm["worker_pid"], summary
    assert end["rss_mb"] <= warm["rss_mb"] * 1.10 + 8, summary
    assert end["fds"] == warm["fds"], summary
    assert end["trainer_threads"] == warm["trainer_threads"], summary
    # The worker runs blocking file calls through asyncio's default executor, which starts
    # threads on demand up to min(32, cpus + 4) and keeps them: bounded, so not a leak.
    # Main thread + pipe reader + that bound is the ceiling; anything above it would be a leak.
    assert end["worker_threads"] <= max(warm["worker_threads"], 2 + min(32, (os.cpu_count() or 1) + 4)), (
        summary
    )
    # Children: the worker, plus multiprocessing's resource tracker when earlier tests in this
    # session spawned ranks; the same before and after.
    assert end["children"] == warm["children"] >= 1, summary
    assert end["memfds"] == warm["memfds"], summary
    assert new_shm == foreign_shm, summary
    assert not any("async_ckpt" in n or "torch" in n for n in end["shm"]), summary
    # A bound on pathological slowness (e.g. a worker restart per save), not a speed check:
    # generous enough for a busy machine.
    assert elapsed < 600, summary
