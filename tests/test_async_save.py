"""The async save path on one process: real worker processes, real files.

* ``await async_save`` returns once staged, before the checkpoint is
  committed; the ``PendingCheckpoint`` behaves like a ``concurrent.futures``
  future; tensors may be mutated or freed right after the await.
* ``with AsyncCheckpointer()`` waits for in-flight saves on exit; overlap mode
  (sync and async); backpressure with ``max_in_flight``; the module-level
  ``ac.async_save``.
* Steady state: one worker, one staging allocation, cached plans, flat RSS,
  nothing left in ``/dev/shm``.
* Faults: a SIGKILLed worker (by the test, and at the library's own kill
  points), unsupported values, an unwritable path; the checkpointer stays
  usable after each.

Worker starts cost seconds here, so most checks share one module-scoped
checkpointer (``ck``); the tests that kill workers or test lifetimes make
their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

import async_ckpt as ac
from async_ckpt import api
from async_ckpt.testing import same_bits

KILL_ENV = "ASYNC_CKPT_KILL_AT"
MB = 1 << 20


# ------------------------------------------------------------------ helpers


def _clone_tree(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    return x


def _blank_like(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.full_like(x, 7) if x.numel() else torch.empty_like(x)
    if isinstance(x, dict):
        return {k: _blank_like(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_blank_like(v) for v in x]
    return None


def _assert_tree_equal(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), where
        assert same_bits(got, want), f"{where}: saved values differ from the expected ones"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got)
        for k in want:
            _assert_tree_equal(got[k], want[k], f"{where}.{k}" if where else str(k))
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_tree_equal(g, w, f"{where}.{i}")
    else:
        assert got == want, (where, got, want)


def _assert_loads(path: Any, want: dict[str, Any]) -> None:
    """Load ``path`` into a blank copy of ``want`` and compare bit-exactly."""
    target = _blank_like(want)
    ac.load(target, path)
    _assert_tree_equal(target, want)


def _state(seed: int, mb: float = 1.0) -> dict[str, Any]:
    """A mixed state dict whose big tensor holds about ``mb`` MiB."""
    g = torch.Generator().manual_seed(seed)
    n = max(1, int(mb * MB) // 4)
    return {
        "model": {
            "big": torch.randn(n, generator=g),
            "bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
            "idx": torch.randint(-(2**40), 2**40, (129,), generator=g),
            "mask": torch.rand(64, generator=g) > 0.5,
            "t": torch.randn(8, 12, generator=g).t(),  # non-contiguous
            "scalar": torch.tensor(float(seed)),
            "empty": torch.empty(0, 3),
        },
        "opt": {"lr": 0.1 * seed, "betas": [0.9, 0.999], "name": f"adam{seed}"},
        "step": seed,
    }


def _mutate(sd: dict[str, Any]) -> None:
    with torch.no_grad():
        for v in sd["model"].values():
            if v.numel() == 0:
                continue
            if v.dtype == torch.bool:
                v.logical_not_()
            else:
                v.add_(1)
    sd["opt"]["lr"] = -1.0
    sd["step"] = -1


def _uncommitted(path: Any) -> bool:
    try:
        ac.read_metadata(path)
    except ac.CheckpointError:
        return True
    return False


def _rss(ck: ac.AsyncCheckpointer) -> int:
    # This process is the whole pytest session: without returning what earlier
    # tests freed to the OS first, its RSS can shrink by 5% between samples.
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    total = psutil.Process().memory_info().rss
    pid = ck.worker_pid
    assert pid is not None
    return total + psutil.Process(pid).memory_info().rss


def _shm_in_use(pids: list[Any]) -> list[str]:
    """Files under /dev/shm that these processes have open or mapped (staging uses memfd: none)."""
    found = []
    for pid in pids:
        with open(f"/proc/{pid}/maps") as f:
            found += [f"{pid} maps {line.split()[-1]}" for line in f if " /dev/shm/" in line]
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("/dev/shm/"):
                found.append(f"{pid} fd {target}")
    return found


def _shm_leftovers(before: set[str], pids: list[Any]) -> list[str]:
    """New /dev/shm entries that are ours by name. Other processes on this machine
    (concurrent test runs) may create entries too, so a bare listing diff is not enough."""
    new = set(os.listdir("/dev/shm")) - before
    return sorted(n for n in new if "async_ckpt" in n or any(str(p) in n for p in pids))


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    """The default checkpointer behind ``ac.async_save``, shared by this module's
    tests (one worker start instead of one per test); closed at module end."""
    c = api._default_checkpointer(None)
    c.start()
    yield c
    api._close_defaults()


@pytest.fixture
def kill_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(KILL_ENV, raising=False)
    return monkeypatch


# ------------------------------------------------ returns before the commit


@pytest.mark.asyncio
async def test_async_save_returns_before_commit_and_snapshots(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    sd = _state(1, mb=200)
    want = _clone_tree(sd)
    path = tmp_path / "big"

    t0 = time.perf_counter()
    pending = await ck.async_save(sd, path)
    # Staged, not yet durable: the worker still has ~200 MB to write.
    assert isinstance(pending, ac.PendingCheckpoint)
    assert not pending.done()
    assert not (path / "metadata.json").exists()
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(path)

    # The caller owns its tensors again: mutate some, free others.
    _mutate(sd)
    del sd["model"]["big"]
    sd["model"].pop("bf16")
    sd.clear()

    called: list[Any] = []
    pending.add_done_callback(called.append)
    md = await pending
    elapsed = time.perf_counter() - t0

    assert isinstance(md, ac.Metadata)
    assert md.stats is not None and md.stats.write_s > 0 and md.stats.bytes_written >= 200 * MB
    assert md.stats.write_s < elapsed
    assert pending.done() and pending.result() is md and pending.result(timeout=0) is md
    assert pending.exception() is None
    # The callback ran, with the pending itself as its argument.
    for _ in range(100):
        if called:
            break
        await asyncio.sleep(0.01)
    assert called == [pending]
    # Registered after completion: called at once, in this thread.
    late: list[Any] = []
    pending.add_done_callback(late.append)
    assert late == [pending]

    assert ac.read_metadata(path).tensors["model.big"].shape == (200 * MB // 4,)
    _assert_loads(path, want)


def test_pending_result_timeout_and_failure_like_a_future(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(2, mb=40)
    pending = ck.save(sd, tmp_path / "a")
    # Not done yet: result/exception with a tiny timeout time out like a Future's.
    with pytest.raises(concurrent.futures.TimeoutError):
        pending.result(timeout=0.001)
    with pytest.raises(concurrent.futures.TimeoutError):
        pending.exception(timeout=0.001)
    md = pending.result(timeout=60)
    assert isinstance(md, ac.Metadata)

    # A failed save: exception() returns the error, result() raises it, callbacks still run.
    # (A directory of other data: refused when the worker begins the save, not by the call.)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a checkpoint")
    seen: list[Any] = []
    done = threading.Event()

    def cb(p: Any) -> None:
        seen.append(p)
        done.set()

    try:
        bad = ck.save(sd, other)
    except ac.CheckpointError:
        pytest.fail("a target refused by the worker must fail the pending, not save()")
    bad.add_done_callback(cb)
    err = bad.exception(timeout=60)
    assert isinstance(err, ac.CheckpointError), repr(err)
    with pytest.raises(ac.CheckpointError):
        bad.result()
    assert done.wait(10) and seen == [bad]

    # The checkpointer is still usable.
    want = _clone_tree(sd)
    md = ck.save(sd, tmp_path / "good").result(timeout=60)
    assert md.stats is not None
    _assert_loads(tmp_path / "good", want)


# ------------------------------------------------------ lifetime, overlap


@pytest.mark.slow
def test_context_manager_max_in_flight_two_and_exit_waits(tmp_path: Path) -> None:
    small = _state(3)
    want_small = _clone_tree(small)
    sd1 = _state(9, mb=60)
    sd2 = _clone_tree(sd1)
    _mutate(sd2)
    want1, want2 = _clone_tree(sd1), _clone_tree(sd2)
    with ac.AsyncCheckpointer(max_in_flight=2) as c:
        # Saves one at a time reuse one worker and one staging slot.
        for i in range(3):
            c.save(small, tmp_path / f"f{i}").result(timeout=60)
        assert c._pool.allocations == 1 and c.worker_starts == 1
        pid = c.worker_pid
        assert pid is not None
        # Two saves in flight at once: two slots (the small layout's is replaced).
        p1 = c.save(sd1, tmp_path / "m1")
        p2 = c.save(sd2, tmp_path / "m2")
        assert len(c._pool.slots()) == 2
        allocations = c._pool.allocations
        assert allocations == 3, allocations
    # Leaving the block waited for both in-flight saves, then stopped the worker.
    assert p1.done() and p2.done()
    assert isinstance(p1.result(timeout=0), ac.Metadata)
    assert isinstance(p2.result(timeout=0), ac.Metadata)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    _assert_loads(tmp_path / "f2", want_small)
    _assert_loads(tmp_path / "m1", want1)
    _assert_loads(tmp_path / "m2", want2)
    # A closed checkpointer refuses new saves.
    with pytest.raises(ac.CheckpointError):
        c.save(small, tmp_path / "after_close")


@pytest.mark.slow
def test_start_with_a_template_prepares_buffers_and_plan(tmp_path: Path) -> None:
    sd = _state(21)
    want = _clone_tree(sd)
    with ac.AsyncCheckpointer() as c:
        c.start(sd)
        # Buffers exist (and are faulted in) before the first save, which then reuses them.
        assert c._pool.allocations == 1 and c.worker_pid is not None
        slot = c._pool.slots()[0]
        assert slot.registered_with == c.worker_pid
        md = c.save(sd, tmp_path / "first").result(timeout=60)
        assert c._pool.allocations == 1 and c.worker_starts == 1
        assert md.stats is not None and md.stats.stage_s > 0
    _assert_loads(tmp_path / "first", want)


def test_overlap_mode_sync(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(4, mb=20)
    want = _clone_tree(sd)
    p = ck.save(sd, tmp_path / "ov", overlap=True)
    stage_s = p.staged.wait(timeout=60)
    assert isinstance(stage_s, float) and stage_s >= 0
    assert p.staged.done()
    _mutate(sd)
    md = p.result(timeout=60)
    assert md.stats is not None
    _assert_loads(tmp_path / "ov", want)


@pytest.mark.asyncio
async def test_overlap_mode_async(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(5, mb=20)
    want = _clone_tree(sd)
    p = await ck.async_save(sd, tmp_path / "ova", overlap=True)
    await p.staged
    assert p.staged.done()
    _mutate(sd)
    md = await p
    assert isinstance(md, ac.Metadata)
    _assert_loads(tmp_path / "ova", want)


# ------------------------------------------------------------ steady state


@pytest.mark.slow
def test_steady_state_reuses_worker_buffers_and_plan(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    sd = _state(6, mb=8)
    sd["model"]["steady_only"] = torch.zeros(3)  # a layout no other test uses: first save plans
    pids, cached, rss = [], [], {}
    allocations_after_first = None
    want = None
    for i in range(20):
        with torch.no_grad():
            sd["model"]["big"].add_(1)
        sd["step"] = i
        if i == 19:
            want = _clone_tree(sd)
        md = ck.save(sd, tmp_path / f"s{i:02d}").result(timeout=60)
        assert md.stats is not None
        pids.append(ck.worker_pid)
        cached.append(md.stats.plan_cached)
        if i == 0:
            allocations_after_first = ck._pool.allocations
        if i + 1 in (5, 20):
            rss[i + 1] = _rss(ck)

    assert len(set(pids)) == 1 and pids[0] is not None, pids
    assert ck._pool.allocations == allocations_after_first, "steady-state saves allocated staging buffers"
    assert len(ck._pool.slots()) == 1
    assert cached[0] is False and all(cached[1:]), cached
    assert abs(rss[20] - rss[5]) <= 0.05 * rss[5], f"RSS after save 5: {rss[5]}, after save 20: {rss[20]}"
    pids = [os.getpid(), ck.worker_pid]
    assert not _shm_in_use(pids), _shm_in_use(pids)
    assert not _shm_leftovers(shm_before, pids), _shm_leftovers(shm_before, pids)
    assert want is not None
    _assert_loads(tmp_path / "s19", want)


def _staging_maps(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "async_ckpt-staging" in line)


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


@pytest.mark.slow
def test_layout_changes_free_the_old_buffers_in_the_worker_too(tmp_path: Path) -> None:
    """A slot evicted for a new layout is unmapped by the worker as well, so its memory is freed."""
    others = _staging_maps(os.getpid())  # the module's shared checkpointer, if it has run
    with ac.AsyncCheckpointer(max_in_flight=1) as c:
        shmem = []
        for i in range(4):
            sd = {f"layout{i}": torch.randn(16 * MB // 4)}  # a new layout every save
            c.save(sd, tmp_path / f"l{i}").result(timeout=60)
            pid = c.worker_pid
            assert pid is not None
            # The worker handles the drop before the next save's request, so one
            # save later it maps exactly the one live slot.
            assert _staging_maps(pid) == 1, f"save {i}: worker maps {_staging_maps(pid)} staging segments"
            assert _staging_maps(os.getpid()) == others + 1
            shmem.append(_shmem_bytes())
        # 16 MiB leaked per layout change would show as 48 MiB here.
        assert shmem[-1] - shmem[0] < 24 * MB, shmem


# ------------------------------------------------------------- backpressure


@pytest.mark.slow
def test_staging_allocations_counts_buffers_and_a_steady_state_adds_none(tmp_path: Path) -> None:
    sd = _state(3)
    with ac.AsyncCheckpointer(max_in_flight=1) as c:
        assert c.staging_allocations == 0
        c.save(sd, tmp_path / "a").result(60)
        assert c.staging_allocations == 1
        c.save(sd, tmp_path / "b").result(60)  # the same layout reuses its buffer
        assert c.staging_allocations == 1
        c.save({"other": torch.ones(7)}, tmp_path / "c").result(60)
        assert c.staging_allocations == 2


def test_backpressure_waits_for_a_free_buffer(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    assert ck._pool.max_in_flight == 1
    sd1 = _state(8, mb=40)
    sd2 = _clone_tree(sd1)
    _mutate(sd2)
    want1, want2 = _clone_tree(sd1), _clone_tree(sd2)

    t_first = time.perf_counter()
    p1 = ck.save(sd1, tmp_path / "b1")
    allocations = ck.staging_allocations
    t0 = time.perf_counter()
    p2 = ck.save(sd2, tmp_path / "b2")
    t_second_returned = time.perf_counter()
    md1, md2 = p1.result(timeout=60), p2.result(timeout=60)
    assert md1.stats is not None and md2.stats is not None

    # The second call could only stage once the first save's buffer was released,
    # i.e. after the worker wrote it: it returned after the first save's staging and
    # write were over. Timed from before the first call, which both follow (the write
    # may begin before the second call does: the trainer can be descheduled between
    # the two calls for as long as a busy machine likes).
    assert ck.staging_allocations == allocations and len(ck._pool.slots()) == 1
    first_busy_s = md1.stats.stage_s + md1.stats.write_s
    assert t_second_returned - t_first >= first_busy_s, (t_second_returned - t_first, md1.stats)
    # The second save's stall holds its wait for the buffer and its copy; its call, the stall.
    assert md2.stats.stage_s <= md2.stats.stall_s <= t_second_returned - t0, (
        md2.stats,
        t_second_returned - t0,
    )
    _assert_loads(tmp_path / "b1", want1)
    _assert_loads(tmp_path / "b2", want2)


@pytest.mark.asyncio
async def test_async_backpressure_does_not_block_the_loop(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd1 = _state(16, mb=40)
    sd2 = _clone_tree(sd1)
    _mutate(sd2)
    want2 = _clone_tree(sd2)
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    t_first = time.perf_counter()
    p1 = await ck.async_save(sd1, tmp_path / "a1")
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    p2 = await ck.async_save(sd2, tmp_path / "a2")  # waits for p1's buffer
    t_second_returned = time.perf_counter()
    during = ticks - before
    stop = True
    await task
    md1, md2 = await p1, await p2
    assert md1.stats is not None and md2.stats is not None
    # As in the blocking test: timed from before the first call, which p1's write follows.
    first_busy_s = md1.stats.stage_s + md1.stats.write_s
    assert t_second_returned - t_first >= first_busy_s, (t_second_returned - t_first, md1.stats)
    # The event loop kept running while the second save waited and staged.
    assert during > 0
    _assert_loads(tmp_path / "a2", want2)


# ------------------------------------------------------------------- errors


def test_unsupported_value_raises_type_error_naming_key(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(10)
    bad = {**sd, "extra": {"weird": object()}}
    with pytest.raises(TypeError, match=r"extra\.weird"):
        ck.save(bad, tmp_path / "bad")
    assert _uncommitted(tmp_path / "bad")
    # Usable afterwards.
    want = _clone_tree(sd)
    md = ck.save(sd, tmp_path / "ok").result(timeout=60)
    assert md.stats is not None
    _assert_loads(tmp_path / "ok", want)


@pytest.mark.asyncio
async def test_async_unsupported_value_and_unwritable_path(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(11)
    with pytest.raises(TypeError, match=r"model\.oops"):
        await ck.async_save({"model": {"oops": object()}}, tmp_path / "bad")
    afile = tmp_path / "afile"
    afile.write_text("x")
    # Refused by the call itself, naming the file (tests/test_save_target_checks.py).
    with pytest.raises(ac.CheckpointError, match="not a directory"):
        await ck.async_save(sd, afile / "ckpt")
    want = _clone_tree(sd)
    md = await (await ck.async_save(sd, tmp_path / "good"))
    assert isinstance(md, ac.Metadata)
    _assert_loads(tmp_path / "good", want)


def test_read_metadata_under_a_regular_file_raises_checkpoint_error(tmp_path: Path) -> None:
    # The contract: read_metadata raises CheckpointError when no committed checkpoint is there.
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(afile / "ckpt")


# ------------------------------------------------------------- worker death


@pytest.mark.slow
def test_worker_death(kill_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """One checkpointer through three worker deaths. A worker inherits the
    environment when it starts, so a kill point set now applies to the next
    worker started; save ids count from 0 per checkpointer."""
    sd0 = _state(13)
    sd1 = _clone_tree(sd0)
    _mutate(sd1)
    want0, want1 = _clone_tree(sd0), _clone_tree(sd1)
    big = _state(14, mb=40)
    want_big = _clone_tree(big)

    def save(sd: dict[str, Any], name: str) -> ac.Metadata:
        md = c.save(sd, tmp_path / name).result(timeout=60)
        assert isinstance(md, ac.Metadata)
        return md

    kill_env.setenv(KILL_ENV, "before_commit:3")
    with ac.AsyncCheckpointer(timeout=30) as c:
        # Save 1: SIGKILLed by us while the worker writes a large state dict.
        save(big, "c0")
        pid_a = c.worker_pid
        assert pid_a is not None
        p1 = c.save(big, tmp_path / "c1")
        os.kill(pid_a, 9)
        with pytest.raises(ac.CheckpointError):
            p1.result(timeout=60)
        assert isinstance(p1.exception(), ac.CheckpointError)
        assert _uncommitted(tmp_path / "c1")
        _assert_loads(tmp_path / "c0", want_big)

        # Save 2 works, with a new worker; save 3 is killed just before its
        # commit: nothing committed there.
        save(sd0, "c2")
        pid_b = c.worker_pid
        assert pid_b not in (None, pid_a)
        p3 = c.save(sd1, tmp_path / "c3")
        with pytest.raises(ac.CheckpointError):
            p3.result(timeout=60)
        assert _uncommitted(tmp_path / "c3")
        _assert_loads(tmp_path / "c2", want0)

        # Save 4 works (new worker); save 5 is killed just after its commit:
        # the pending fails, yet the checkpoint is committed and loads.
        kill_env.setenv(KILL_ENV, "after_commit:5")
        save(sd0, "c4")
        assert c.worker_pid not in (None, pid_a, pid_b)
        p5 = c.save(sd1, tmp_path / "c5")
        with pytest.raises(ac.CheckpointError):
            p5.result(timeout=60)
        ac.read_metadata(tmp_path / "c5")
        _assert_loads(tmp_path / "c5", want1)
        assert c.worker_starts == 3
    _assert_loads(tmp_path / "c4", want0)


# ---------------------------------------------------- module-level default


@pytest.mark.asyncio
async def test_module_async_save_twice(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(15, mb=4)
    want1 = _clone_tree(sd)
    p1 = await ac.async_save(sd, tmp_path / "d1")
    _mutate(sd)
    want2 = _clone_tree(sd)
    p2 = await ac.async_save(sd, tmp_path / "d2")
    md1, md2 = await p1, await p2
    assert isinstance(md1, ac.Metadata) and isinstance(md2, ac.Metadata)
    assert md2.stats is not None and md2.stats.plan_cached
    # One default checkpointer per process: the same worker as the other tests here.
    assert ck.worker_pid is not None and ck.worker_starts == 1
    _assert_loads(tmp_path / "d1", want1)
    _assert_loads(tmp_path / "d2", want2)
