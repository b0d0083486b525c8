"""Converting a checkpoint to one consolidated file: safetensors (streamed) or torch.save.

Both reshard from whatever layout was saved, reading through ``read_region``
(verified), and read DCP checkpoints too (``open_input``; unverified, as DCP
has no checksums). Neither ever unpickles. Converting into our own format is
``convert_ckpt.to_async_ckpt``.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import math
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ._tree import node_parts
from .errors import CheckpointError, CorruptCheckpointError
from .format.metadata import Metadata, TensorRecord
from .format.shard import ShardEntry, layout_shard
from .format.values import PickleRefusedError, decode_value
from .interop import is_dcp_checkpoint
from .interop.dcp_metadata import read_dcp
from .interop.dcp_storage import DcpSource
from .load_flow import read_checkpoint_metadata, read_region, unchanged_while
from .storage import Storage

__all__ = ["open_input", "to_safetensors", "to_torch"]


@contextmanager
def open_input(backend: Storage, location: str) -> Iterator[tuple[Metadata, DcpSource | None]]:
    """The checkpoint to convert: our metadata (shards read by path), or a DCP one held open."""
    try:
        md: Metadata | None = read_checkpoint_metadata(backend, location)
    except CheckpointError as exc:
        if isinstance(exc, CorruptCheckpointError) or not is_dcp_checkpoint(backend, location):
            raise
        md = None  # a DCP checkpoint: read below, outside the handler
    if md is not None:
        yield md, None
        return
    ckpt = read_dcp(backend, location, allow_pickle=False)
    with DcpSource(backend, location, ckpt) as chunks:
        yield ckpt.md, chunks


class _Regions:
    """Reads of regions of one checkpoint's tensors, and the proof that it stayed one save."""

    def __init__(self, backend: Storage, location: str, md: Metadata, dcp: DcpSource | None) -> None:
        self.backend, self.location, self.md, self.dcp = backend, location, md, dcp

    def read(self, view: Metadata, fqn: str, offsets: tuple[int, ...], out: torch.Tensor) -> None:
        if self.dcp is None:
            read_region(self.backend, self.location, view, fqn, offsets, out)
        else:  # DCP has no checksums; its source proves the save at the end instead
            read_region(
                self.dcp,  # type: ignore[arg-type]  # a DcpSource reads chunks as a Storage does
                self.location,
                view,
                fqn,
                offsets,
                out,
                verify=False,
                source=self.dcp,
            )

    @contextmanager
    def one_save(self) -> Iterator[None]:
        if self.dcp is None:
            with unchanged_while(self.backend, self.location, self.md):
                yield
            return
        yield
        if self.dcp.replaced():
            raise CheckpointError(
                f"DCP checkpoint {self.location} was overwritten by another save while it was being "
                "converted (DCP saves in place); the output is not written. Convert it again."
            )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _select(md: Metadata, fqn: str, rank: int | None, warn: Callable[[str], None]) -> Metadata | None:
    """Metadata through which ``read_region`` reads ``fqn``; None to skip it."""
    rec = md.tensors[fqn]
    if not rec.per_rank:
        return md
    if rank is None:
        warn(f"warning: skipped '{fqn}': each rank saved its own copy (pick one with --rank R)")
        return None
    chunk = next((c for c in rec.chunks if c.rank == rank), None)
    if chunk is None:
        warn(f"warning: skipped '{fqn}': rank {rank} did not save it")
        return None
    # Rank R's copy is a whole tensor: read it as if it were the only one.
    one = dataclasses.replace(rec, per_rank=False, chunks=(chunk,))
    return dataclasses.replace(md, tensors={**md.tensors, fqn: one})


def _slabs(
    shape: tuple[int, ...], itemsize: int, budget: int
) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Boxes ``(offsets, sizes)`` tiling ``shape`` in row-major order, each within ``budget`` bytes.

    Slabs run along dim 0; when one row alone exceeds the budget, along the
    first dim whose sub-rows fit (the outer indices stepping one at a time).
    """
    nd = len(shape)
    if nd == 0:
        yield (), ()
        return
    if math.prod(shape) == 0:
        return
    k = 0
    while k < nd - 1 and math.prod(shape[k + 1 :]) * itemsize > budget:
        k += 1
    inner = math.prod(shape[k + 1 :]) * itemsize
    n = max(1, min(shape[k], budget // inner))
    rest = (0,) * (nd - k - 1)
    for outer in itertools.product(*(range(d) for d in shape[:k])):
        for j in range(0, shape[k], n):
            yield (*outer, j, *rest), ((1,) * k + (min(n, shape[k] - j),) + shape[k + 1 :])


def to_safetensors(
    backend: Storage,
    location: str,
    md: Metadata,
    tmp: Path,
    *,
    rank: int | None,
    slab_bytes: int,
    warn: Callable[[str], None],
    progress: Callable[[int, int], None] | None = None,
    dcp: DcpSource | None = None,
) -> str:
    """One safetensors file of full tensors, filled slab by slab through a reused buffer.

    Memory stays within ``slab_bytes`` (plus one row when a row is larger),
    so a checkpoint larger than RAM converts. ``progress(n, total)`` is called
    as bytes are written. ``dcp``: the DCP checkpoint ``md`` describes (``open_input``).
    Returns a one-line summary.
    """
    regions = _Regions(backend, location, md, dcp)
    budget = max(16, slab_bytes)
    chosen: list[tuple[str, TensorRecord, Metadata]] = []
    for fqn, rec in md.tensors.items():
        view = _select(md, fqn, rank, warn)
        if view is not None:
            chosen.append((fqn, rec, view))
    if md.values:
        names = ", ".join(list(md.values)[:5]) + (", ..." if len(md.values) > 5 else "")
        warn(f"note: {len(md.values)} non-tensor value(s) skipped ({names}): safetensors holds tensors only")
    sizes = [math.prod(rec.shape) * rec.dtype.itemsize for _, rec, _ in chosen]
    layout = layout_shard(
        [
            ShardEntry(fqn, rec.dtype_name, rec.shape, n)
            for (fqn, rec, _), n in zip(chosen, sizes, strict=True)
        ],
        {"format": "pt"},
    )
    biggest = max((_first_box_bytes(rec, budget) for _, rec, _ in chosen), default=0)
    buf = torch.empty(biggest, dtype=torch.uint8)  # reused for every slab
    tick = progress or (lambda n, total: None)
    with regions.one_save(), open(tmp, "wb") as f:
        f.write(layout.header)
        tick(len(layout.header), layout.size)
        for fqn, rec, view in chosen:
            for offsets, box in _slabs(rec.shape, rec.dtype.itemsize, budget):
                n = math.prod(box) * rec.dtype.itemsize
                regions.read(view, fqn, offsets, buf[:n].view(rec.dtype).view(box))
                f.write(buf[:n].numpy().data)
                tick(n, layout.size)
        if f.tell() != layout.size:
            raise CheckpointError(f"internal error: wrote {f.tell()} bytes, expected {layout.size}")
        f.flush()
        os.fsync(f.fileno())
    return f"{len(chosen)} tensor(s), {_human(layout.size)}"


def _first_box_bytes(rec: TensorRecord, budget: int) -> int:
    box = next(_slabs(rec.shape, rec.dtype.itemsize, budget), None)
    return 0 if box is None else math.prod(box[1]) * rec.dtype.itemsize


_SKIP = object()


def to_torch(
    backend: Storage,
    location: str,
    md: Metadata,
    tmp: Path,
    *,
    rank: int | None,
    warn: Callable[[str], None],
    dcp: DcpSource | None = None,
) -> str:
    """A ``torch.save`` file of the nested state dict rebuilt from the tree (all in memory).

    Pickled values are skipped, never unpickled, and so are values that
    ``torch.load(weights_only=True)`` could not read back (datetime, Decimal,
    paths, numpy scalars...). Returns a one-line summary.
    """
    regions = _Regions(backend, location, md, dcp)
    seen: set[str] = set()
    counts = {"tensors": 0, "values": 0}

    def leaf(fqn: str) -> Any:
        seen.add(fqn)
        if fqn in md.tensors:
            view = _select(md, fqn, rank, warn)
            if view is None:
                return _SKIP
            rec = md.tensors[fqn]
            full = torch.empty(rec.shape, dtype=rec.dtype)
            if full.numel():
                regions.read(view, fqn, (0,) * len(rec.shape), full)
            counts["tensors"] += 1
            return full
        if fqn in md.values:
            value = _value(md, fqn, rank, warn)
            if value is not _SKIP:
                counts["values"] += 1
            return value
        warn(f"warning: the tree names '{fqn}', which the checkpoint does not hold; skipped")
        return _SKIP

    with regions.one_save():
        result = _rebuild(md.tree, leaf)
        state: dict[Any, Any] = result if isinstance(result, dict) else {}
        for fqn in itertools.chain(md.tensors, md.values):
            if fqn not in seen and fqn not in state:
                # Saved only by ranks other than 0: not in rank 0's tree, kept under its flat key.
                value = leaf(fqn)
                if value is not _SKIP:
                    state[fqn] = value
    torch.save(state, tmp)
    return f"{counts['tensors']} tensor(s), {counts['values']} value(s), {_human(tmp.stat().st_size)}"


def _value(md: Metadata, fqn: str, rank: int | None, warn: Callable[[str], None]) -> Any:
    rec = md.values[fqn]
    encoded = rec.value
    if rec.per_rank is not None:
        if rank is None:
            warn(f"warning: skipped '{fqn}': each rank saved its own value (pick one with --rank R)")
            return _SKIP
        encoded = rec.per_rank[rank] if 0 <= rank < len(rec.per_rank) else {"$absent": True}
        if isinstance(encoded, dict) and encoded.get("$absent") is True:
            warn(f"warning: skipped '{fqn}': rank {rank} did not save it")
            return _SKIP
    try:
        value = decode_value(encoded, fqn=fqn, allow_pickle=False)
    except PickleRefusedError:
        warn(f"warning: skipped '{fqn}': it is pickled, and converting never unpickles")
        return _SKIP
    if not _weights_only_loadable(value):
        warn(
            f"warning: skipped '{fqn}': torch.load(weights_only=True) cannot read a "
            f"{type(value).__qualname__}, and the output must load with it"
        )
        return _SKIP
    return value


def _weights_only_loadable(value: Any) -> bool:
    """Whether torch's restricted unpickler reads ``value`` back (no datetime, Decimal, Path, numpy...)."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return True
    buf = io.BytesIO()
    torch.save(value, buf)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except pickle.UnpicklingError:
        return False
    return True


def _rebuild(node: Any, leaf: Callable[[str], Any]) -> Any:
    """The container tree of ``md.tree`` with leaves from ``leaf`` (``_SKIP`` drops dict items)."""
    # node_parts: a dict node may also name its kind; written out as a plain dict,
    # which torch.load(weights_only=True) reads (a defaultdict it would refuse).
    kind, body = node_parts(node)
    if kind == "x" and isinstance(body, str):
        return leaf(body)
    if kind == "d" and isinstance(body, list):
        out = {}
        for pair in body:
            if isinstance(pair, list) and len(pair) == 2:
                value = _rebuild(pair[1], leaf)
                if value is not _SKIP:
                    out[pair[0]] = value
        return out
    if kind in ("l", "t", "n") and isinstance(body, list):
        if kind == "n":  # a namedtuple: [[field, node], ...]; its class is not in the file
            body = [p[1] if isinstance(p, list) and len(p) == 2 else None for p in body]
        # A skipped element becomes None: dropping it would shift the indices after it.
        items = [None if (v := _rebuild(c, leaf)) is _SKIP else v for c in body]
        return items if kind == "l" else tuple(items)
    return _SKIP
