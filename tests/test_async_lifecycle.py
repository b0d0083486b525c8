"""The lifetime of an ``AsyncCheckpointer`` on one process: real workers, real files.

* Leaving ``with`` / ``async with`` (or closing the module default) right after
  an ``overlap=True`` save waits for it, even while it is still staging.
* Cancelling a task that awaits ``pending`` or ``pending.staged`` never changes
  the save's outcome; a ``PendingCheckpoint`` resolves once, never raising.
* A forked child never touches its parent's checkpointer.
* Layouts registered with the worker stay in step with the trainer's record.
* A staging slot is released once when the worker dies during the hand-off.
* One INFO line per save; a buffer wait is reported only when it was real.
* The worker exits without a traceback when its trainer goes away.
* ``close()`` leaves no worker process, fds or memfds behind; a killed worker
  fails its save with ``WorkerDiedError`` and the next save starts a new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

import async_ckpt as ac
from async_ckpt import api
from async_ckpt._faults import set_hook
from async_ckpt.errors import CheckpointError
from async_ckpt.pending import PendingCheckpoint
from async_ckpt.worker.client import WorkerDiedError
from async_ckpt.worker.messages import SaveRequest

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

MB = 1 << 20


def _state(seed: int, mb: float = 1.0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(max(1, int(mb * MB) // 4), generator=g),
        "small": torch.arange(7),
        "step": seed,
    }


def _assert_loads(path: Path, want: dict[str, Any]) -> None:
    got = {"big": torch.zeros_like(want["big"]), "small": torch.zeros(7, dtype=torch.long), "step": -1}
    ac.load(got, path)
    assert torch.equal(got["big"], want["big"]) and torch.equal(got["small"], want["small"])
    assert got["step"] == want["step"]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _memfds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "async_ckpt-staging" in target:
            out.append(target)
    return out


# ------------------------------------------- 1: close waits for staging saves


def test_leaving_with_right_after_an_overlap_save_keeps_the_save(tmp_path: Path) -> None:
    sd = _state(1, mb=64)
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    with ac.AsyncCheckpointer() as c:
        pending = c.save(sd, tmp_path / "a", overlap=True)
    md = pending.result(timeout=0)
    assert isinstance(md, ac.Metadata)
    _assert_loads(tmp_path / "a", want)


@pytest.mark.asyncio
async def test_leaving_async_with_right_after_an_overlap_save_keeps_the_save(tmp_path: Path) -> None:
    sd = _state(2, mb=64)
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    async with ac.AsyncCheckpointer() as c:
        pending = await c.async_save(sd, tmp_path / "a", overlap=True)
    assert isinstance(await pending, ac.Metadata)
    _assert_loads(tmp_path / "a", want)


@pytest.mark.asyncio
async def test_closing_the_default_right_after_module_async_save_overlap_keeps_the_save(
    tmp_path: Path,
) -> None:
    sd = _state(3, mb=64)
    want = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    pending = await ac.async_save(sd, tmp_path / "a", overlap=True)
    await asyncio.to_thread(api._close_defaults)
    assert isinstance(pending.result(timeout=0), ac.Metadata)
    _assert_loads(tmp_path / "a", want)


# ---------------------------------------------------------- 18: cancellation


def test_pending_resolves_once_and_never_raises_invalid_state() -> None:
    p = PendingCheckpoint("x", 0)
    assert p._set_staged(0.5) is True
    assert p._set_staged(0.7) is False
    md: Any = object()
    assert p._resolve(md) is True
    assert p._fail(ac.CheckpointError("late")) is False
    assert p._resolve(object()) is False  # type: ignore[arg-type]
    assert p.result(0) is md and p.staged.wait(0) == 0.5

    q = PendingCheckpoint("y", 1)
    err = ac.CheckpointError("boom")
    assert q._fail(err) is True
    assert q._resolve(md) is False and q._set_staged(1.0) is False
    assert q.exception(0) is err and q.staged._future.exception(0) is err
    # Nobody can cancel the save from outside: a cancelled awaiter never reaches it.
    assert not PendingCheckpoint("z", 2)._future.cancel()


@pytest.mark.asyncio
async def test_cancelled_awaiters_do_not_change_the_saves_outcome(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_ckpt")
    async with ac.AsyncCheckpointer() as c:
        # A timed-out wait_for on `staged`, then on the pending itself.
        p1 = await c.async_save(_state(4, mb=64), tmp_path / "a", overlap=True)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(p1.staged, 0.0001)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(p1, 0.0001)
        assert isinstance(await p1.staged, float)
        assert isinstance(await p1, ac.Metadata)
        assert isinstance(p1.result(0), ac.Metadata)

        # A task awaiting the pending is cancelled while the worker writes.
        p2 = await c.async_save(_state(5, mb=64), tmp_path / "b")
        waiter = asyncio.ensure_future(p2)
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert isinstance(await p2, ac.Metadata)

        # A task inside async_save (staging) is cancelled: the save still happens.
        sd = _state(6, mb=64)
        task = asyncio.ensure_future(c.async_save(sd, tmp_path / "c"))
        await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    ac.read_metadata(tmp_path / "c")
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not problems, [r.getMessage() for r in problems]


# ---------------------------------------------------------------- 19: fork

_FORK_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time, torch
    import async_ckpt as ac
    from async_ckpt import api

    root = sys.argv[1]
    sd = {"w": torch.arange(1000.0)}
    default = api._default_checkpointer(None)  # closed by the atexit hook
    default.save(sd, os.path.join(root, "a")).result(60)
    explicit = ac.AsyncCheckpointer()
    explicit.save(sd, os.path.join(root, "b")).result(60)
    pids = (default.worker_pid, explicit.worker_pid)
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        errors = []
        for ck in (default, explicit):
            try:
                ck.save(sd, os.path.join(root, "child"))
            except ac.CheckpointError as exc:
                errors.append(str(exc))
        explicit.close()  # a no-op in the child
        os.write(w, json.dumps(errors).encode())
        os.close(w)
        sys.exit(0)  # a normal exit: the atexit hook runs here too
    os.close(w)
    t0 = time.monotonic()
    os.waitpid(child, 0)
    child_s = time.monotonic() - t0
    errors = json.loads(os.read(r, 1 << 16) or b"null")
    default.save(sd, os.path.join(root, "c")).result(60)
    explicit.save(sd, os.path.join(root, "d")).result(60)
    print(json.dumps({
        "errors": errors,
        "child_s": child_s,
        "same_workers": pids == (default.worker_pid, explicit.worker_pid),
        "starts": [default.worker_starts, explicit.worker_starts],
    }), flush=True)
    explicit.close()
    """
)


def test_a_forked_child_never_touches_the_parents_checkpointer(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=150
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["errors"]) == 2, out
    assert all("fork" in e for e in out["errors"]), out["errors"]
    assert out["same_workers"] and out["starts"] == [1, 1], out
    # Not a wall-clock assertion on the machine's speed: the child used to wait
    # its full 60 s close timeout; now it has nothing to wait for.
    assert out["child_s"] < 50, out
    assert not (tmp_path / "child").exists()
    for name in "abcd":
        ac.read_metadata(tmp_path / name)


# ------------------------------------------------------------- 20: layouts


def test_many_layouts_with_one_reused_stay_registered_with_the_worker(tmp_path: Path) -> None:
    def layout(i: int) -> dict[str, Any]:
        return {f"k{i}": torch.full((4,), float(i))}

    # Nine layouts, the first reused after the eighth, then again after the ninth.
    order = [*range(8), 0, 8, 0]
    with ac.AsyncCheckpointer() as c:
        for n, i in enumerate(order):
            c.save(layout(i), tmp_path / f"s{n}").result(timeout=60)
        assert c.worker_starts == 1
    got = {"k0": torch.zeros(4)}
    ac.load(got, tmp_path / f"s{len(order) - 1}")
    assert torch.equal(got["k0"], torch.zeros(4))


# -------------------------------------------- 21: a slot is released once


def test_a_slot_is_released_once_when_the_worker_dies_during_the_hand_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state(7)
    with ac.AsyncCheckpointer(max_in_flight=1) as c:
        c.save(sd, tmp_path / "a").result(timeout=60)
        worker = c._worker
        assert worker is not None and worker.pid is not None
        real_send = worker.send

        def dying_send(msg: Any) -> None:
            # Fault: the worker dies as the request goes out, and the listener
            # notices first; then the send fails.
            if isinstance(msg, SaveRequest):
                os.kill(worker.pid, signal.SIGKILL)
                deadline = time.monotonic() + 60
                while (worker.alive or len(c._inflight)) and time.monotonic() < deadline:
                    time.sleep(0.01)
                raise WorkerDiedError("the async_ckpt worker is gone (injected)")
            real_send(msg)

        monkeypatch.setattr(worker, "send", dying_send)
        releases: list[int] = []
        real_release = c._pool.release

        def counting_release(slot: Any) -> None:
            releases.append(slot.slot_id)
            real_release(slot)

        monkeypatch.setattr(c._pool, "release", counting_release)
        with pytest.raises(ac.CheckpointError):
            c.save(sd, tmp_path / "b")
        (slot,) = c._pool.slots()
        assert releases == [slot.slot_id], releases
        assert not slot.busy
        monkeypatch.undo()
        # The next save starts a new worker and reuses the slot.
        c.save(sd, tmp_path / "c").result(timeout=60)
        assert c.worker_starts == 2 and c._pool.allocations == 1
    _assert_loads(tmp_path / "c", sd)


# ------------------------------------------------------------ 23: logging


def test_one_info_line_per_save_and_a_wait_only_when_real(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="async_ckpt")
    with ac.AsyncCheckpointer(max_in_flight=1) as c:
        c.save(_state(8, mb=4), tmp_path / "a").result(timeout=60)
        first = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert len(first) == 1 and "waited" not in first[0], first
        caplog.clear()
        # The second save must wait for the first one's buffer (written and fsynced):
        # both states exist before the first save, or building the second one
        # (0.1 s) could outlast the first one's write.
        s1, s2 = _state(9, mb=40), _state(10, mb=40)
        p1 = c.save(s1, tmp_path / "b")
        p2 = c.save(s2, tmp_path / "c")
        p1.result(timeout=60), p2.result(timeout=60)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(lines) == 2, lines
    by_save = {1: [ln for ln in lines if "(save 1)" in ln], 2: [ln for ln in lines if "(save 2)" in ln]}
    assert len(by_save[1]) == 1 and len(by_save[2]) == 1, lines
    assert "waited" not in by_save[1][0] and "waited" in by_save[2][0], lines


# ------------------------------------------- 24: the trainer goes away

_TRAINER_GONE = textwrap.dedent(
    """
    import os, sys, torch
    import async_ckpt as ac

    c = ac.AsyncCheckpointer()
    c.save({"w": torch.randn(16 << 20)}, sys.argv[1]).staged.wait(60)
    print(c.worker_pid, flush=True)
    os._exit(0)  # as a second Ctrl-C would: no close(), the worker is mid-save
    """
)


def test_the_worker_exits_quietly_when_its_trainer_goes_away(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAINER_GONE, str(tmp_path / "a")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=180)  # EOF once the worker has exited too
    assert proc.returncode == 0, err
    pid = int(out.split()[0])
    deadline = time.monotonic() + 60
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(pid)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    # The save it had staged still committed.
    ac.read_metadata(tmp_path / "a")


# ---------------------------------------------- leaks, and a killed worker


def test_close_leaves_no_worker_fds_or_memfds(tmp_path: Path) -> None:
    fds_before = set(os.listdir("/proc/self/fd"))
    memfds_before = _memfds()
    c = ac.AsyncCheckpointer(max_in_flight=2)
    c.save(_state(11), tmp_path / "a").result(timeout=60)
    c.save({"x": torch.ones(3)}, tmp_path / "b", overlap=True)
    c.save(_state(12), tmp_path / "c", overlap=True)
    pid = c.worker_pid
    assert pid is not None
    c.close()
    assert _gone(pid)
    assert _memfds() == memfds_before
    assert set(os.listdir("/proc/self/fd")) <= fds_before | {str(fd) for fd in range(3)}
    for name in "abc":
        ac.read_metadata(tmp_path / name)


def test_a_killed_worker_fails_its_save_and_the_next_save_starts_a_new_one(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer() as c:
        c.save(_state(13), tmp_path / "a").result(timeout=60)
        pid = c.worker_pid
        assert pid is not None
        pending = c.save(_state(14, mb=64), tmp_path / "b")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDiedError):
            pending.result(timeout=60)
        c.save(_state(15), tmp_path / "c").result(timeout=60)
        assert c.worker_pid not in (None, pid) and c.worker_starts == 2
    ac.read_metadata(tmp_path / "c")


def _sockets() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:"):
            out.append(link)
    return out


def test_a_dead_workers_connection_is_closed_even_while_its_failed_save_is_held(tmp_path: Path) -> None:
    # The failed pending's traceback reaches the dead client; its socket must not
    # live as long as the caller keeps that pending around.
    sockets_before = _sockets()
    held = []
    with ac.AsyncCheckpointer(max_in_flight=2, worker_nice=0) as c:
        for i in range(3):
            c.save(_state(20 + i), tmp_path / f"a{i}").result(timeout=60)
            pid = c.worker_pid
            assert pid is not None

            def kill_worker(pid: int = pid) -> None:
                # Mid-copy, on the staging thread: the save has its worker by then. Killed
                # any earlier, the staging thread could start a fresh worker and succeed.
                set_hook("stage", None)
                os.kill(pid, signal.SIGKILL)

            set_hook("stage", kill_worker)
            try:
                held.append(c.save(_state(30 + i, mb=64), tmp_path / f"b{i}", overlap=True))
                held[-1].exception(timeout=60)  # settled: the hook ran, or the save failed first
            finally:
                set_hook("stage", None)
            with pytest.raises(CheckpointError):
                held[-1].result(timeout=60)
    assert len(_sockets()) <= len(sockets_before), "a dead worker's socket outlived its checkpointer"
    assert all(p.done() for p in held)
