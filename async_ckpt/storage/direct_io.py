"""Shard writes with O_DIRECT: the bytes go from memory to the device without a page-cache copy.

A buffered write copies every byte into the page cache and the kernel later
writes it back: measured here at 0.6-1 s of CPU for 2 GiB, CPU the training
loop wanted. O_DIRECT needs aligned addresses, lengths and offsets. A source
whose address agrees with its file offset modulo the block size (the writer
lays shard files out so that large staged tensors do) is written from where
it lies, but for a partial block at either end. Everything else passes
through two aligned bounce buffers, one filling while the other is written:
that copy cost the worker 0.47 s of its 0.85 s of CPU per 2 GiB save when
every byte took it. The last block is zero-padded, then the file is
truncated to its real length and fsynced.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
from pathlib import Path
from typing import Any

import aiofiles.os

from .._address import address_of

__all__ = ["ALIGN", "DIRECT_MIN", "DirectSink", "open_direct", "reserve_space"]

ALIGN = 4096
"""The alignment used for addresses, lengths and offsets: every device's logical block divides it."""
_BUFFER = 8 << 20
DIRECT_MIN = 1 << 20
"""A shorter source is copied: one more write call costs more than copying it."""


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
    """An ``AligningSink`` (``storage/base.py``): see the module docstring."""

    alignment = ALIGN
    direct_min = DIRECT_MIN

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self._path = path
        self._bufs = [mmap.mmap(-1, _BUFFER), mmap.mmap(-1, _BUFFER)]
        self._cur = 0
        self._fill = 0
        self._offset = 0  # file offset of the current buffer's start
        self._inflight: asyncio.Future[None] | None = None
        self._closed = False
        self.copied = 0
        """Bytes that went through the bounce buffers (the rest was written from its source)."""

    async def write(self, data: memoryview) -> None:
        data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        if len(data) >= DIRECT_MIN and (address_of(data) - self._offset - self._fill) % ALIGN == 0:
            head = -(self._offset + self._fill) % ALIGN
            self._copy(data[:head])
            data = data[head:]
            if self._fill:  # ends on a block boundary now
                await self._submit(self._fill)
            body = len(data) // ALIGN * ALIGN
            await self._wait()
            # The source outlives the write: the writer holds it until the file is finished.
            self._inflight = asyncio.ensure_future(
                aiofiles.os.wrap(_pwrite_all)(self._fd, data[:body], self._offset)
            )
            self._offset += body
            data = data[body:]
        while len(data):
            n = self._copy(data)
            data = data[n:]
            if self._fill == _BUFFER:
                await self._submit(_BUFFER)

    def _copy(self, data: memoryview) -> int:
        """Copy the start of ``data`` into the current bounce buffer, as much as fits; how much that was."""
        n = min(len(data), _BUFFER - self._fill)
        self._bufs[self._cur][self._fill : self._fill + n] = data[:n]
        self._fill += n
        self.copied += n
        return n

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

    async def reserve(self, nbytes: int) -> None:
        """Allocate the file's final size up front, so it lies in a few contiguous extents.

        Several files written at once with O_DIRECT otherwise take their blocks
        in turns: 2 GiB in four files came out in 64-66 extents each, and read
        back cold at 0.66-1.07 s (median 0.97) against 0.64-0.73 s (0.70) in
        5-6 extents each when reserved; the save took the same time.
        """
        if nbytes > 0:
            await aiofiles.os.wrap(reserve_space)(self._fd, -(-nbytes // ALIGN) * ALIGN)

    async def finish(self) -> None:
        size = self._offset + self._fill
        if self._fill:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._bufs[self._cur][self._fill : padded] = bytes(padded - self._fill)
            await self._submit(padded)
        await self._wait()
        # _truncate_sync_close closes the descriptor even when it fails: it owns
        # it from here, so abort() must not close the number again (it may
        # already name another file by then).
        self._closed = True
        await aiofiles.os.wrap(_truncate_sync_close)(self._fd, size)
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


def _libc_fallocate() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # not Linux
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_FALLOCATE = _libc_fallocate()
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def reserve_space(fd: int, nbytes: int) -> None:
    """``fallocate(2)``: raise if the disk has no room, do nothing where it is not supported.

    Not ``os.posix_fallocate``: where the file system lacks fallocate, glibc
    emulates it by writing every block, which would double the save's I/O.
    """
    if _FALLOCATE is None:
        return
    if _FALLOCATE(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if err in _NO_ROOM:
            raise OSError(err, os.strerror(err))
