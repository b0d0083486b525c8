"""Any file system fsspec knows (s3://, gs://, memory://, ...).

Object stores have no rename, so the commit is the marker protocol: shards go
straight under the checkpoint prefix, and ``metadata.json`` is uploaded last;
its presence is the commit. Readers never look at a prefix without it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import fsspec

from ..errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ..format.metadata import METADATA_FILE

__all__ = ["FsspecStorage"]

_MARKER_PREFIX = ".async_ckpt-writing-"


class _FsspecSink:
    def __init__(self, handle: Any, url: str) -> None:
        self._f = handle
        self._url = url

    async def write(self, data: memoryview) -> None:
        await asyncio.to_thread(self._f.write, data)

    async def finish(self) -> None:
        await asyncio.to_thread(self._f.close)

    async def abort(self) -> None:
        # Closing would upload what was written so far; discard it instead.
        discard = getattr(self._f, "discard", None)
        await asyncio.to_thread(discard if callable(discard) else self._f.close)


class _FsspecReader:
    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path
        try:
            self._size = int(fs.size(path))
        except FileNotFoundError:
            raise CorruptCheckpointError(f"shard file {path} is missing") from None
        self._lock = threading.Lock()

    def size(self) -> int:
        return self._size

    def readinto(self, offset: int, buf: memoryview) -> None:
        if not len(buf):
            return
        data = self._fs.cat_file(self._path, start=offset, end=offset + len(buf))
        if len(data) != len(buf):
            raise CorruptCheckpointError(
                f"{self._path}: truncated; wanted bytes [{offset}, {offset + len(buf)}) "
                f"of a {self._size}-byte file"
            )
        buf[:] = data

    def close(self) -> None:
        pass


class FsspecStorage:
    """Checkpoints under a URL prefix on an fsspec file system.

    Pass a configured file system (``FsspecStorage(s3fs.S3FileSystem(...))``)
    to control endpoints and credentials; by default one is made from the URL.
    """

    def __init__(self, fs: Any = None, **storage_options: Any) -> None:
        self._fs = fs
        self._options = storage_options

    def fs_for(self, location: str) -> Any:
        if self._fs is None:
            self._fs, _ = fsspec.core.url_to_fs(location, **self._options)
        return self._fs

    def resolve(self, checkpoint_id: object) -> str:
        return str(checkpoint_id).rstrip("/")

    def _path(self, location: str, name: str = "") -> str:
        fs = self.fs_for(location)
        base = fs._strip_protocol(location).rstrip("/")
        return f"{base}/{name}" if name else base

    def begin_save(self, location: str, token: str) -> None:
        fs = self.fs_for(location)
        meta = self._path(location, METADATA_FILE)
        try:
            if fs.exists(meta):
                # Overwriting in place: un-commit first so no reader mixes old and new.
                fs.rm(meta)
            fs.makedirs(self._path(location), exist_ok=True)
            fs.pipe(self._path(location, _MARKER_PREFIX + token), b"")
        except OSError as exc:
            raise CheckpointError(f"cannot start checkpoint at {location}: {exc}") from exc

    async def open_shard(self, location: str, token: str, name: str) -> _FsspecSink:
        fs = self.fs_for(location)
        path = self._path(location, name)
        handle = await asyncio.to_thread(fs.open, path, "wb")
        return _FsspecSink(handle, path)

    def commit(self, location: str, token: str, metadata: bytes) -> None:
        fs = self.fs_for(location)
        fs.pipe(self._path(location, METADATA_FILE), metadata)
        try:
            fs.rm(self._path(location, _MARKER_PREFIX + token))
        except FileNotFoundError:
            pass

    def abort_save(self, location: str, token: str) -> None:
        fs = self.fs_for(location)
        try:
            if not fs.exists(self._path(location, METADATA_FILE)):
                fs.rm(self._path(location), recursive=True)
        except (FileNotFoundError, OSError):
            pass

    def read_metadata(self, location: str) -> bytes:
        fs = self.fs_for(location)
        try:
            return bytes(fs.cat_file(self._path(location, METADATA_FILE)))
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {location} ({METADATA_FILE} not found)"
            ) from None

    def open_reader(self, location: str, name: str) -> _FsspecReader:
        return _FsspecReader(self.fs_for(location), self._path(location, name))

    def list_children(self, root: str) -> list[str]:
        fs = self.fs_for(root)
        try:
            children = fs.ls(self._path(root), detail=False)
        except FileNotFoundError:
            return []
        proto = root.split("://", 1)[0] + "://" if "://" in root else ""
        out = []
        for child in sorted(children):
            name = child.rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("."):
                out.append(f"{proto}{child.rstrip('/')}" if proto and not child.startswith(proto) else child)
        return out

    def delete(self, location: str) -> None:
        fs = self.fs_for(location)
        try:
            fs.rm(self._path(location, METADATA_FILE))
        except FileNotFoundError:
            pass
        try:
            fs.rm(self._path(location), recursive=True)
        except FileNotFoundError:
            pass

    def remove_uncommitted(self, root: str) -> list[str]:
        fs = self.fs_for(root)
        base = self._path(root)
        removed: list[str] = []
        try:
            children = fs.ls(base, detail=False)
        except FileNotFoundError:
            return removed
        for child in sorted(children):
            if fs.isdir(child) and not fs.exists(f"{child}/{METADATA_FILE}"):
                names = [p.rsplit("/", 1)[-1] for p in fs.ls(child, detail=False)]
                if any(n.startswith(_MARKER_PREFIX) for n in names):
                    fs.rm(child, recursive=True)
                    removed.append(child)
        return removed
