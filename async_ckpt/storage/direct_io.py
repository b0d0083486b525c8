"""Shard writes with O_DIRECT: the bytes go from memory to the device without a page-cache copy.

A buffered write copies every byte into the page cache and the kernel later
writes it back: measured here at 0.6-1 s of CPU for 2 GiB, CPU the training
loop wanted. O_DIRECT needs aligned addresses, lengths and offsets, which
safetensors' packed layout does not give, so bytes pass through two aligned
bounce buffers: one fills while the other is written. The last block is
zero-padded, then the file is truncated to its real length and fsynced.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from pathlib import Path

import aiofiles.os

__all__ = ["DirectSink", "open_direct"]

_ALIGN = 4096
_BUFFER = 8 << 20


def open_direct(path: Path) -> int | None:
    """An O_DIRECT descriptor for a new file, or None where the file system refuses it (tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        if exc.errno == 22:  # EINVAL: no direct I/O here
            return None
        raise


class DirectSink:
    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._bufs = [mmap.mmap(-1, _BUFFER), mmap.mmap(-1, _BUFFER)]
        self._cur = 0
        self._fill = 0
        self._offset = 0  # file offset of the current buffer's start
        self._inflight: asyncio.Future[None] | None = None
        self._closed = False

    async def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        while len(data):
            n = min(len(data), _BUFFER - self._fill)
            self._bufs[self._cur][self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == _BUFFER:
                await self._submit(_BUFFER)

    async def write_many(self, parts: list[memoryview]) -> None:
        for part in parts:
            await self.write(part)

    async def _submit(self, length: int) -> None:
        await self._wait()
        view = memoryview(self._bufs[self._cur])[:length]
        self._inflight = asyncio.ensure_future(aiofiles.os.wrap(_pwrite_all)(self._fd, view, self._offset))
        self._offset += length
        self._cur ^= 1
        self._fill = 0

    async def _wait(self) -> None:
        if self._inflight is not None:
            pending, self._inflight = self._inflight, None
            await pending

    async def finish(self) -> None:
        size = self._offset + self._fill
        if self._fill:
            padded = -(-self._fill // _ALIGN) * _ALIGN
            self._bufs[self._cur][self._fill : padded] = bytes(padded - self._fill)
            await self._submit(padded)
        await self._wait()
        await aiofiles.os.wrap(_truncate_sync_close)(self._fd, size)
        self._closed = True
        self._release()

    async def abort(self) -> None:
        try:
            await self._wait()
        finally:
            if not self._closed:
                os.close(self._fd)
                self._closed = True
            self._release()

    def _release(self) -> None:
        for buf in self._bufs:
            buf.close()
        self._bufs = []


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _truncate_sync_close(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
