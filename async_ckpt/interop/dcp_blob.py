"""DCP's per-item blobs: ``torch.save`` archives at a (file, offset, length), read without running their code.

A tensor chunk is a ``torch.save`` zip archive whose storage bytes are stored
uncompressed. :func:`locate_tensor_bytes` finds them without loading the
archive: it reads the zip directory and interprets ``data.pkl`` with an
unpickler whose only globals are inert recorders, then checks that the
storage holds exactly the chunk, row-major. The load then reads (part of)
those bytes in place, like a chunk of our own format. Any archive that does
not fit (strided, compressed, transformed) is decoded whole by
:func:`load_blob`, which uses ``torch.load(weights_only=True)``: no code from
the file runs on either path.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError
from ..storage.base import ShardReader
from .dcp_zip import data_offset, read_entry, read_head, read_tail_directory

__all__ = ["NeedsPickle", "SliceFile", "load_blob", "locate_tensor_bytes", "read_blob"]

_MAX_PICKLE = 1 << 20  # a tensor's data.pkl is a few hundred bytes
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_MAGIC = b"PK\x03\x04"


# torch.save names a typed storage class for the dtypes that have one (_rebuild_tensor_v2).
_LEGACY_STORAGES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class NeedsPickle(Exception):
    """The blob holds objects that only full unpickling (``weights_only=False``) rebuilds."""


class SliceFile(io.RawIOBase):
    """A read-only, seekable file over bytes ``[start, start + length)`` of a shard reader."""

    def __init__(self, reader: ShardReader, start: int, length: int) -> None:
        super().__init__()
        self._reader, self._start, self._length, self._pos = reader, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if n:
            self._reader.readinto(self._start + self._pos, view[:n])
            self._pos += n
        return n


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: torch.dtype | None  # None for an untyped storage (v3 names the dtype itself)
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorSpec:
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype | None


class _NotPlain(Exception):
    """data.pkl is not the plain tensor this fast path understands."""


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, *rest: Any) -> _TensorSpec:
    if not isinstance(storage, _Storage):
        raise _NotPlain
    return _TensorSpec(storage, offset, tuple(size), tuple(stride), storage.dtype)


def _rebuild_v3(
    storage: Any, offset: Any, size: Any, stride: Any, rg: Any, hooks: Any, dtype: Any, *rest: Any
) -> Any:
    if not isinstance(storage, _Storage) or not isinstance(dtype, torch.dtype):
        raise _NotPlain
    return _TensorSpec(storage, offset, tuple(size), tuple(stride), dtype)


class _StorageType:
    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype


class _TensorPickle(pickle.Unpickler):
    """Interprets a tensor's data.pkl into a _TensorSpec; every global is an inert recorder."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_v2
        if module == "torch._utils" and name == "_rebuild_tensor_v3":
            return _rebuild_v3
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType(None)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module == "torch" and name in _LEGACY_STORAGES:
            return _StorageType(_LEGACY_STORAGES[name])
        raise _NotPlain

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _NotPlain
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int:
            raise _NotPlain
        return _Storage(key, kind.dtype, numel)


def _row_major(size: Sequence[int]) -> list[int]:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= s
    return strides[::-1]


def locate_tensor_bytes(
    reader: ShardReader, start: int, length: int, dtype: torch.dtype, sizes: tuple[int, ...]
) -> int | None:
    """File offset of the chunk's row-major bytes inside the blob, or None to decode it whole."""
    if sys.byteorder != "little":
        return None
    try:
        quick = _locate_quick(reader, start, length, dtype, sizes)
        if quick is not _UNSURE:
            return quick  # type: ignore[return-value]
        with zipfile.ZipFile(SliceFile(reader, start, length)) as zf:
            pkls = [i for i in zf.infolist() if i.filename.endswith("/data.pkl")]
            if len(pkls) != 1 or pkls[0].file_size > _MAX_PICKLE:
                return None
            prefix = pkls[0].filename[: -len("data.pkl")]
            names = set(zf.namelist())
            if prefix + "byteorder" in names and zf.read(prefix + "byteorder") != b"little":
                return None
            spec = _TensorPickle(io.BytesIO(zf.read(pkls[0]))).load()
            nbytes = _plain_bytes(spec, dtype, sizes)
            if nbytes is None:
                return None
            info = zf.getinfo(prefix + "data/" + spec.storage.key)
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != nbytes:
                return None
            head = bytearray(_LOCAL_HEADER.size)
            reader.readinto(start + info.header_offset, memoryview(head))
            magic, name_len, extra_len = _LOCAL_HEADER.unpack(head)
            data = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            if magic != _LOCAL_MAGIC or data + nbytes > length:
                return None
            return start + data
    except (
        _NotPlain,
        zipfile.BadZipFile,
        KeyError,
        ValueError,
        TypeError,
        EOFError,
        struct.error,
        pickle.UnpicklingError,
    ):
        return None


_UNSURE = object()


def _locate_quick(
    reader: ShardReader, start: int, length: int, dtype: torch.dtype, sizes: tuple[int, ...]
) -> int | object | None:
    """``locate_tensor_bytes`` from the zip records alone (``dcp_zip``); ``_UNSURE`` to ask ``zipfile``."""
    entries = read_tail_directory(reader, start, length)
    if entries is None:
        return _UNSURE
    pkls = [name for name in entries if name.endswith("/data.pkl")]
    if len(pkls) != 1 or entries[pkls[0]].size > _MAX_PICKLE:
        return _UNSURE
    prefix = pkls[0][: -len("data.pkl")]
    wanted = [e for e in (entries[pkls[0]], entries.get(prefix + "byteorder")) if e is not None]
    head = read_head(reader, start, length, max(e.header + 1024 + e.size for e in wanted))
    found = [read_entry(head, e) for e in wanted]
    pkl = found[0]
    if pkl is None or None in found:
        return _UNSURE
    if len(found) == 2 and found[1] != b"little":
        return None
    spec = _TensorPickle(io.BytesIO(pkl)).load()
    nbytes = _plain_bytes(spec, dtype, sizes)
    if nbytes is None:
        return None
    entry = entries.get(prefix + "data/" + spec.storage.key)
    if entry is None or entry.method != 0 or entry.size != nbytes:
        return None
    data = data_offset(reader, start, length, entry)
    if data is None:
        return _UNSURE
    return start + data if data + nbytes <= length else None


def _plain_bytes(spec: Any, dtype: torch.dtype, sizes: tuple[int, ...]) -> int | None:
    """The chunk's byte count if ``spec`` is exactly it, dense and row-major from offset 0."""
    if not isinstance(spec, _TensorSpec) or spec.dtype != dtype or spec.size != sizes:
        return None
    nbytes = math.prod(sizes) * dtype.itemsize
    dense = all(s == r for s, r, n in zip(spec.stride, _row_major(sizes), sizes, strict=True) if n > 1)
    if spec.offset != 0 or not dense or spec.storage.numel * dtype.itemsize != nbytes:
        return None
    return nbytes


def read_blob(reader: ShardReader, start: int, length: int, transforms: Sequence[str], where: str) -> bytes:
    """The blob's bytes, with DCP's stream transforms (compression) undone."""
    raw = bytearray(length)
    reader.readinto(start, memoryview(raw))
    if not transforms:
        return bytes(raw)
    try:
        from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension

        stream: Any = io.BytesIO(raw)
        for ext in ExtensionRegistry().from_descriptor_list(list(transforms)):
            if isinstance(ext, StreamTransformExtension):
                stream = ext.transform_from(stream)
        return bytes(stream.read())
    except (ImportError, ValueError) as exc:
        raise CheckpointError(
            f"{where}: cannot undo DCP transform {list(transforms)} ({exc}); install what it names "
            "(e.g. zstandard for stream.zstd) or load it with dcp.load"
        ) from None


def load_blob(blob: bytes, *, allow_pickle: bool, where: str) -> Any:
    """What ``torch.save`` put in the blob; raises NeedsPickle unless ``weights_only`` loading accepts it."""
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not allow_pickle:
            raise NeedsPickle from None
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in many ways
        raise CorruptCheckpointError(
            f"{where}: not a torch.save blob ({type(exc).__name__}: {exc})"
        ) from None
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CorruptCheckpointError(f"{where}: cannot unpickle ({type(exc).__name__}: {exc})") from None
