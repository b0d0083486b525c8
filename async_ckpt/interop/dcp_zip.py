"""The few zip records of a ``torch.save`` blob that locating its tensor bytes needs, in 3-4 small reads.

``zipfile`` on a blob costs about a dozen reads and 0.3 ms of Python per
chunk, which at thousands of chunks per checkpoint is a large part of a DCP
load. A ``torch.save`` archive is small and regular: its central directory
(every entry's name, method, sizes and local header offset) sits in the last
few hundred bytes, ``data.pkl`` first. So: one read of the tail, one of the
head (``data.pkl`` and ``byteorder``), one of the storage entry's local
header, right before the bytes the load reads next. Anything unusual (zip64
fields, compression, a directory that does not fit the tail) returns None,
and the caller falls back to ``zipfile``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..storage.base import ShardReader

__all__ = ["ZipEntry", "data_offset", "read_entry", "read_head", "read_tail_directory"]

_TAIL = 2048
_HEAD = 2048
_EOCD = struct.Struct("<4sHHHHIIH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_EOCD_SIG, _CENTRAL_SIG, _LOCAL_SIG = b"PK\x05\x06", b"PK\x01\x02", b"PK\x03\x04"
_FULL = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ZipEntry:
    method: int
    size: int
    """Uncompressed size; the entries this reads are stored, so also the size on disk."""
    header: int
    """Offset of the local header in the blob."""


def read_tail_directory(reader: ShardReader, start: int, length: int) -> dict[str, ZipEntry] | None:
    """The blob's central directory by entry name, from one read of its tail; None if it is unusual."""
    n = min(length, _TAIL)
    tail = bytearray(n)
    reader.readinto(start + length - n, memoryview(tail))
    at = tail.rfind(_EOCD_SIG)
    if at < 0 or at + _EOCD.size > n:
        return None
    _, _, _, _, count, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, at)
    pos = cd_offset - (length - n)  # the directory's position in ``tail``
    if _FULL in (cd_size, cd_offset) or pos < 0 or pos + cd_size > at:
        return None
    entries: dict[str, ZipEntry] = {}
    for _ in range(count):
        if pos + _CENTRAL.size > at:
            return None
        rec = _CENTRAL.unpack_from(tail, pos)
        if rec[0] != _CENTRAL_SIG:
            return None
        method, csize, usize, name_len, extra_len, comment_len, header = (
            rec[4],
            rec[8],
            rec[9],
            rec[10],
            rec[11],
            rec[12],
            rec[16],
        )
        if _FULL in (csize, usize, header) or csize != usize:
            return None
        name = bytes(tail[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len]).decode("utf-8", "replace")
        entries[name] = ZipEntry(method, usize, header)
        pos += _CENTRAL.size + name_len + extra_len + comment_len
    return entries


def data_offset(reader: ShardReader, start: int, length: int, entry: ZipEntry) -> int | None:
    """Offset in the blob of a stored entry's bytes (after its local header), or None."""
    head = bytearray(min(_LOCAL.size + 512, max(0, length - entry.header)))
    if len(head) < _LOCAL.size:
        return None
    reader.readinto(start + entry.header, memoryview(head))
    return _after_local(head, 0, entry)


def read_entry(head: bytes | bytearray, entry: ZipEntry) -> bytes | None:
    """A stored entry's bytes, if they lie in ``head`` (the blob's first bytes)."""
    data = _after_local(head, entry.header, entry)
    if data is None or data + entry.size > len(head):
        return None
    return bytes(head[data : data + entry.size])


def read_head(reader: ShardReader, start: int, length: int, need: int) -> bytearray:
    """The blob's first ``need`` bytes (at least ``_HEAD``, at most the blob)."""
    head = bytearray(min(length, max(need, _HEAD)))
    reader.readinto(start, memoryview(head))
    return head


def _after_local(buf: bytes | bytearray, pos: int, entry: ZipEntry) -> int | None:
    if entry.method != 0 or pos + _LOCAL.size > len(buf):
        return None
    sig, _, _, method, _, _, _, _, _, name_len, extra_len = _LOCAL.unpack_from(buf, pos)
    if sig != _LOCAL_SIG or method != 0:
        return None
    return entry.header + _LOCAL.size + name_len + extra_len
