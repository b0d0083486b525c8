"""A load puts the disk to work while it decodes the metadata and plans.

``read_ops.open_source(..., prefetch_rank=r)`` asks a local checkpoint's
source to pull the head of rank r's first shard into the page cache, from a
thread, until the load's own reads begin (``storage/local_read.HeadPrefetch``).
Whether bytes are in the page cache is asked with mincore(2) (a read, even
``preadv(RWF_NOWAIT)``, would start the kernel's readahead itself); where
the kernel cannot evict a file (tmpfs), those tests skip.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import async_ckpt as ac
from async_ckpt.format.metadata import METADATA_FILE, Metadata
from async_ckpt.format.shard import first_shard_names, shard_file_name
from async_ckpt.load_metadata import decode_checked
from async_ckpt.read_ops import open_source
from async_ckpt.storage.local import LocalStorage
from async_ckpt.storage.local_read import DirSource

MiB = 1 << 20
WAIT_S = 120.0  # how long the kernel may take to read a window; generous for a busy machine


def _state(mib: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.rand(mib * MiB // 4 // 4, generator=g) for i in range(4)}


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)


def _cached(path: Path, offset: int) -> bool:
    """Whether the page at ``offset`` is in the page cache; reads nothing."""
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        view = (ctypes.c_char * len(mm)).from_buffer(mm)  # private and never written: no page touched
        try:
            vec = (ctypes.c_ubyte * 1)()
            addr = ctypes.addressof(view) + offset // page * page
            if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(page), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return bool(vec[0] & 1)
        finally:
            del view


@pytest.fixture
def cold_ckpt(tmp_path: Path) -> Path:
    """A saved checkpoint none of whose shards is in the page cache."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's posix_fadvise and mincore")
    path = tmp_path / "ck"
    ac.save(_state(), path)
    shard = path / shard_file_name(0, 0)
    for f in path.glob("*.safetensors"):
        _evict(f)
    if _cached(shard, 4 * MiB):
        pytest.skip(f"{tmp_path} keeps files in memory (tmpfs?): nothing to prefetch")
    return path


def _until(cond: Callable[[], bool]) -> bool:
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "async_ckpt-prefetch"]


def test_the_first_shard_is_read_while_the_metadata_is_decoded(cold_ckpt: Path) -> None:
    shard = cold_ckpt / shard_file_name(0, 0)
    seen: list[bool] = []

    def decode(raw: bytes) -> Metadata:
        # Nothing but the prefetch reads the shard before the decode returns.
        seen.append(_until(lambda: _cached(shard, 4 * MiB)))
        return decode_checked(raw, str(cold_ckpt))

    source, _ = open_source(LocalStorage(), str(cold_ckpt), decode, prefetch_rank=0)
    try:
        assert seen == [True], "no byte of the first shard reached the page cache during the decode"
    finally:
        source.close()
    assert not _prefetch_threads()


def test_no_prefetch_unless_asked(cold_ckpt: Path) -> None:
    """Loads of a few keys (load_tree) read no more than they need."""
    source, _ = open_source(LocalStorage(), str(cold_ckpt), lambda raw: decode_checked(raw, str(cold_ckpt)))
    try:
        assert not _prefetch_threads()
    finally:
        source.close()


def test_a_prefetch_reads_no_further_than_its_limit(cold_ckpt: Path) -> None:
    shard = cold_ckpt / shard_file_name(0, 0)
    assert shard.stat().st_size > 40 * MiB
    source = DirSource(str(cold_ckpt))
    try:
        source.prefetch(first_shard_names(0), 8 * MiB)
        assert _until(lambda: _cached(shard, 4 * MiB))
        source.stop_prefetch()
        assert not _prefetch_threads()
        time.sleep(0.2)  # a read the kernel still had in flight lands meanwhile
        assert not _cached(shard, 32 * MiB)
    finally:
        source.close()


def test_the_load_stops_the_prefetch_and_its_file_is_closed(tmp_path: Path) -> None:
    sd = _state(8)
    ac.save(sd, tmp_path / "ck")
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    source = DirSource(str(tmp_path / "ck"))
    source.prefetch(first_shard_names(0), 1 << 40)
    source.stop_prefetch()
    assert not _prefetch_threads()
    source.close()
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    ac.load(target, tmp_path / "ck")
    assert not _prefetch_threads()
    for k, v in sd.items():
        assert torch.equal(target[k], v), k


def test_a_rank_with_no_shard_of_its_own_loads_without_prefetch(tmp_path: Path) -> None:
    ac.save(_state(1), tmp_path / "ck")
    source = DirSource(str(tmp_path / "ck"))
    try:
        source.prefetch(first_shard_names(7), 1 << 30)  # a rank the save never had
        assert not _prefetch_threads()
        source.prefetch([METADATA_FILE, "missing.safetensors"], 0)  # a zero limit asks nothing
        assert not _prefetch_threads()
    finally:
        source.close()


def test_the_first_files_of_plain_and_budgeted_saves_are_the_ones_prefetched(tmp_path: Path) -> None:
    sd = _state(4)
    ac.save(sd, tmp_path / "plain")
    with ac.AsyncCheckpointer(staging_budget=2 * MiB) as c:
        c.save(sd, tmp_path / "budgeted").result(300)
    for name in ("plain", "budgeted"):
        shards = sorted(p.name for p in (tmp_path / name).glob("*.safetensors"))
        assert shards[0] in first_shard_names(0), (name, shards)


def test_a_prefetch_that_gets_no_thread_leaves_the_load_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sd = _state(1)
    ac.save(sd, tmp_path / "ck")
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "async_ckpt-prefetch":
            raise RuntimeError("can't start new thread")  # injected: the process is out of threads
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    source = DirSource(str(tmp_path / "ck"))
    source.prefetch(first_shard_names(0), 1 << 30)
    source.close()
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds
    target = {k: torch.empty_like(v) for k, v in sd.items()}
    ac.load(target, tmp_path / "ck")
    for k, v in sd.items():
        assert torch.equal(target[k], v), k
