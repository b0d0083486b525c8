"""The ``metadata.json`` schema (format version 2, reads 1): dataclasses, encoding, strict parsing.

The file is ``{"format":"async_ckpt","checksum":"xxh3_64:<16 hex>","body":<body>}``
where the checksum covers the exact bytes of ``<body>``. Parsing checks the
frame byte for byte before it trusts any field, so a flipped bit or a
truncation anywhere in the file is reported as corruption. See docs/format.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, CorruptCheckpointError
from . import checksum
from .dtypes import check_name, itemsize, torch_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT_VERSION",
    "METADATA_FILE",
    "ChunkRecord",
    "FileRecord",
    "Metadata",
    "SaveStats",
    "TensorRecord",
    "ValueRecord",
    "decode_metadata",
    "encode_metadata",
]

FORMAT_VERSION = 2
# Version 1 differs only in what it could hold (plain lists per index, fewer value tags).
_OLDEST_READABLE = 1
METADATA_FILE = "metadata.json"
_PREFIX = b'{"format":"async_ckpt","checksum":"xxh3_64:'
_MIDDLE = b'","body":'
_HEX_LEN = 16
_HEX = re.compile(f"[0-9a-f]{{{_HEX_LEN}}}")
_TOKEN = re.compile(r"[0-9A-Za-z]{1,64}")
_SAFE_FILE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,200}$")
# Far beyond any real tensor, small enough that sizes times itemsize stay exact.
_MAX_ELEMENTS = 1 << 56


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One saved piece of a tensor and where its bytes are."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    name: str
    byte_offset: int
    byte_length: int
    checksums: tuple[str, ...]
    rank: int | None = None

    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One saved tensor. ``dtype`` is a ``torch.dtype``; the record itself holds its name.

    The name is what the worker process, which never imports torch, builds
    and writes; reading ``dtype`` imports torch in the reader's process.
    """

    dtype_name: str
    """The dtype's name as torch spells it without ``torch.`` (``bfloat16``)."""
    shape: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]
    per_rank: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def itemsize(self) -> int:
        return itemsize(self.dtype_name)


@dataclass(frozen=True, slots=True)
class ValueRecord:
    """A non-tensor value, still in its JSON encoding (decoded on load)."""

    value: Any = None
    per_rank: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class FileRecord:
    rank: int
    size: int
    header_length: int
    header_checksum: str


@dataclass(frozen=True, slots=True)
class SaveStats:
    """Timings (seconds) and bytes of one save as seen by this rank; never persisted."""

    stage_s: float = 0.0
    plan_s: float = 0.0
    write_s: float = 0.0
    commit_s: float = 0.0
    bytes_written: int = 0
    plan_cached: bool = False
    stall_s: float = 0.0
    bytes_staged: int = 0
    """Tensor bytes copied into staging for this save (this rank's share, with replica-sharded staging)."""
    rounds: int = 0
    """Rounds the staging took under a ``staging_budget``; 0 for a save staged at once."""
    bytes_copied: int = 0
    """Of ``bytes_written``, those copied through the O_DIRECT writer's aligned buffers; the rest
    went from staging (or, for a blocking save, the tensor) to the device without a copy. 0 where
    the storage does its own buffering."""

    def describe(self) -> str:
        """One log line's worth: every figure, as the INFO log of each save shows it."""
        cached = " (cached)" if self.plan_cached else ""
        return (
            f"stall {self.stall_s:.3f}s stage {self.stage_s:.3f}s plan {self.plan_s:.3f}s{cached} "
            f"write {self.write_s:.3f}s commit {self.commit_s:.3f}s, {self.bytes_written} bytes"
        )


@dataclass(frozen=True, slots=True)
class Metadata:
    tensors: Mapping[str, TensorRecord]
    values: Mapping[str, ValueRecord]
    files: Mapping[str, FileRecord]
    tree: Any
    world_size: int = 1
    block_size: int = checksum.DEFAULT_BLOCK_SIZE
    pickled: bool = False
    version: int = FORMAT_VERSION
    stats: SaveStats | None = field(default=None, compare=False)
    token: str | None = None
    """The save's unique token (``save_token``); None in checkpoints written before it existed."""


def encode_metadata(md: Metadata) -> bytes:
    body = {
        "version": md.version,
        "world_size": md.world_size,
        "checksum": {"algorithm": checksum.ALGORITHM, "block_size": md.block_size},
        "pickled": md.pickled,
        "files": {name: _file_json(f) for name, f in md.files.items()},
        "tensors": {fqn: _tensor_json(t) for fqn, t in md.tensors.items()},
        "values": {fqn: _value_json(v) for fqn, v in md.values.items()},
        "tree": md.tree,
    }
    if md.token is not None:
        body["save_token"] = md.token
    raw = json.dumps(body, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    return _PREFIX + checksum.digest(raw).encode() + _MIDDLE + raw + b"}"


def _file_json(f: FileRecord) -> dict[str, Any]:
    return {
        "rank": f.rank,
        "size": f.size,
        "header_length": f.header_length,
        "header_checksum": f.header_checksum,
    }


def _tensor_json(t: TensorRecord) -> dict[str, Any]:
    return {
        "dtype": t.dtype_name,
        "shape": list(t.shape),
        "per_rank": t.per_rank,
        "chunks": [
            {
                "offsets": list(c.offsets),
                "sizes": list(c.sizes),
                "file": c.file,
                "name": c.name,
                "byte_offset": c.byte_offset,
                "byte_length": c.byte_length,
                "checksums": list(c.checksums),
                "rank": c.rank,
            }
            for c in t.chunks
        ],
    }


def _value_json(v: ValueRecord) -> dict[str, Any]:
    if v.per_rank is not None:
        return {"per_rank": list(v.per_rank)}
    return {"value": v.value}


# ---------------------------------------------------------------- decoding


class _Bad(Exception):
    """A schema violation, turned into CorruptCheckpointError with the file's name."""


def decode_metadata(raw: bytes, *, where: str) -> Metadata:
    """Parse and verify ``metadata.json`` bytes; ``where`` names the file in errors."""
    body = _unframe(raw, where)
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: body is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: body is not a JSON object")
    version = doc.get("version")
    if type(version) is not int or not _OLDEST_READABLE <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format version {version!r} is not supported; this async_ckpt reads "
            f"versions {_OLDEST_READABLE} to {FORMAT_VERSION}. Upgrade async_ckpt to read newer checkpoints."
        )
    try:
        return _parse_body(doc)
    except _Bad as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def _unframe(raw: bytes, where: str) -> bytes:
    head = len(_PREFIX) + _HEX_LEN + len(_MIDDLE)
    if (
        len(raw) < head + 2
        or not raw.startswith(_PREFIX)
        or raw[len(_PREFIX) + _HEX_LEN : head] != _MIDDLE
        or not raw.endswith(b"}")
    ):
        raise CorruptCheckpointError(
            f"{where}: not an async_ckpt metadata file, or truncated ({len(raw)} bytes)"
        )
    stored = raw[len(_PREFIX) : len(_PREFIX) + _HEX_LEN].decode("ascii", "replace")
    body = raw[head:-1]
    actual = checksum.digest(body)
    if stored != actual:
        raise CorruptCheckpointError(
            f"{where}: checksum mismatch (stored {stored}, computed {actual}); "
            "the file was modified or damaged"
        )
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicated key {key!r}")
        out[key] = value
    return out


def _parse_body(doc: dict[str, Any]) -> Metadata:
    world = _int(doc.get("world_size"), "world_size", lo=1)
    ck = _dict(doc.get("checksum"), "checksum")
    if ck.get("algorithm") != checksum.ALGORITHM:
        raise _Bad(f"unknown checksum algorithm {ck.get('algorithm')!r}")
    block = _int(ck.get("block_size"), "checksum.block_size", lo=1)
    pickled = doc.get("pickled")
    if not isinstance(pickled, bool):
        raise _Bad("'pickled' must be a boolean")
    files = {
        _file_name(name): _parse_file(rec, name, world)
        for name, rec in _dict(doc.get("files"), "files").items()
    }
    tensors = {
        fqn: _parse_tensor(rec, fqn, files, block, world)
        for fqn, rec in _dict(doc.get("tensors"), "tensors").items()
    }
    values = {fqn: _parse_value(rec, fqn, world) for fqn, rec in _dict(doc.get("values"), "values").items()}
    overlap = tensors.keys() & values.keys()
    if overlap:
        raise _Bad(f"key '{sorted(overlap)[0]}' is both a tensor and a value")
    return Metadata(
        tensors=tensors,
        values=values,
        files=files,
        tree=doc.get("tree"),
        world_size=world,
        block_size=block,
        pickled=pickled,
        token=_token(doc["save_token"]) if "save_token" in doc else None,  # absent before tokens
    )


def _token(v: object) -> str:
    if not isinstance(v, str) or _TOKEN.fullmatch(v) is None:
        raise _Bad(f"save_token must be 1 to 64 letters and digits, got {str(v)[:40]!r}")
    return v


def _parse_file(rec: object, name: str, world: int) -> FileRecord:
    d = _dict(rec, f"files[{name!r}]")
    size = _int(d.get("size"), f"file '{name}' size", lo=8)
    header = _int(d.get("header_length"), f"file '{name}' header_length", lo=8)
    if header > size:
        raise _Bad(f"file '{name}': header_length {header} exceeds file size {size}")
    return FileRecord(
        rank=_int(d.get("rank"), f"file '{name}' rank", lo=0, hi=world - 1),
        size=size,
        header_length=header,
        header_checksum=_hex(d.get("header_checksum"), f"file '{name}' header_checksum"),
    )


def _parse_tensor(
    rec: object, fqn: str, files: Mapping[str, FileRecord], block: int, world: int
) -> TensorRecord:
    d = _dict(rec, f"tensor '{fqn}'")
    try:
        dtype = check_name(d.get("dtype"))
    except ValueError as exc:
        raise _Bad(f"tensor '{fqn}': {exc}") from None
    shape = _dims(d.get("shape"), f"tensor '{fqn}' shape")
    per_rank = d.get("per_rank", False)
    if not isinstance(per_rank, bool):
        raise _Bad(f"tensor '{fqn}': per_rank must be a boolean")
    chunks = tuple(
        _parse_chunk(c, fqn, shape, dtype, files, block, world)
        for c in _list(d.get("chunks"), f"tensor '{fqn}' chunks")
    )
    if per_rank and any(c.rank is None for c in chunks):
        raise _Bad(f"tensor '{fqn}': per-rank chunks must name their rank")
    return TensorRecord(dtype_name=dtype, shape=shape, chunks=chunks, per_rank=per_rank)


def _parse_chunk(
    rec: object,
    fqn: str,
    shape: tuple[int, ...],
    dtype: str,
    files: Mapping[str, FileRecord],
    block: int,
    world: int,
) -> ChunkRecord:
    what = f"tensor '{fqn}' chunk"
    d = _dict(rec, what)
    offsets = _dims(d.get("offsets"), f"{what} offsets")
    sizes = _dims(d.get("sizes"), f"{what} sizes")
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise _Bad(f"{what}: offsets/sizes rank differs from shape {list(shape)}")
    for o, s, dim in zip(offsets, sizes, shape, strict=True):
        if o + s > dim:
            raise _Bad(f"{what} at offsets {list(offsets)} exceeds shape {list(shape)}")
    name = d.get("file")
    if not isinstance(name, str) or name not in files:
        raise _Bad(f"{what}: file {name!r} is not listed in 'files'")
    frec = files[name]
    start = _int(d.get("byte_offset"), f"{what} byte_offset", lo=frec.header_length)
    length = _int(d.get("byte_length"), f"{what} byte_length", lo=0)
    if length != math.prod(sizes) * itemsize(dtype):
        raise _Bad(f"{what}: byte_length {length} does not match sizes {list(sizes)} x {dtype}")
    if start + length > frec.size:
        raise _Bad(f"{what}: bytes [{start}, {start + length}) run past the end of '{name}'")
    sums = tuple(_hex(s, f"{what} checksum") for s in _list(d.get("checksums"), f"{what} checksums"))
    if len(sums) != max(1, -(-length // block)):
        raise _Bad(f"{what}: {len(sums)} checksums for {length} bytes in blocks of {block}")
    rank = d.get("rank")
    if rank is not None:
        rank = _int(rank, f"{what} rank", lo=0, hi=world - 1)
    label = d.get("name")
    if not isinstance(label, str):
        raise _Bad(f"{what}: name must be a string")
    return ChunkRecord(offsets, sizes, name, label, start, length, sums, rank)


def _parse_value(rec: object, fqn: str, world: int) -> ValueRecord:
    d = _dict(rec, f"value '{fqn}'")
    if "per_rank" in d:
        per_rank = _list(d["per_rank"], f"value '{fqn}' per_rank")
        if len(per_rank) != world:
            raise _Bad(f"value '{fqn}': {len(per_rank)} per-rank values for world size {world}")
        return ValueRecord(per_rank=tuple(per_rank))
    if "value" not in d:
        raise _Bad(f"value '{fqn}' has neither 'value' nor 'per_rank'")
    return ValueRecord(value=d["value"])


def _file_name(name: str) -> str:
    # File names come from the checkpoint: never let one reach outside its directory.
    if not _SAFE_FILE.fullmatch(name) or name == METADATA_FILE:
        raise _Bad(f"unsafe or invalid shard file name {name!r}")
    return name


def _dict(v: object, what: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _Bad(f"{what} must be an object, got {type(v).__name__}")
    return v


def _list(v: object, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise _Bad(f"{what} must be a list, got {type(v).__name__}")
    return v


def _int(v: object, what: str, *, lo: int = 0, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise _Bad(f"{what} must be an integer {bound}, got {str(v)[:40]!r}")
    return v


def _dims(v: object, what: str) -> tuple[int, ...]:
    dims = tuple(_int(x, what) for x in _list(v, what))
    if len(dims) > 64:
        raise _Bad(f"{what} has {len(dims)} dimensions")
    if math.prod(dims) > _MAX_ELEMENTS:
        raise _Bad(f"{what} {list(dims)} is implausibly large")
    return dims


def _hex(v: object, what: str) -> str:
    if not isinstance(v, str) or _HEX.fullmatch(v) is None:
        raise _Bad(f"{what} must be {_HEX_LEN} lowercase hex digits")
    return v
