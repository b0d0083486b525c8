"""Shard files: plain safetensors files, laid out so each chunk is one contiguous range.

A shard is ``<u64 little-endian header length N><N bytes of JSON><data>``; the
JSON maps each entry name to its dtype, shape and ``data_offsets`` relative to
the start of the data section. We pad the header with spaces so data starts on
a 64-byte boundary, which safetensors permits and memory-mapping readers like.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError
from .dtypes import safetensors_name

__all__ = [
    "ShardEntry",
    "ShardLayout",
    "chunk_name",
    "first_shard_names",
    "layout_shard",
    "parse_header",
    "shard_file_name",
]

_ALIGN = 64
# A header larger than this is not one we wrote; refuse before allocating it.
MAX_HEADER_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class ShardEntry:
    name: str
    dtype: str
    """Our dtype name (``format/dtypes.py``)."""
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True, slots=True)
class ShardLayout:
    header: bytes
    """The complete header: length prefix, JSON and padding."""
    offsets: tuple[int, ...]
    """Absolute byte offset of each entry in the file, in entry order."""
    size: int
    """Total file size."""


def shard_file_name(rank: int, k: int, round_index: int | None = None) -> str:
    """The ``k``-th shard file ``rank`` writes in a save, or in round ``round_index`` of a budgeted one."""
    if round_index is None:
        return f"shard-r{rank:05d}-{k:02d}.safetensors"
    return f"shard-r{rank:05d}-round{round_index:04d}-{k:02d}.safetensors"


def first_shard_names(rank: int) -> tuple[str, ...]:
    """The first file (in name order) that ``rank`` writes, for each way a save names them."""
    return shard_file_name(rank, 0), shard_file_name(rank, 0, round_index=0)


def chunk_name(fqn: str, offsets: Sequence[int], whole: bool, rank: int | None = None) -> str:
    """The safetensors entry name of a chunk: the key itself when it is the whole tensor."""
    name = fqn if whole else f"{fqn}@{','.join(str(o) for o in offsets)}"
    return name if rank is None else f"{name}#rank{rank}"


def layout_shard(
    entries: Sequence[ShardEntry], metadata: dict[str, str], data_start: tuple[int, int] | None = None
) -> ShardLayout:
    """The header and each entry's place, entries packed in the order given.

    ``data_start=(residue, modulus)`` pads the header so the data starts at an
    offset congruent to ``residue``: the writer uses it to put large sources
    at offsets their memory addresses agree with (O_DIRECT without a copy).
    ``residue`` must be a multiple of 64.
    """
    header_obj: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for e in entries:
        if e.name in header_obj:
            raise ValueError(f"two chunks would share the safetensors entry name '{e.name}'; rename the key")
        header_obj[e.name] = {
            "dtype": safetensors_name(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [pos, pos + e.nbytes],
        }
        pos += e.nbytes
    body = json.dumps(header_obj, separators=(",", ":")).encode()
    padded = -(-(8 + len(body)) // _ALIGN) * _ALIGN - 8
    if data_start is not None:
        residue, modulus = data_start
        if residue % _ALIGN or modulus % _ALIGN:
            raise ValueError(f"data start {data_start} is not on a {_ALIGN}-byte boundary")
        padded += (residue - 8 - padded) % modulus
    body += b" " * (padded - len(body))
    header = struct.pack("<Q", len(body)) + body
    starts = []
    pos = len(header)
    for e in entries:
        starts.append(pos)
        pos += e.nbytes
    return ShardLayout(header=header, offsets=tuple(starts), size=pos)


def parse_header(prefix: bytes, file_size: int, *, where: str) -> tuple[int, dict[str, Any]]:
    """Validate a shard header. ``prefix`` holds at least the first 8 bytes.

    Returns ``(header_length_including_prefix, header_json)``; raises
    CorruptCheckpointError before reading anything a hostile length points at.
    """
    if len(prefix) < 8 or file_size < 8:
        raise CorruptCheckpointError(f"{where}: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise CorruptCheckpointError(f"{where}: header length {n} is impossible for a {file_size}-byte file")
    if len(prefix) < 8 + n:
        return 8 + n, {}
    try:
        header = json.loads(prefix[8 : 8 + n])
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{where}: header is not a JSON object")
    data_len = file_size - 8 - n
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        offs = rec.get("data_offsets") if isinstance(rec, dict) else None
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data_len
        ):
            raise CorruptCheckpointError(f"{where}: entry '{name}' has invalid data_offsets")
    return 8 + n, header
