"""The bytes side of the fsspec backend: shard sinks (S3 multipart), range readers, small PUTs."""

from __future__ import annotations

import asyncio
import io
import logging
import re
import sys
from collections.abc import Coroutine
from typing import Any

import fsspec
import fsspec.asyn

from ..errors import CorruptCheckpointError

log = logging.getLogger("async_ckpt.storage")

METADATA_FILE = "metadata.json"  # == format.metadata.METADATA_FILE; not imported, it pulls in torch
_MARKER_PREFIX = ".async_ckpt-writing-"
_DELETING_MARKER = ".async_ckpt-deleting"
_SHARD = re.compile(r"shard-r\d+-\d+\.safetensors")
_MIN_PART = 5 << 20  # S3's smallest non-final part
_PARTS_PER_STEP = 1000
_READ_PIECE = 16 << 20
_READ_CONCURRENCY = 4
_POOL_CONNECTIONS = 64
# Object stores have no directories, and making one can create a bucket: never call makedirs there.
_OBJECT_STORES = frozenset(
    {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "r2", "wasb", "wasbs"}
)


def _ours(name: str) -> bool:
    return name == METADATA_FILE or name.startswith(".async_ckpt-") or bool(_SHARD.fullmatch(name))


def _is_s3(fs: Any) -> bool:
    s3fs = sys.modules.get("s3fs")  # an S3FileSystem exists only if s3fs was imported
    return s3fs is not None and isinstance(fs, s3fs.S3FileSystem)


async def _s3_send(fs: Any, method: str, data: bytes, **kwargs: Any) -> Any:
    """``fs._call_s3(method, Body=data, ...)``, sending ``data`` as a fresh stream on every attempt.

    A stream, because aiohttp pushes a big bytes body in one go on the event loop (and warns);
    fresh on every attempt, because s3fs retries with the same arguments, and a stream that a
    failed attempt half read would send the wrong bytes. ``io.BytesIO(bytes)`` does not copy.
    """
    from s3fs.core import _error_wrapper

    await fs.set_session()
    client = await fs.get_s3(kwargs.get("Bucket"))
    call = getattr(client, method)
    merged = fs._get_s3_method_kwargs(call, **kwargs)  # the fs's own extras (SSE, requester pays)

    async def attempt() -> Any:
        return await call(**merged, Body=io.BytesIO(data))

    return await _error_wrapper(attempt, retries=fs.retries)


def _put(fs: Any, path: str, data: bytes) -> None:
    """Write a small object whole (on S3: one PUT)."""
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        fsspec.asyn.sync(fs.loop, _s3_send, fs, "put_object", data, Bucket=bucket, Key=key)
        fs.invalidate_cache(path)
    else:
        fs.pipe_file(path, data)


def _first_error(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def _on_fs_loop(fs: Any, coro: Coroutine[Any, Any, Any]) -> Any:
    """Await ``coro`` on the file system's own I/O loop (fsspec runs one per process)."""
    loop = fs.loop
    if loop is asyncio.get_running_loop():
        return await coro
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


class _Limiter:
    """One semaphore per event loop: a storage object may serve several loops, one after another."""

    def __init__(self, slots: int) -> None:
        self._slots = slots
        self._current: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None

    def get(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._current is None or self._current[0] is not loop:
            self._current = (loop, asyncio.Semaphore(self._slots))
        return self._current[1]


class _FileSink:
    """fsspec's buffered writer, driven from a thread (memory://, gs://, ...)."""

    def __init__(self, handle: Any) -> None:
        self._f = handle

    async def write(self, data: memoryview) -> None:
        await asyncio.to_thread(self._f.write, data)

    async def finish(self) -> None:
        await asyncio.to_thread(self._f.close)

    async def abort(self) -> None:
        # Closing would upload what was written so far; discard it instead.
        discard = getattr(self._f, "discard", None)
        await asyncio.to_thread(discard if callable(discard) else self._f.close)


class _MultipartSink:
    """One S3 object written as concurrently uploaded parts (one PUT if it fits in one part)."""

    def __init__(self, fs: Any, path: str, part_size: int, limiter: asyncio.Semaphore) -> None:
        self._fs = fs
        self._path = path
        self._bucket, self._key, _ = fs.split_path(path)
        self._part_size = part_size
        self._limiter = limiter
        self._buf = io.BytesIO()
        self._capacity = part_size
        self._upload_id: str | None = None
        self._checksum_key: str | None = None
        self._parts: dict[int, dict[str, Any]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def _call(self, method: str, body: bytes | None = None, **kwargs: Any) -> Any:
        fs, where = self._fs, {"Bucket": self._bucket, "Key": self._key}
        if body is None:
            return await _on_fs_loop(fs, fs._call_s3(method, **where, **kwargs))
        return await _on_fs_loop(fs, _s3_send(fs, method, body, **where, **kwargs))

    def _raise_failed(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def write(self, data: memoryview) -> None:
        self._raise_failed()
        view = memoryview(data).cast("B")
        while len(view):
            n = min(len(view), self._capacity - self._buf.tell())
            self._buf.write(view[:n])
            view = view[n:]
            if self._buf.tell() == self._capacity:
                await self._send_part()

    async def _send_part(self) -> None:
        """Hand the filled buffer to a background upload; wait first while too many are in flight."""
        part, number = self._buf.getvalue(), len(self._tasks) + 1
        await self._limiter.acquire()
        try:
            if self._upload_id is None:
                out = await self._call("create_multipart_upload")
                self._upload_id = out["UploadId"]
                algorithm = out.get("ChecksumAlgorithm")
                self._checksum_key = f"Checksum{algorithm}" if algorithm else None
        except BaseException:
            self._limiter.release()
            raise
        self._tasks.append(asyncio.get_running_loop().create_task(self._upload(number, part)))
        self._buf = io.BytesIO()
        self._capacity = self._part_size * (1 + number // _PARTS_PER_STEP)

    async def _upload(self, number: int, body: bytes) -> None:
        try:
            out = await self._call("upload_part", body, UploadId=self._upload_id, PartNumber=number)
            record = {"PartNumber": number, "ETag": out["ETag"]}
            if self._checksum_key and self._checksum_key in out:
                record[self._checksum_key] = out[self._checksum_key]
            self._parts[number] = record
        finally:
            self._limiter.release()

    async def finish(self) -> None:
        self._raise_failed()
        if self._upload_id is None and not self._tasks:
            await self._call("put_object", self._buf.getvalue())
        else:
            if self._buf.tell():
                await self._send_part()
            await asyncio.gather(*self._tasks)
            parts = [self._parts[n] for n in sorted(self._parts)]
            await self._call(
                "complete_multipart_upload", UploadId=self._upload_id, MultipartUpload={"Parts": parts}
            )
            self._upload_id = None
        self._buf = io.BytesIO()
        self._fs.invalidate_cache(self._path)

    async def abort(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._buf = io.BytesIO()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            await self._call("abort_multipart_upload", UploadId=upload_id)


class _FsspecReader:
    """Range reads of one object; thread-safe (S3: big reads split into concurrent ranged GETs)."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        fs.invalidate_cache(path)
        try:
            self._size = int(fs.info(path)["size"])
        except FileNotFoundError:
            raise CorruptCheckpointError(f"shard file {path} is missing") from None

    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        buf = memoryview(buf).cast("B")
        if not len(buf):
            return
        if offset + len(buf) > self._size:
            raise self._truncated(offset, len(buf))
        try:
            if getattr(self._fs, "async_impl", False):
                fsspec.asyn.sync(self._fs.loop, self._read_pieces, offset, buf)
            else:
                self._put(buf, 0, self._fs.cat_file(self._path, start=offset, end=offset + len(buf)), offset)
        except BaseException as exc:
            cause = _first_error(exc)
            if isinstance(cause, FileNotFoundError):
                raise CorruptCheckpointError(f"shard file {self._path} is missing") from None
            if cause is exc:
                raise
            raise cause from None

    async def _read_pieces(self, offset: int, buf: memoryview) -> None:
        gate = asyncio.Semaphore(_READ_CONCURRENCY)

        async def one(pos: int, n: int) -> None:
            async with gate:
                data = await self._fs._cat_file(self._path, start=offset + pos, end=offset + pos + n)
            self._put(buf[pos : pos + n], pos, data, offset)

        async with asyncio.TaskGroup() as group:
            for pos in range(0, len(buf), _READ_PIECE):
                group.create_task(one(pos, min(_READ_PIECE, len(buf) - pos)))

    def _put(self, dest: memoryview, pos: int, data: bytes, offset: int) -> None:
        if len(data) != len(dest):
            raise self._truncated(offset + pos, len(dest))
        dest[:] = data

    def _truncated(self, offset: int, n: int) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self._path}: truncated; wanted bytes [{offset}, {offset + n}) of a {self._size}-byte file"
        )

    def close(self) -> None:
        pass
