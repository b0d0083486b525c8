"""O_DIRECT shard files: space reserved up front, exact size and bytes after finish."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import async_ckpt as ac
from async_ckpt import save_flow
from async_ckpt.storage import LocalStorage
from async_ckpt.storage.direct_io import DirectSink, open_direct, reserve_space

MB = 1 << 20


def _direct_fd(path: Path) -> int:
    fd = open_direct(path)
    if fd is None:
        pytest.skip(f"{path.parent} does not support O_DIRECT")
    return fd


def test_reserved_file_ends_at_its_real_size_with_its_bytes(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    data = os.urandom(3 * MB + 12345)  # not a multiple of the 4 KiB block

    async def write() -> None:
        sink = DirectSink(_direct_fd(path), path)
        await sink.reserve(len(data))
        st = os.stat(path)
        assert st.st_blocks * 512 >= len(data)  # allocated before a byte was written
        await sink.write(memoryview(data))
        await sink.finish()

    asyncio.run(write())
    assert path.stat().st_size == len(data)
    assert path.read_bytes() == data


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_reserving_more_than_the_disk_holds_fails_at_once(small_fs: Path) -> None:
    fd = os.open(small_fs / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as e:
            reserve_space(fd, 16 * MB)
        assert e.value.errno == errno.ENOSPC
        reserve_space(fd, 1 * MB)  # what fits is reserved
        assert os.fstat(fd).st_blocks * 512 >= 1 * MB
    finally:
        os.close(fd)


def _extents(path: Path) -> int:
    out = subprocess.run(["filefrag", str(path)], capture_output=True, text=True)
    m = re.search(r"(\d+) extents? found", out.stdout)
    if out.returncode != 0 or m is None:
        pytest.skip(f"filefrag cannot map {path}: {out.stderr.strip()}")
    return int(m.group(1))


@pytest.mark.skipif(shutil.which("filefrag") is None, reason="needs filefrag (e2fsprogs)")
def test_files_written_at_once_are_not_interleaved_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four files written concurrently through 8 MiB buffers would take their
    # blocks in turns (one extent per buffer); reserved, each is a few extents.
    monkeypatch.setattr(save_flow, "_MIN_FILE_BYTES", 8 * MB)  # four files from 128 MiB
    sd = {f"w{i}": torch.randn(32 * MB // 4) for i in range(4)}
    path = tmp_path / "ckpt"
    ac.save(sd, path, storage=LocalStorage(files_per_rank=4))
    shards = sorted(path.glob("*.safetensors"))
    os.close(_direct_fd(tmp_path / "probe"))  # buffered writes are laid out by the kernel
    assert len(shards) == 4
    counts = {p.name: _extents(p) for p in shards}
    assert all(n <= 3 for n in counts.values()), counts
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    ac.load(got, path)
    assert all(torch.equal(got[k], v) for k, v in sd.items())
