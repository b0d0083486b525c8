"""Load: match the target's leaves to saved chunks, read only the overlapping bytes, verify.

For every tensor in the target, this rank's chunk of it (the whole tensor, or a
DTensor's local shard) is intersected with the saved chunks. Where a whole
saved chunk is one contiguous run of contiguous CPU target memory (the whole
target, or a block of its rows), bytes are read straight into the target;
otherwise the smallest covering byte range is read into a scratch buffer and
the overlap copied out (the plan: ``load_plan.py``). Reads run on a
thread pool, checksums are verified per block, and nothing is unpickled unless
the caller allows it.
"""

from __future__ import annotations

from typing import Any

import torch

from .dist import Comm, run_collectively
from .errors import CheckpointError, CheckpointReplacedError
from .format.metadata import Metadata
from .format.values import PickleRefusedError
from .load_metadata import (
    check_same_save,
    decode_checked,
    read_checkpoint_metadata,
    same_checkpoint,
    unchanged_while,
)
from .load_plan import LoadPlan, plan_load, plan_reads
from .load_view import LoadView
from .planning import ChunkStorageMetadata
from .read_ops import execute_reads, open_source, replaced_as_such
from .storage.base import CheckpointSource, Storage

__all__ = [
    "load_collective",
    "read_checkpoint_metadata",
    "read_region",
    "same_checkpoint",
    "unchanged_while",
]


def load_collective(
    comm: Comm,
    storage: Storage,
    location: str,
    state_dict: dict[str, Any],
    *,
    strict: bool,
    allow_pickle: bool,
    verify: bool,
    cast: bool = False,
) -> Metadata:
    """Load in three collective steps: plan, read, finish.

    Nothing in any rank's target changes before every rank has planned its
    load (found every key, checked shapes and dtypes, decoded the values):
    one rank's missing key stops all of them before they read. Reads then go
    straight into in-place CPU tensors; GPU, meta-device and cast targets are
    read into host memory and copied over in the finish step, which also puts
    values and rebuilt containers in place and calls each Stateful's
    ``load_state_dict``, only once every rank has read all its bytes.
    """

    def prepare() -> tuple[Metadata, LoadView, LoadPlan]:
        view = LoadView(state_dict)  # calls state_dict() in sorted key order, before any I/O
        # One save, held (storage/source.py): its shards are opened through it, never by path.
        source, md = open_source(
            storage, location, lambda raw: decode_checked(raw, location), prefetch_rank=comm.rank
        )
        sources.append(source)
        _refuse_pickled(md, allow_pickle, location)
        view.bind(md.tree)
        plan = plan_load(
            view,
            md,
            comm.rank,
            comm.world_size,
            storage,
            location,
            strict=strict,
            allow_pickle=allow_pickle,
            cast=cast,
            source=source,
        )
        return md, view, plan

    sources: list[CheckpointSource] = []

    def read(source: CheckpointSource, plan: LoadPlan, md: Metadata) -> None:
        with replaced_as_such(source, location):
            execute_reads(plan.reads, storage, location, md, verify, source=source)

    def plan_and_read() -> tuple[Metadata, LoadView, LoadPlan]:
        try:
            md, view, plan = run_collectively(comm, "load", prepare)
            check_same_save(comm, md, location)
            run_collectively(comm, "load", lambda: read(sources[-1], plan, md))
            return md, view, plan
        finally:
            while sources:
                sources.pop().close()

    try:
        md, view, plan = plan_and_read()
    except CheckpointReplacedError:
        if comm.world_size > 1:
            raise  # one rank's retry would leave the others behind
        md, view, plan = plan_and_read()  # the "load latest" pattern: read the new checkpoint
    run_collectively(comm, "load", lambda: _finish(view, plan))
    return md


def _refuse_pickled(md: Metadata, allow_pickle: bool, location: str) -> None:
    if md.pickled and not allow_pickle:
        raise PickleRefusedError(
            f"{location} holds pickled data, and unpickling runs code from the file. "
            "Pass allow_pickle=True to load() only if you trust this checkpoint."
        )


def _copy_over(plan: LoadPlan) -> None:
    with torch.no_grad():
        for dest, host in plan.copies:
            dest.copy_(host, non_blocking=False)
    if plan.fills:
        import numpy as np  # loaded already: the targets are numpy arrays

        for arr, loaded in plan.fills:
            np.copyto(arr, loaded)


def _finish(view: LoadView, plan: LoadPlan) -> None:
    _copy_over(plan)
    view.finish()


def _load_into(
    view: LoadView,
    md: Metadata,
    rank: int,
    world: int,
    storage: Storage,
    location: str,
    *,
    strict: bool,
    allow_pickle: bool,
    verify: bool,
) -> None:
    """Plan, read and copy in one step (no vote between them); the caller calls ``view.finish()``."""
    plan = plan_load(
        view, md, rank, world, storage, location, strict=strict, allow_pickle=allow_pickle, cast=False
    )
    execute_reads(plan.reads, storage, location, md, verify)
    _copy_over(plan)


def read_region(
    storage: Storage,
    location: str,
    md: Metadata,
    fqn: str,
    offsets: tuple[int, ...],
    out: torch.Tensor,
    *,
    verify: bool = True,
    source: CheckpointSource | None = None,
) -> None:
    """Fill ``out`` (a CPU tensor) with the box of tensor ``fqn`` starting at ``offsets``.

    The building block for streaming conversions: any region of any saved
    tensor, whatever layout it was saved in, read and verified. Reads go
    through ``source`` when given (``read_ops.open_source``, whose metadata
    ``md`` is); the caller then asks ``source.replaced()`` once it has read
    all it wanted, as one check per region would re-read the metadata.
    """
    rec = md.tensors.get(fqn)
    if rec is None:
        raise CheckpointError(f"key '{fqn}' is not a tensor in {location}")
    if rec.per_rank:
        raise CheckpointError(f"key '{fqn}' in {location} was saved per rank; read it with load()")
    if out.dtype != rec.dtype:
        raise CheckpointError(f"key '{fqn}': output dtype {out.dtype} differs from saved {rec.dtype}")
    target = ChunkStorageMetadata(offsets, tuple(out.shape))
    if any(o + s > d for o, s, d in zip(target.offsets, target.sizes, rec.shape, strict=True)):
        raise CheckpointError(f"key '{fqn}': region {offsets} + {tuple(out.shape)} exceeds {rec.shape}")
    reads = list(plan_reads(fqn, rec, target, out, rank=0))
    execute_reads(reads, storage, location, md, verify, source=source, confirm=False)
