"""O_DIRECT shard files: space reserved up front, exact size and bytes after finish."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import random
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


def _aligned_bytes(n: int, seed: int) -> tuple[mmap.mmap, memoryview]:
    """``n`` random bytes at a page-aligned address (an anonymous map), as the staging segments are."""
    buf = mmap.mmap(-1, max(n, 1))
    buf[:n] = random.Random(seed).randbytes(n)
    return buf, memoryview(buf)[:n]


def test_bytes_at_the_files_alignment_go_out_without_a_copy(tmp_path: Path) -> None:
    # The bounce buffers cost a memcpy of every byte (0.47 s of the worker's 0.85 s
    # of CPU for 2 GiB): a source whose address agrees with its file offset on
    # the block size is written from where it lies.
    path = tmp_path / "shard"
    head = os.urandom(100)
    keep, big = _aligned_bytes(5 * MB + 4096 + 300, 1)
    keep2, pool = _aligned_bytes(4 * MB, 3)
    odd = pool[1 : 3 * MB + 8]  # its address is one past a block boundary; its file offset is not

    async def write() -> DirectSink:
        sink = DirectSink(_direct_fd(path), path)
        await sink.write(memoryview(head))
        await sink.write(big[100:])  # its address = its file offset (100) modulo 4096
        await sink.write(odd)
        await sink.finish()
        return sink

    sink = asyncio.run(write())
    assert path.read_bytes() == head + bytes(big[100:]) + bytes(odd)
    # Copied: the header, the second source's first 3,996 bytes (up to a block
    # boundary) and its last 300 (less than a block), and the misaligned third.
    assert sink.copied == len(head) + 3996 + 300 + len(odd), sink.copied
    del keep, keep2  # unmapped once the views are gone


def test_mixed_aligned_and_misaligned_pieces_land_byte_exact(tmp_path: Path) -> None:
    rng = random.Random(7)
    keep, pool = _aligned_bytes(24 * MB, 2)
    for trial in range(6):
        path = tmp_path / f"shard{trial}"
        pieces: list[memoryview] = []
        pos = 0  # the file offset the next piece starts at
        for _ in range(12):
            n = rng.choice([1, 511, 4096, 70_000, 1 * MB, 2 * MB + 4096, 3 * MB + 123])
            if rng.random() < 0.6:  # congruent with its file offset
                start = rng.randrange(0, 8 * MB, 4096) + pos % 4096
            else:
                start = rng.randrange(0, 8 * MB)
            pieces.append(pool[start : start + n])
            pos += n

        async def write(pieces: list[memoryview] = pieces, path: Path = path, size: int = pos) -> DirectSink:
            sink = DirectSink(_direct_fd(path), path)
            await sink.reserve(size)
            await sink.write_many(pieces[:3])
            for p in pieces[3:]:
                await sink.write(p)
            await sink.finish()
            return sink

        sink = asyncio.run(write())
        assert path.read_bytes() == b"".join(bytes(p) for p in pieces), trial
        assert sink.copied < pos
    del keep


@pytest.mark.parametrize("budget", [None, 10 * MB], ids=["at-once", "in-rounds"])
def test_a_staged_save_writes_its_large_tensors_without_a_copy(tmp_path: Path, budget: int | None) -> None:
    # The staging places large tensors on page boundaries, and each shard file
    # starts its data where the writer can send them from there.
    os.close(_direct_fd(tmp_path / "probe"))
    sd = {
        "a": torch.randn(1 << 20),
        "b": torch.randn(3, 1000, 700).to(torch.bfloat16),  # 4,200,000 bytes: not a block multiple
        "small": torch.randn(10),
        "c": torch.randn(512, 1024, dtype=torch.float64),
        "d": torch.arange(3 * 4096, dtype=torch.int32),
    }
    with ac.AsyncCheckpointer(storage=LocalStorage(files_per_rank=1), staging_budget=budget) as ck:
        for i in range(2):
            md = ck.save(sd, tmp_path / f"ckpt{i}").result(120)
            assert md.stats is not None
            total = md.stats.bytes_written
            assert md.stats.bytes_copied < 64 * 1024, (md.stats.bytes_copied, total)
            assert (md.stats.rounds > 1) == (budget is not None)
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    ac.load(got, tmp_path / "ckpt1")
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_a_blocking_save_writes_large_tensors_from_their_own_memory(tmp_path: Path) -> None:
    # Views of one flat buffer, as FSDP's and Megatron's parameter buffers are:
    # where each lies modulo a page follows from the buffer's, whatever malloc did.
    os.close(_direct_fd(tmp_path / "probe"))
    flat = torch.randn(4 << 20)
    sd = {f"w{i}": flat[i << 20 : (i + 1) << 20] for i in range(4)} | {"bias": torch.randn(7)}
    md = ac.save(sd, tmp_path / "ckpt", storage=LocalStorage(files_per_rank=1))
    assert md.stats is not None
    assert md.stats.bytes_copied < 64 * 1024, md.stats.bytes_copied
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    ac.load(got, tmp_path / "ckpt")
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_large_entries_are_chained_each_at_an_offset_its_address_agrees_with(tmp_path: Path) -> None:
    from async_ckpt.writer.pipeline import WriteEntry, _file_order

    def entry(name: str, nbytes: int, address: int | None) -> WriteEntry:
        return WriteEntry(name, (0,), (nbytes,), "uint8", name, nbytes, memoryview, address=address)

    page = 1 << 30  # any page boundary
    entries = [
        entry("small", 100, page + 64),
        entry("b", 4 * MB, page + 512),  # reached only through "c"
        entry("a", 4 * MB, page + 64),
        entry("c", 1 * MB + 448, page + 64),  # ragged: moves the residue from 64 to 512
        entry("d", 2 * MB, page + 64),
        entry("unknown", 8 * MB, None),  # its address is not known before it is taken
        entry("e", 3 * MB, page + 1000),  # not on a 64-byte boundary: never chained
    ]
    path = tmp_path / "f"
    sink = DirectSink(_direct_fd(path), path)
    order, start = _file_order(entries, sink)
    asyncio.run(sink.abort())
    assert [entries[i].name for i in order] == ["a", "d", "c", "b", "small", "unknown", "e"]
    assert start == (64, 4096)
    pos = 64
    for i in order[:4]:
        assert (entries[i].address or 0) % 4096 == pos % 4096
        pos += entries[i].nbytes
