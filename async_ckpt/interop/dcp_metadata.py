"""DCP's ``.metadata`` translated into our read model (``format.metadata.Metadata``).

Each saved tensor chunk becomes a chunk record whose ``file`` is a *virtual*
name standing for its ``torch.save`` blob (``<file>@<offset>``); the
:class:`~async_ckpt.interop.dcp_storage.DcpStorage` view opens such a name as
the chunk's raw row-major bytes. With that, the ordinary load machinery
(``load._load_into``, ``planning.reshard``) reshards DCP checkpoints exactly as
it does ours. DCP has no checksums: chunk records carry none, and loads run
with verification off.

Keys follow DCP's rules (``_nested_dict.py`` / ``_traverse.py``): nested dicts
are joined with ``.``, and a list without tensors, or any tuple, is one leaf.
Such container leaves are read here and split into one value per element,
which are the keys our own flattening gives the target.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError, CorruptCheckpointError
from ..format.dtypes import any_name
from ..format.metadata import ChunkRecord, FileRecord, Metadata, TensorRecord, ValueRecord
from ..format.values import encode_value
from ..load_metadata import validate_chunks
from ..storage.base import ShardReader, Storage
from .dcp_blob import NeedsPickle, load_blob, read_blob
from .dcp_detect import DCP_METADATA_FILE
from .dcp_unpickler import Record, unpickle_metadata

__all__ = ["DCP_METADATA_FILE", "BlobRef", "DcpCheckpoint", "read_dcp", "read_file"]

_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,200}")
_RANK_FILE = re.compile(r"__(\d+)_\d+\.distcp")
_INT_KEY = re.compile(r"-?[1-9][0-9]{0,17}|0")
_MAX_ELEMENTS = 1 << 56


@dataclass(frozen=True, slots=True)
class BlobRef:
    """Where one tensor chunk's ``torch.save`` blob lies, and what it must hold."""

    fqn: str
    file: str
    offset: int
    length: int
    transforms: tuple[str, ...]
    dtype: torch.dtype
    sizes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DcpCheckpoint:
    md: Metadata
    """Our read model; chunk ``file`` names are keys of ``blobs`` or ``memory``."""
    blobs: Mapping[str, BlobRef]
    memory: Mapping[str, torch.Tensor]
    """Tensors that DCP saved inside a value (a tuple holding tensors), already read."""
    raw: bytes
    """The ``.metadata`` bytes read (to tell, later, whether a save replaced them)."""
    needs_pickle: frozenset[str] = field(default_factory=frozenset)
    """Value keys that only full unpickling can read (not read: the caller did not allow it)."""


class _Bad(Exception):
    pass


def read_dcp(storage: Storage, location: str, *, allow_pickle: bool) -> DcpCheckpoint:
    """Read and translate the DCP checkpoint at ``location``; its values are read too (they are small)."""
    where = f"{location}/{DCP_METADATA_FILE}"
    raw = read_file(storage, location, DCP_METADATA_FILE)
    root = unpickle_metadata(raw, where=where)
    try:
        return _Translator(storage, location, allow_pickle).run(root, raw)
    except _Bad as exc:
        raise CorruptCheckpointError(f"{where}: {exc}") from None


def read_file(storage: Storage, location: str, name: str) -> bytes:
    reader = storage.open_reader(location, name)
    try:
        raw = bytearray(reader.size())
        reader.readinto(0, memoryview(raw))
        return bytes(raw)
    finally:
        reader.close()


class _Translator:
    def __init__(self, storage: Storage, location: str, allow_pickle: bool) -> None:
        self.storage, self.location, self.allow_pickle = storage, location, allow_pickle
        self.tensors: dict[str, TensorRecord] = {}
        self.values: dict[str, ValueRecord] = {}
        self.files: dict[str, FileRecord] = {}
        self.blobs: dict[str, BlobRef] = {}
        self.memory: dict[str, torch.Tensor] = {}
        self.needs_pickle: set[str] = set()
        self.leaf_nodes: dict[str, Any] = {}
        self.pickled = False
        self.world = 1

    def run(self, root: Any, raw: bytes) -> DcpCheckpoint:
        if not isinstance(root, Record) or root.kind != "Metadata":
            raise _Bad(f"holds a {type(root).__name__}, not DCP Metadata")
        entries = _dict(root.field("state_dict_metadata"), "state_dict_metadata")
        infos = self._storage_infos(_dict(root.field("storage_data"), "storage_data"))
        byte_items: list[tuple[str, tuple[str, int, int, tuple[str, ...]]]] = []
        for fqn, entry in entries.items():
            if not isinstance(fqn, str) or not isinstance(entry, Record):
                raise _Bad(f"entry {str(fqn)[:60]!r} is not a DCP storage record")
            if entry.kind == "TensorStorageMetadata":
                self._tensor(fqn, entry, infos)
            elif entry.kind == "BytesStorageMetadata":
                if (fqn, None) not in infos:
                    raise _Bad(f"value '{fqn}' has no storage entry")
                byte_items.append((fqn, infos[(fqn, None)]))
            else:
                raise _Bad(f"key '{fqn}' has unknown storage type {entry.kind}")
        validate_chunks(self.tensors, f"{self.location}/{DCP_METADATA_FILE}")
        self._read_values(byte_items)
        tree = _tree(root.field("planner_data"), self.leaf_nodes)
        md = Metadata(
            tensors=self.tensors,
            values=self.values,
            files=self.files,
            tree=tree,
            world_size=self.world,
            pickled=self.pickled,
        )
        return DcpCheckpoint(md, self.blobs, self.memory, raw, frozenset(self.needs_pickle))

    def _storage_infos(self, data: dict[Any, Any]) -> dict[tuple[str, tuple[int, ...] | None], Any]:
        out: dict[tuple[str, tuple[int, ...] | None], Any] = {}
        for index, info in data.items():
            if not (isinstance(index, Record) and isinstance(info, Record)):
                raise _Bad("storage_data holds something other than DCP index and storage records")
            fqn = index.field("fqn")
            if not isinstance(fqn, str):
                raise _Bad("a storage index has no key")
            offset = index.field("offset")
            dims = None if offset is None else _dims(offset, f"storage index of '{fqn}'")
            path = info.field("relative_path")
            if not isinstance(path, str) or not _SAFE_FILE.fullmatch(path) or path == DCP_METADATA_FILE:
                raise _Bad(f"key '{fqn}': unsafe or invalid data file name {str(path)[:80]!r}")
            start = _int(info.field("offset"), f"key '{fqn}' offset")
            length = _int(info.field("length"), f"key '{fqn}' length")
            transforms = info.field("transform_descriptors") or ()
            if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
                raise _Bad(f"key '{fqn}': malformed transform descriptors")
            out[(fqn, dims)] = (path, start, length, tuple(transforms))
            m = _RANK_FILE.fullmatch(path)
            if m is not None:
                self.world = max(self.world, int(m[1]) + 1)
        return out

    def _tensor(self, fqn: str, entry: Record, infos: Mapping[Any, Any]) -> None:
        props = entry.field("properties")
        state = props.state if isinstance(props, Record) else None
        dtype = (
            state[0]
            if isinstance(state, tuple) and state
            else getattr(props, "field", lambda _: None)("dtype")
        )
        if not isinstance(dtype, torch.dtype):
            raise _Bad(f"tensor '{fqn}' has no dtype")
        shape = _dims(entry.field("size"), f"tensor '{fqn}' size")
        chunks = []
        for c in _list(entry.field("chunks"), f"tensor '{fqn}' chunks"):
            if not isinstance(c, Record) or c.kind != "ChunkStorageMetadata":
                raise _Bad(f"tensor '{fqn}': a chunk is not a DCP chunk record")
            offsets = _dims(c.field("offsets"), f"tensor '{fqn}' chunk offsets")
            sizes = _dims(c.field("sizes"), f"tensor '{fqn}' chunk sizes")
            if len(offsets) != len(shape) or len(sizes) != len(shape):
                raise _Bad(f"tensor '{fqn}': chunk at {list(offsets)} has the wrong number of dims")
            if any(o + s > d for o, s, d in zip(offsets, sizes, shape, strict=True)):
                raise _Bad(f"tensor '{fqn}': chunk at {list(offsets)} exceeds shape {list(shape)}")
            info = infos.get((fqn, offsets))
            if info is None:
                raise _Bad(f"tensor '{fqn}': chunk at {list(offsets)} has no storage entry")
            path, start, length, transforms = info
            name = f"{path}@{start}"
            nbytes = math.prod(sizes) * dtype.itemsize
            m = _RANK_FILE.fullmatch(path)
            self.files[name] = FileRecord(
                rank=int(m[1]) if m else 0, size=nbytes, header_length=0, header_checksum=""
            )
            self.blobs[name] = BlobRef(fqn, path, start, length, transforms, dtype, sizes)
            chunks.append(ChunkRecord(offsets, sizes, name, fqn, 0, nbytes, ()))
        self.tensors[fqn] = TensorRecord(dtype_name=any_name(dtype), shape=shape, chunks=tuple(chunks))
        self.leaf_nodes[fqn] = {"x": fqn}

    def _read_values(self, items: list[tuple[str, tuple[str, int, int, tuple[str, ...]]]]) -> None:
        readers: dict[str, ShardReader] = {}
        try:
            for fqn, (path, start, length, transforms) in sorted(items, key=lambda i: i[1][:2]):
                if path not in readers:
                    readers[path] = self.storage.open_reader(self.location, path)
                where = f"{self.location}/{path} (key '{fqn}', bytes [{start}, {start + length}))"
                blob = read_blob(readers[path], start, length, transforms, where)
                try:
                    value = load_blob(blob, allow_pickle=self.allow_pickle, where=where)
                except NeedsPickle:
                    self.needs_pickle.add(fqn)
                    self.pickled = True
                    self.values[fqn] = ValueRecord(value={"$pickle": ""})
                    self.leaf_nodes[fqn] = {"x": fqn}
                    continue
                self.leaf_nodes[fqn] = self._expand(fqn, value, depth=0)
        finally:
            for r in readers.values():
                r.close()

    def _expand(self, fqn: str, obj: Any, depth: int) -> Any:
        """Tree node for a value DCP saved as one leaf; its elements become leaves of their own."""
        if depth > 100:
            raise CheckpointError(f"{self.location}: value '{fqn}' is nested over 100 levels")
        if isinstance(obj, torch.Tensor):
            t = obj.detach().contiguous()
            name = f"{fqn}#value"
            self.memory[name] = t
            self.files[name] = FileRecord(rank=0, size=t.nbytes, header_length=0, header_checksum="")
            sizes = tuple(t.shape)
            chunk = ChunkRecord((0,) * t.dim(), sizes, name, fqn, 0, t.nbytes, ())
            self.tensors[fqn] = TensorRecord(dtype_name=any_name(t.dtype), shape=sizes, chunks=(chunk,))
            return {"x": fqn}
        if type(obj) in (list, tuple) and _needs_keys(obj):
            kids = [self._expand(f"{fqn}.{i}", v, depth + 1) for i, v in enumerate(obj)]
            return {"l" if type(obj) is list else "t": kids}
        if isinstance(obj, dict) and all(k is None or isinstance(k, (str, int, float, bool)) for k in obj):
            return {"d": [[k, self._expand(f"{fqn}.{k}", v, depth + 1)] for k, v in obj.items()]}
        encoded = encode_value(obj, fqn=fqn, allow_pickle=True)
        if isinstance(encoded, dict) and "$pickle" in encoded:
            self.pickled = True  # made here, from an object weights_only loading (or the caller) allowed
        self.values[fqn] = ValueRecord(value=encoded)
        return {"x": fqn}


class _Dir:
    """A container on the way to some leaves; a list if DCP indexed it only with ints."""

    def __init__(self) -> None:
        self.kids: dict[str | int, _Dir | _Leaf] = {}
        self.is_list = True


@dataclass(frozen=True, slots=True)
class _Leaf:
    node: Any


def _needs_keys(seq: list[Any] | tuple[Any, ...]) -> bool:
    """Whether our flattening gives a list's items keys of their own (it does for tensors and dicts).

    A list or tuple of plain data is one value to us, as to DCP; one that
    holds a tensor or a dict is a container (DCP keeps a tuple as one leaf
    even then).
    """
    for item in seq:
        if isinstance(item, (torch.Tensor, dict)):
            return True
        if type(item) in (list, tuple) and _needs_keys(item):
            return True
    return False


def _tree(planner_data: Any, leaves: dict[str, Any]) -> dict[str, Any]:
    """Our container tree from DCP's ``fqn -> object path`` mapping (flat where it has none).

    DCP turns every dict key into a string; keys spelled like ints are given
    back as ints, the type optimizers' ``state`` keys have.
    """
    root = _Dir()
    paths = planner_data if isinstance(planner_data, dict) else {}
    for fqn, node in leaves.items():
        path = paths.get(fqn)
        if not (isinstance(path, tuple) and path and all(type(p) in (str, int) for p in path)):
            path = (fqn,)
        parent = root
        for part in path[:-1]:
            parent.is_list &= type(part) is int
            child = parent.kids.get(part)
            if not isinstance(child, _Dir):
                child = parent.kids[part] = _Dir()
            parent = child
        parent.is_list &= type(path[-1]) is int
        parent.kids[path[-1]] = _Leaf(node)
    return _node(root, is_root=True)


def _node(d: _Dir, *, is_root: bool = False) -> dict[str, Any]:
    kids = {k: v.node if isinstance(v, _Leaf) else _node(v) for k, v in d.kids.items()}
    if not is_root and d.is_list and sorted(kids) == list(range(len(kids))):
        return {"l": [kids[i] for i in range(len(kids))]}
    return {"d": [[_key(k), v] for k, v in kids.items()]}


def _key(part: str | int) -> str | int:
    if isinstance(part, str) and _INT_KEY.fullmatch(part):
        return int(part)
    return part


def _dict(v: Any, what: str) -> dict[Any, Any]:
    if not isinstance(v, dict):
        raise _Bad(f"{what} is not a dict")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, (list, tuple)):
        raise _Bad(f"{what} is not a list")
    return list(v)


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise _Bad(f"{what} must be an integer >= 0, got {str(v)[:40]!r}")
    return v


def _dims(v: Any, what: str) -> tuple[int, ...]:
    dims = tuple(_int(x, what) for x in _list(v, what))
    if len(dims) > 64 or math.prod(dims) > _MAX_ELEMENTS:
        raise _Bad(f"{what} {list(dims)[:8]} is implausible")
    return dims
