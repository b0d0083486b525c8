"""Converting a DCP checkpoint into an async_ckpt one, streamed: every later load is checksummed.

Each saved DCP chunk becomes one or more of our chunks (slabs of at most
``slab_bytes``, cut as ``convert._slabs`` cuts them), read one at a time into a
fresh buffer and handed to the save's writer pipeline (``writer.pipeline``),
which checksums them on the fly and writes one file at a time. Memory stays
within a slab plus the writer's small batch, whatever the checkpoint's size.
The output is committed through the storage's commit protocol, so it is whole
or absent; values are copied as read, except those only full unpickling can
read, which become None (with a warning) rather than run code from the file.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .convert import _human, _Regions, _slabs
from .errors import CheckpointError
from .format import checksum
from .format.metadata import Metadata, TensorRecord
from .format.shard import chunk_name, shard_file_name
from .interop.dcp_storage import DcpSource
from .local_plan import tensor_bytes
from .save_flow import RankResult, commit_checkpoint
from .storage.base import Storage
from .writer.loop import run_blocking
from .writer.pipeline import FileJob, WriteEntry, write_files

__all__ = ["to_async_ckpt"]

_FILE_BYTES = 1 << 30  # a new shard file after this many bytes: files stay a manageable size


def to_async_ckpt(
    backend: Storage,
    location: str,
    md: Metadata,
    dcp: DcpSource | None,
    out: Storage,
    out_location: str,
    *,
    slab_bytes: int,
    warn: Callable[[str], None],
    progress: Callable[[int, int], None] | None = None,
) -> str:
    """Write the DCP checkpoint ``md`` describes as an async_ckpt checkpoint at ``out_location``.

    Returns a one-line summary. ``progress(n, total)`` is called as bytes are read.
    """
    if dcp is None:
        raise CheckpointError(
            f"{location} is already an async_ckpt checkpoint; copy its directory, or convert it "
            "--to safetensors or --to torch"
        )
    budget = max(16, slab_bytes)
    regions = _Regions(backend, location, md, dcp)
    total = sum(math.prod(rec.shape) * rec.dtype.itemsize for rec in md.tensors.values())
    tick = progress or (lambda n, t: None)

    def reader(fqn: str, offsets: tuple[int, ...], box: tuple[int, ...], dtype: torch.dtype) -> Any:
        def read() -> memoryview:
            buf = torch.empty(box, dtype=dtype)
            if buf.numel():
                regions.read(md, fqn, offsets, buf)
            tick(buf.nbytes, total)
            return tensor_bytes(buf)  # the view keeps buf alive until the writer is done with it

        return read

    jobs: list[FileJob] = []
    entries: list[WriteEntry] = []
    size = 0
    for fqn, rec in md.tensors.items():
        for offsets, box in _pieces(rec, budget):
            nbytes = math.prod(box) * rec.dtype.itemsize
            if entries and size + nbytes > _FILE_BYTES:
                jobs.append(FileJob(_file_name(len(jobs)), tuple(entries)))
                entries, size = [], 0
            entries.append(
                WriteEntry(
                    fqn=fqn,
                    offsets=offsets,
                    sizes=box,
                    dtype=rec.dtype_name,
                    name=chunk_name(fqn, offsets, whole=box == rec.shape),
                    nbytes=nbytes,
                    source=reader(fqn, offsets, box, rec.dtype),
                    global_shape=rec.shape,
                )
            )
            size += nbytes
    if entries:
        jobs.append(FileJob(_file_name(len(jobs)), tuple(entries)))
    values = _values(md, dcp.needs_pickle, warn)
    token = uuid.uuid4().hex[:16]
    out.begin_save(out_location, token)
    try:
        with regions.one_save():
            # One file at a time: memory is one slab (plus the writer's batch), not one per file.
            written = run_blocking(
                write_files(
                    out, out_location, token, jobs, block_size=checksum.DEFAULT_BLOCK_SIZE, max_files=1
                )
            )
        done = commit_checkpoint(out, out_location, token, [RankResult(written, values)], md.tree)
    except BaseException:
        out.abort_save(out_location, token)
        raise
    nbytes = sum(f.size for f in written)
    return f"{len(done.tensors)} tensor(s), {len(done.values)} value(s), {_human(nbytes)}"


def _file_name(k: int) -> str:
    return shard_file_name(0, k)


def _values(md: Metadata, needs_pickle: frozenset[str], warn: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for fqn, rec in md.values.items():
        if fqn in needs_pickle:
            warn(f"warning: '{fqn}' holds objects only full unpickling reads; converted as None")
            out[fqn] = None
        else:
            out[fqn] = rec.value  # DCP keeps one copy of a value: never per rank
    return out


def _pieces(rec: TensorRecord, budget: int) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``(offsets, sizes)`` of our chunks for a saved tensor: its chunks, cut into slabs."""
    if not rec.chunks:  # an empty tensor DCP saved no chunk of
        yield (0,) * len(rec.shape), rec.shape
    for chunk in rec.chunks:
        if math.prod(chunk.sizes) == 0:
            yield chunk.offsets, chunk.sizes  # no slabs to cut, yet the tensor needs a chunk
            continue
        for rel, box in _slabs(chunk.sizes, rec.dtype.itemsize, budget):
            yield tuple(a + b for a, b in zip(chunk.offsets, rel, strict=True)), box
