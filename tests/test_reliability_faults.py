"""Faults around a save: a full disk, a read-only destination, a directory deleted mid-save, a rank that dies.

Each async save that hits one must fail its ``PendingCheckpoint`` with a
clear ``CheckpointError``, while the trainer (this test process) keeps
running and keeps its checkpointer usable, the previous checkpoint stays
intact, and nothing is committed or left behind.

The full disk is real where possible: a 8 MiB tmpfs mounted for the test
(this runs as root); the same failure is also injected through a Storage
wrapper whose writes raise ``ENOSPC``, so the error path is covered where
mounting is not allowed. Read-only uses ``mount -o remount,ro`` (``chmod``
does not stop root).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _crash_trainer import DeletingStorage, EnospcStorage, assert_tree_equal, blank_like
from harness import run_ranks

import async_ckpt as ac
from async_ckpt import _faults
from async_ckpt.storage.local import LocalStorage

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

KILL_ENV = "ASYNC_CKPT_KILL_AT"
TESTS_DIR = Path(__file__).resolve().parent
MB = 1 << 20


def _sd(seed: int, mb: float = 0.1) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(int(mb * MB) // 4, generator=g),
        "b": torch.randn(7, generator=g),
        "step": seed,
    }


def _load_equal(path: Path, want: dict[str, Any]) -> None:
    target = blank_like(want)
    ac.load(target, path)
    assert_tree_equal(target, want, str(path))


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _busy_training(pending: ac.PendingCheckpoint) -> int:
    """The trainer keeps computing while the doomed save runs; returns the steps it did."""
    w = torch.randn(64, 64)
    steps = 0
    while not pending.done() or steps < 3:
        w = torch.tanh(w @ w.T / 64)
        steps += 1
    assert torch.isfinite(w).all()
    return steps


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    """One checkpointer (one worker) for the single-rank faults.

    Its worker must unpickle the fault-injecting storages from _crash_trainer,
    so ``tests/`` goes on the PYTHONPATH it inherits.
    """
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", KILL_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), saved["PYTHONPATH"]]))
    os.environ.pop(KILL_ENV, None)
    try:
        with ac.AsyncCheckpointer(start=True) as c:
            yield c
            assert c.worker_starts == 1, "a fault should not have cost the worker its life"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mount_small(d: Path, size: str = "8m") -> None:
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.decode().strip()}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "small"
    _mount_small(d)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _assert_failed_cleanly(
    ck: ac.AsyncCheckpointer, pending: ac.PendingCheckpoint, words: tuple[str, ...]
) -> ac.CheckpointError:
    steps = _busy_training(pending)
    err = pending.exception(120)
    assert isinstance(err, ac.CheckpointError), repr(err)
    msg = str(err)
    assert any(w in msg for w in words), f"error does not say what went wrong ({words}): {msg}"
    assert steps >= 3
    return err


# ------------------------------------------------------------------ disk full


def test_disk_full_real_enospc(ck: ac.AsyncCheckpointer, small_fs: Path, tmp_path: Path) -> None:
    path = small_fs / "ckpt"
    prev = _sd(1)
    ck.save(prev, path).result(120)
    used_before = _used(small_fs)
    big = _sd(2, mb=16)  # twice the file system
    err = _assert_failed_cleanly(ck, ck.save(big, path), ("No space left", "ENOSPC", "space"))
    assert str(path) in str(err)
    _load_equal(path, prev)  # the previous checkpoint, same path, intact
    assert _leftovers(small_fs) == [], "the failed save's staging dir was not removed"
    assert _used(small_fs) <= used_before + 64 * 1024, "space taken by the failed save was not freed"
    # Training goes on, and so does checkpointing (elsewhere, and here once there is room).
    ck.save(_sd(3), tmp_path / "elsewhere").result(120)
    _load_equal(tmp_path / "elsewhere", _sd(3))
    ck.save(_sd(4), path).result(120)
    _load_equal(path, _sd(4))
    assert _leftovers(small_fs) == []


def _used(fs: Path) -> int:
    st = os.statvfs(fs)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_disk_full_injected_enospc(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    prev = _sd(1)
    ck.save(prev, path).result(120)
    pending = ck.save(_sd(2, mb=4), path, storage=EnospcStorage(budget=1 * MB))
    _assert_failed_cleanly(ck, pending, ("No space left",))
    _load_equal(path, prev)
    assert _leftovers(tmp_path) == []


# ----------------------------------------------------------------- read-only


def test_read_only_file_system(ck: ac.AsyncCheckpointer, small_fs: Path) -> None:
    path = small_fs / "ckpt"
    prev = _sd(1)
    ck.save(prev, path).result(120)
    r = subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.decode().strip()}")
    try:
        for target in (path, small_fs / "new"):
            err = _assert_failed_cleanly(ck, ck.save(_sd(2), target), ("Read-only", "read-only"))
            assert str(small_fs) in str(err)
        _load_equal(path, prev)
        assert _leftovers(small_fs) == []
        with pytest.raises(ac.CheckpointError):
            ac.read_metadata(small_fs / "new")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], capture_output=True)


def test_parent_is_a_regular_file(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / "file" / "ckpt"
    # Refused by the call itself (a cheap local check), before anything is staged.
    with pytest.raises(ac.CheckpointError, match="not a directory") as info:
        ck.save(_sd(1), target)
    assert str(tmp_path / "file") in str(info.value)
    assert (tmp_path / "file").read_text() == "not a directory"
    # A checkpoint id that is itself a regular file is refused too, and the file survives.
    with pytest.raises(ac.CheckpointError, match="not a directory"):
        ck.save(_sd(1), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a directory"
    # A file that appears after the call is refused when the worker begins the save.
    late = tmp_path / "late"
    _faults.set_hook("stage", lambda: late.write_text("not a directory"))
    try:
        pending = ck.save(_sd(1), late / "ckpt", overlap=True)
        pending.staged.wait(60)
    finally:
        _faults.set_hook("stage", None)
    err = _assert_failed_cleanly(
        ck, pending, ("Not a directory", "not a directory", "cannot create checkpoint directory")
    )
    assert str(late) in str(err)
    assert late.read_text() == "not a directory"


# ------------------------------------------------------ directory deleted mid-save


@pytest.mark.parametrize("when", ["open_shard", "commit"])
def test_checkpoint_dir_deleted_during_save(when: str, ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    prev = _sd(1)
    ck.save(prev, path).result(120)
    words = ("vanished", "deleted") if when == "open_shard" else ("No such file", "vanished", "deleted")
    _assert_failed_cleanly(ck, ck.save(_sd(2), path, storage=DeletingStorage(when)), words)
    _load_equal(path, prev)  # overwriting save failed: the previous one is still there
    new = tmp_path / "new"
    _assert_failed_cleanly(ck, ck.save(_sd(2), new, storage=DeletingStorage(when)), words)
    assert not new.exists(), "nothing may be committed"
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(new)
    LocalStorage().remove_uncommitted(str(tmp_path))
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------- a rank dies


def _rank_death_body(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist

    if rank == 1:
        os.environ[KILL_ENV] = "write:1:1"  # rank 1's worker dies after writing save 1
    else:
        os.environ.pop(KILL_ENV, None)
    a, b = Path(root) / "A", Path(root) / "B"
    sd_a: dict[str, Any] = {"w": torch.arange(4096.0), "own": torch.full((8,), float(rank)), "step": 1}
    sd_b = {"w": torch.arange(4096.0) * 2, "own": torch.full((8,), float(rank)), "step": 2}
    out: dict[str, Any] = {}
    with ac.AsyncCheckpointer(timeout=10) as ck:
        ck.save(sd_a, a).result(60)
        t0 = time.monotonic()
        pending = ck.save(sd_b, b)
        err = pending.exception(120)
        out["elapsed"] = time.monotonic() - t0
        out["type"] = type(err).__name__
        out["is_ckpt"] = isinstance(err, ac.CheckpointError)
        out["msg"] = str(err)
    os.environ.pop(KILL_ENV, None)
    dist.barrier()
    got: dict[str, Any] = {"w": torch.zeros(4096), "own": torch.zeros(8), "step": 0}
    ac.load(got, a)  # collective; the previous checkpoint is intact
    out["a_ok"] = torch.equal(got["w"], sd_a["w"]) and got["step"] == 1
    if rank == 0:
        try:
            ac.read_metadata(b)
            out["b_committed"] = True
        except ac.CheckpointError:
            out["b_committed"] = False
        out["leftovers"] = _leftovers(Path(root))
        LocalStorage().remove_uncommitted(root)
        out["after_cleanup"] = _leftovers(Path(root))
    dist.barrier()
    return out


def test_a_rank_dies_during_a_multi_rank_save(tmp_path: Path) -> None:
    r0, r1 = run_ranks(2, _rank_death_body, str(tmp_path), timeout=180, pg_timeout=90)
    print(f"\n[faults] rank 1's worker killed: rank 0 failed after {r0['elapsed']:.1f}s: {r0['msg'][:200]}")
    assert r1["is_ckpt"] and "died" in r1["msg"], r1
    assert r0["is_ckpt"], r0
    assert r0["elapsed"] < 40, r0
    assert "rank(s) 1" in r0["msg"] or "rank 1" in r0["msg"], r0["msg"]
    assert r0["a_ok"] and r1["a_ok"]
    assert r0["b_committed"] is False
    assert r0["after_cleanup"] == [], r0
