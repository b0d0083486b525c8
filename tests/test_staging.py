"""Staging buffers: backed in bulk when allocated, and a clear error when memory runs out."""

from __future__ import annotations

import errno
import mmap
import os
import resource
import threading

import pytest
import torch

import async_ckpt as ac
from async_ckpt import buffer_layout
from async_ckpt.staging import StagingPool, make_layout

MB = 1 << 20


def _tensors(n: int, mb: int) -> dict[tuple[str, None], torch.Tensor]:
    return {(f"t{i}", None): torch.full((mb * MB // 4,), float(i)) for i in range(n)}


def _populate_supported() -> bool:
    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        probe.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@pytest.mark.skipif(not _populate_supported(), reason="kernel before 5.14: no MADV_POPULATE_WRITE")
def test_new_slot_is_backed_so_the_first_copy_does_not_fault() -> None:
    tensors = _tensors(6, 16)  # 96 MiB over one segment
    layout = make_layout(tensors)
    pool = StagingPool(1, pin=False)
    try:
        slot, _ = pool.acquire(layout)
        pages = layout.nbytes // mmap.PAGESIZE
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        slot.copy_in(tensors)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        # Faulting page by page would take one fault per page (24,576 here).
        assert faults < pages // 20, (faults, pages)
        for key, t in tensors.items():
            assert torch.equal(slot.views[key], t)
    finally:
        pool.close()


def test_segments_are_backed_in_parallel_and_hold_every_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buffer_layout, "SEGMENT_BYTES", 8 * MB)  # several segments from a small dict
    tensors = {**_tensors(5, 3), ("tail", None): torch.arange(7.0)}
    layout = make_layout(tensors)
    assert len(layout.segment_sizes) >= 3
    pool = StagingPool(1, pin=False)
    try:
        slot, _ = pool.acquire(layout)
        for seg, size in zip(slot.segments, layout.segment_sizes, strict=True):
            assert os.fstat(seg.fd).st_blocks * 512 >= size  # allocated, not sparse
        slot.copy_in(tensors)
        assert all(torch.equal(slot.views[k], t) for k, t in tensors.items())
    finally:
        pool.close()


def test_out_of_memory_is_a_clear_error_and_leaks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))

    def no_memory(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(os, "posix_fallocate", no_memory)
    tensors = _tensors(3, 1)
    pool = StagingPool(1, pin=False)
    with pytest.raises(
        ac.CheckpointError, match=r"cannot allocate 0\.00 GiB of shared memory to stage 3 tensors"
    ):
        pool.acquire(make_layout(tensors))
    assert pool.slots() == [] and pool.allocations == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before  # every memfd closed
    monkeypatch.undo()
    slot, _ = pool.acquire(make_layout(tensors))  # the pool still works once memory is back
    assert slot.busy
    pool.close()


def test_out_of_memory_fails_the_save_not_the_trainer(
    monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]
) -> None:
    sd = {"w": torch.arange(1000.0)}
    with ac.AsyncCheckpointer() as ck:

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
        with pytest.raises(ac.CheckpointError, match=r"cannot allocate .* shared memory"):
            ck.save(sd, os.path.join(tmp_path, "a"))
        monkeypatch.undo()
        ck.save(sd, os.path.join(tmp_path, "a")).result(60)
    got = {"w": torch.zeros(1000)}
    ac.load(got, os.path.join(tmp_path, "a"))
    assert torch.equal(got["w"], sd["w"])


def test_copy_in_places_every_tensor_by_key_in_any_order() -> None:
    tensors = {**_tensors(4, 1), ("empty", None): torch.empty(0, 3), ("int", None): torch.arange(5)}
    layout = make_layout(tensors)
    pool = StagingPool(1, pin=False)
    try:
        slot, _ = pool.acquire(layout)
        calls: list[int] = []
        reordered = dict(reversed(list(tensors.items())))
        slot.copy_in(reordered, on_half=lambda: calls.append(1))
        assert calls == [1]
        assert all(torch.equal(slot.views[k], t) for k, t in tensors.items())
        slot.copy_in({k: t + 1 for k, t in tensors.items()})  # the layout's own order
        assert all(torch.equal(slot.views[k], t + 1) for k, t in tensors.items())
    finally:
        pool.close()


class _WatchedLibc:
    """The real C library, noting when ``madvise`` is running (it must let go of the GIL)."""

    def __init__(self, real: object) -> None:
        self._real = real
        self.inside = threading.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)

    def madvise(self, *args: object) -> int:
        self.inside.set()
        try:
            return int(self._real.madvise(*args))  # type: ignore[attr-defined]
        finally:
            self.inside.clear()


@pytest.mark.skipif(not _populate_supported(), reason="kernel before 5.14: no MADV_POPULATE_WRITE")
def test_backing_lets_other_threads_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mapping a segment's pages takes a fraction of a second per GiB; under the GIL
    # (``mmap.madvise`` holds it) segments were mapped one after the other, and the
    # trainer's other threads stood still meanwhile.
    from async_ckpt import _libc, staging

    real = _libc.libc()
    assert real is not None
    watched = _WatchedLibc(real)
    monkeypatch.setattr(staging, "libc", lambda: watched, raising=False)
    tensors = _tensors(4, 64)  # 256 MiB
    layout = make_layout(tensors)
    seen = False
    for _ in range(5):  # a starved machine may not run this thread during one mapping
        pool = StagingPool(1, pin=False)
        done = threading.Event()
        backer = threading.Thread(target=lambda p=pool, d=done: (p.acquire(layout), d.set()))
        backer.start()
        while not done.is_set():
            if watched.inside.is_set():
                seen = True  # this thread ran while the other was inside madvise
                break
        backer.join()
        pool.close()
        if seen:
            break
    assert seen


@pytest.mark.parametrize(
    ("pin", "devices", "want"),
    [
        (None, (), (False, None)),  # CPU tensors on any machine: nothing to page-lock, no CUDA context
        (None, (3,), (True, 3)),  # from the tensors' own device, whatever the thread's current one
        (None, (1, 0), (True, 1)),
        (True, (), (True, None)),  # asked for: from the calling thread's current device
        (True, (2,), (True, 2)),
        (False, (0,), (False, None)),
    ],
)
def test_staging_is_pinned_for_cuda_tensors_from_their_device(
    pin: bool | None, devices: tuple[int, ...], want: tuple[bool, int | None]
) -> None:
    from async_ckpt.staging import pin_under

    assert pin_under(pin, devices) == want


def test_a_default_pool_leaves_cpu_staging_unpinned() -> None:
    pool = StagingPool(1)
    layout = make_layout(_tensors(1, 1))
    slot, _ = pool.acquire(layout)
    try:
        assert not slot.pinned
    finally:
        pool.release(slot)
        pool.close()


def test_a_segment_that_could_not_be_pinned_is_not_asked_again_on_every_save(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refused page-lock leaves the slot unpinned (copies still work); each reuse asking again
    would register gigabytes on every save's hot path."""
    asked: list[int] = []

    class RefusingCudart:  # injected fault: the driver refuses to page-lock
        def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
            asked.append(size)
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "cudart", lambda: RefusingCudart())
    pool = StagingPool(1, pin=True)
    layout = make_layout(_tensors(1, 1))
    try:
        for _ in range(3):
            slot, _ = pool.acquire(layout)
            assert not slot.pinned
            pool.release(slot)
        assert len(asked) == len(layout.segment_sizes), asked
    finally:
        pool.close()
