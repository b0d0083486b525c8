"""Any file system fsspec knows (s3://, gs://, memory://, ...), with S3 as the first-class case.

Object stores have no rename, so the commit is the marker protocol, all under
the checkpoint's own prefix:

    begin_save   delete metadata.json if there is one (un-commit), PUT .async_ckpt-writing-<token>
    every rank   PUT its shard files (S3: multipart, parts uploaded concurrently)
    commit       check every shard the metadata names is there at its size,
                 PUT metadata.json (the commit), delete the markers and stale shards
    abort_save   delete this prefix's shards and markers, abort its multipart uploads

``metadata.json`` is written last and its presence is the commit: readers
never look at a prefix without it. A prefix that holds a marker and no
``metadata.json`` is the leftover of an interrupted save (``remove_uncommitted``).

On S3 a shard is streamed into parts of ``part_size`` bytes; a part starts
uploading as soon as it is full, while the next one fills. At most
``upload_concurrency`` parts are in flight per storage object and event loop,
so the memory a save holds beyond its source buffers is at most
``(upload_concurrency + open files) * part_size``. Parts grow by one
``part_size`` every 1,000 parts to stay within S3's 10,000-part limit.
Other file systems get fsspec's own buffered writer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import fsspec
import fsspec.asyn

from ..errors import CheckpointError, CheckpointNotFoundError
from .fsspec_io import (
    _DELETING_MARKER,
    _MARKER_PREFIX,
    _MIN_PART,
    _OBJECT_STORES,
    _POOL_CONNECTIONS,
    _SHARD,
    METADATA_FILE,
    _FileSink,
    _FsspecReader,
    _is_s3,
    _Limiter,
    _MultipartSink,
    _ours,
    _put,
)

__all__ = ["FsspecStorage"]

log = logging.getLogger("async_ckpt.storage")


class FsspecStorage:
    """Checkpoints under a URL prefix on an fsspec file system.

    ``storage_options`` go to ``fsspec.url_to_fs`` (for S3, to
    ``s3fs.S3FileSystem``: ``endpoint_url``, ``key``/``secret``, ``profile``,
    ``client_kwargs``, ...). Only these options are pickled into the
    background worker, which builds its own file system from them; a live
    file system passed as ``fs`` is pickled the way fsspec pickles it (by its
    options, too). ``part_size`` and ``upload_concurrency`` shape S3 uploads;
    ``read_threads`` is how many ranged reads a load keeps in flight (latency,
    not the CPU, limits an object store, so the default is high).
    """

    def __init__(
        self,
        fs: Any = None,
        *,
        part_size: int = 16 << 20,
        upload_concurrency: int = 8,
        read_threads: int = 8,
        **storage_options: Any,
    ) -> None:
        if part_size < _MIN_PART:
            raise ValueError(f"part_size must be at least 5 MiB ({_MIN_PART} bytes), S3's smallest part")
        if upload_concurrency < 1:
            raise ValueError("upload_concurrency must be at least 1")
        if read_threads < 1:
            raise ValueError("read_threads must be at least 1")
        self._user_fs = fs
        self._options = storage_options
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self.read_threads = read_threads
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._fs_cache: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._limiter = _Limiter(self.upload_concurrency)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "fs": self._user_fs,
            "options": self._options,
            "part_size": self.part_size,
            "upload_concurrency": self.upload_concurrency,
            "read_threads": self.read_threads,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._user_fs = state["fs"]
        self._options = state["options"]
        self.part_size = state["part_size"]
        self.upload_concurrency = state["upload_concurrency"]
        self.read_threads = state.get("read_threads", 8)
        self._init_runtime()

    def fs_for(self, location: str) -> Any:
        if self._user_fs is not None:
            return self._user_fs
        protocol = location.split("://", 1)[0] if "://" in location else "file"
        with self._lock:
            if protocol not in self._fs_cache:
                options = dict(self._options)
                if protocol in ("s3", "s3a"):
                    # Several processes write and read the same prefixes: never trust a cached listing.
                    options.setdefault("use_listings_cache", False)
                    config = dict(options.get("config_kwargs") or {})
                    config.setdefault("max_pool_connections", _POOL_CONNECTIONS)
                    options["config_kwargs"] = config
                self._fs_cache[protocol], _ = fsspec.core.url_to_fs(location, **options)
            return self._fs_cache[protocol]

    def resolve(self, checkpoint_id: object) -> str:
        return str(checkpoint_id).rstrip("/")

    def _path(self, location: str, name: str = "") -> str:
        base = self.fs_for(location)._strip_protocol(location).rstrip("/")
        return f"{base}/{name}" if name else base

    def _entries(self, fs: Any, path: str) -> dict[str, dict[str, Any]]:
        """``name -> info`` of what is directly under ``path``; ``""`` if ``path`` is itself a file."""
        fs.invalidate_cache(path)
        try:
            listing = fs.ls(path, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for info in listing:
            full = str(info["name"]).rstrip("/")
            out["" if full == path.rstrip("/") else full.rsplit("/", 1)[-1]] = info
        return out

    # ------------------------------------------------------------- writing

    def begin_save(self, location: str, token: str) -> None:
        fs = self.fs_for(location)
        base = self._path(location)
        try:
            entries = self._entries(fs, base)
            if "" in entries:
                raise CheckpointError(f"{location} is a file, not a checkpoint; choose another checkpoint id")
            foreign = sorted(n for n, info in entries.items() if info.get("type") != "file" or not _ours(n))
            if foreign:
                raise CheckpointError(
                    f"{location} exists and is not a checkpoint (it holds {', '.join(foreign[:3])}); "
                    "refusing to write into it. Choose another checkpoint id or remove it."
                )
            if METADATA_FILE in entries:
                # Overwriting: un-commit first, so no reader mixes the old checkpoint with the new.
                fs.rm_file(f"{base}/{METADATA_FILE}")
            protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
            if not protocols & _OBJECT_STORES:
                fs.makedirs(base, exist_ok=True)
            _put(fs, f"{base}/{_MARKER_PREFIX}{token}", b"")
        except OSError as exc:
            raise CheckpointError(f"cannot start checkpoint at {location}: {exc}") from exc

    async def open_shard(self, location: str, token: str, name: str) -> _MultipartSink | _FileSink:
        fs = self.fs_for(location)
        path = self._path(location, name)
        if _is_s3(fs):
            return _MultipartSink(fs, path, self.part_size, self._limiter.get())
        return _FileSink(await asyncio.to_thread(fs.open, path, "wb"))

    def commit(self, location: str, token: str, metadata: bytes) -> None:
        fs = self.fs_for(location)
        base = self._path(location)
        entries = self._entries(fs, base)
        expected = _file_sizes(metadata)
        for name, size in (expected or {}).items():
            have = entries.get(name, {}).get("size")
            if have != size:  # a listing may lag behind on some S3-compatible stores; ask the object
                have = _size_or_none(fs, f"{base}/{name}")
            if have != size:
                state = "missing" if have is None else f"{have} bytes"
                raise CheckpointError(
                    f"cannot commit {location}: shard {name} is {state}, the metadata says {size} bytes"
                )
        _put(fs, f"{base}/{METADATA_FILE}", metadata)  # the commit: one PUT, visible whole or not at all
        leftovers = [n for n in entries if n.startswith(".async_ckpt-")]
        if expected is not None:  # shards of an earlier checkpoint that this one replaced
            leftovers += [n for n in entries if _SHARD.fullmatch(n) and n not in expected]
        self._remove(fs, base, leftovers)

    def abort_save(self, location: str, token: str) -> None:
        try:
            fs = self.fs_for(location)
            base = self._path(location)
            entries = self._entries(fs, base)
            if METADATA_FILE in entries:
                return  # committed after all (the failure came later); keep it
            self._remove(fs, base, [n for n in entries if _ours(n)])
            self._abort_uploads(fs, base)
        except Exception as exc:  # noqa: BLE001 - cleanup must not hide the error that caused it
            log.warning("could not clean up the aborted save at %s: %s", location, exc)

    # ------------------------------------------------------------- reading

    def read_metadata(self, location: str) -> bytes:
        fs = self.fs_for(location)
        path = self._path(location, METADATA_FILE)
        fs.invalidate_cache(path)
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {location} ({METADATA_FILE} not found)"
            ) from None

    def open_reader(self, location: str, name: str) -> _FsspecReader:
        return _FsspecReader(self.fs_for(location), self._path(location, name))

    # ------------------------------------------------------------ managing

    def list_children(self, root: str) -> list[str]:
        entries = self._entries(self.fs_for(root), self._path(root))
        return [f"{root.rstrip('/')}/{n}" for n in sorted(entries) if n and not n.startswith(".")]

    def delete(self, location: str) -> None:
        fs = self.fs_for(location)
        base = self._path(location)
        # Mark, then un-commit: a delete cut short leaves a leftover remove_uncommitted finds.
        _put(fs, f"{base}/{_DELETING_MARKER}", b"")
        self._remove(fs, base, [METADATA_FILE])
        try:
            fs.rm(base, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(base)

    def remove_uncommitted(self, root: str) -> list[str]:
        """Remove what interrupted saves (and deletes) left under ``root``; call it while none runs."""
        fs = self.fs_for(root)
        base = self._path(root)
        removed: list[str] = []
        for name, info in sorted(self._entries(fs, base).items()):
            if info.get("type") != "directory":
                continue
            names = self._entries(fs, f"{base}/{name}")
            if METADATA_FILE in names or not any(n.startswith(".async_ckpt-") for n in names):
                continue
            self._remove(fs, f"{base}/{name}", [n for n in names if _ours(n)])
            try:
                self._abort_uploads(fs, f"{base}/{name}")
            except Exception as exc:  # noqa: BLE001 - e.g. no permission to list uploads; the files are gone
                log.warning("could not abort multipart uploads under %s/%s: %s", root, name, exc)
            removed.append(f"{root.rstrip('/')}/{name}")
        return removed

    # ------------------------------------------------------------- helpers

    @staticmethod
    def _remove(fs: Any, base: str, names: list[str]) -> None:
        if not names:
            return
        try:
            fs.rm([f"{base}/{n}" for n in names])
        except FileNotFoundError:
            pass
        fs.invalidate_cache(base)

    @staticmethod
    def _abort_uploads(fs: Any, base: str) -> None:
        """Abort unfinished multipart uploads of objects directly under ``base`` (S3 keeps and bills them)."""
        if not _is_s3(fs):
            return
        bucket, key, _ = fs.split_path(base)
        prefix = f"{key}/" if key else ""
        markers: dict[str, str] = {}
        while True:
            out = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **markers)
            for upload in out.get("Uploads", []):
                if "/" not in upload["Key"][len(prefix) :]:
                    fs.call_s3(
                        "abort_multipart_upload",
                        Bucket=bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
            if not out.get("IsTruncated"):
                return
            markers = {"KeyMarker": out["NextKeyMarker"], "UploadIdMarker": out["NextUploadIdMarker"]}


def _size_or_none(fs: Any, path: str) -> int | None:
    fs.invalidate_cache(path)
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def _file_sizes(metadata: bytes) -> dict[str, int] | None:
    """Shard name -> size, from the metadata's ``files``; None if it cannot be read (then not checked)."""
    try:
        files = json.loads(metadata)["body"]["files"]
        return {str(name): int(rec["size"]) for name, rec in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
