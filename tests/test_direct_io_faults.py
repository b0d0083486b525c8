"""O_DIRECT shard sinks under injected faults: every descriptor is closed once, by its one owner."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from async_ckpt.storage import direct_io
from async_ckpt.storage.direct_io import DirectSink, open_direct


def test_failed_fsync_then_abort_leaves_an_unrelated_descriptor_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed fsync in finish() closes the shard's fd; abort() must not close it again.

    By the time abort() runs, the number may belong to another file: here one
    is put there on purpose (dup2), and it must survive.
    """
    path = tmp_path / "shard"
    fd = open_direct(path)
    if fd is None:
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    real_fsync = os.fsync

    def failing_fsync(target: int) -> None:
        if target == fd:
            raise OSError(errno.EIO, "injected fsync failure")
        real_fsync(target)

    monkeypatch.setattr(direct_io.os, "fsync", failing_fsync)
    other_path = tmp_path / "unrelated"
    other_path.write_bytes(b"someone else's file")

    async def scenario() -> int | None:
        sink = DirectSink(fd, path)
        await sink.write(memoryview(b"x" * 10000))
        with pytest.raises(OSError, match="injected fsync failure"):
            await sink.finish()
        # The shard's number is free now; an unrelated file takes it.
        other = os.open(other_path, os.O_RDONLY)
        taken = os.dup2(other, fd) if other != fd else other
        if other != fd:
            os.close(other)
        await sink.abort()
        try:
            os.fstat(taken)
        except OSError:
            return None
        return taken

    survivor = asyncio.run(scenario())
    assert survivor is not None, "abort() closed a descriptor the sink no longer owned"
    try:
        assert os.read(survivor, 100) == b"someone else's file"
    finally:
        os.close(survivor)
