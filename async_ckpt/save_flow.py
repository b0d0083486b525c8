"""One collective save: local plans -> global plan -> shard writes -> metadata -> commit.

Every step runs on all ranks of a ``Comm``. A failure on any rank is carried
to every rank before the next collective, so no rank is left waiting; the
coordinator (rank 0) then removes the staging area. The blocking ``save`` runs
:func:`save_collective` in-process; the background workers run the same steps
(:func:`plan_together`, :func:`write_assignment`, :func:`commit_together`,
:func:`commit_reports`) around a cached plan (``worker/save_job.py``).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import math
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ._faults import fail_point
from .dist import Comm, RankFailure, RanksFailedError, run_collectively
from .format import checksum
from .format.metadata import (
    ChunkRecord,
    FileRecord,
    Metadata,
    SaveStats,
    TensorRecord,
    ValueRecord,
    encode_metadata,
)
from .format.shard import chunk_name, shard_file_name
from .planning import SavePlan, WriteItemType, create_global_plan
from .planning.staged import StagedMask
from .save_options import SaveOptions
from .storage.base import FilesPerRankHint, Storage
from .writer.loop import run_blocking
from .writer.pipeline import FileJob, WriteEntry, WrittenFile, write_files

__all__ = [
    "ABSENT",
    "ByteSource",
    "RankAssignment",
    "RankData",
    "RankResult",
    "SaveTarget",
    "aborting_on_failure",
    "assemble_metadata",
    "assign_files",
    "commit_checkpoint",
    "commit_reports",
    "commit_together",
    "coordinate",
    "plan_assignments",
    "plan_together",
    "save_collective",
    "with_stats",
    "write_assignment",
    "write_jobs",
]

ABSENT = {"$absent": True}
"""Per-rank value slot of a rank that did not hold the key."""

_MIN_FILE_BYTES = 64 << 20
MAX_FILES_PER_RANK = 4
"""Shard files one rank writes at most, fewer where the storage asks (``files_per_rank``)."""
BLOCK_SIZE = checksum.DEFAULT_BLOCK_SIZE
"""Bytes per checksum block; recorded in the metadata, so a reader never assumes it."""

Key = tuple[str, tuple[int, ...] | None]
ByteSource = Callable[[], memoryview]
"""The bytes of one tensor item, produced when the writer reaches it."""


@dataclass(frozen=True, slots=True)
class RankData:
    """What one rank writes from: its local plan, each tensor item's bytes, its encoded values.

    Torch-free: the trainer's blocking save wraps its tensors
    (``local_plan.byte_sources``), the worker its staged bytes in shared memory.
    """

    plan: SavePlan
    sources: Mapping[Key, ByteSource]
    values: dict[str, Any]
    addresses: Mapping[Key, int] = field(default_factory=dict)
    """Where a source's bytes lie in memory, for those known before they are taken: the writer
    lays files out so these go to the device without a copy (``writer/pipeline.py``)."""


@dataclass(frozen=True, slots=True)
class FileAssignment:
    name: str
    items: tuple[tuple[str, tuple[int, ...], bool], ...]
    """(fqn, offsets, per_rank) of each chunk, in file order."""


@dataclass(frozen=True, slots=True)
class RankAssignment:
    """What the coordinator tells one rank to write."""

    token: str
    files: tuple[FileAssignment, ...]
    preferred: tuple[Key, ...] | None = None
    """The tensor items this rank would write had every rank staged everything, where that
    differs from ``files`` (replica-sharded staging: what to stage next time)."""


@dataclass(frozen=True, slots=True)
class RankResult:
    """What one rank reports for the commit: its files and all its non-tensor values."""

    files: list[WrittenFile]
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SaveTarget:
    """Where one save goes, and how: what every step of it needs besides the data."""

    storage: Storage
    location: str
    token: str
    """Names the save's staging area; only the coordinator's counts (see :func:`plan_together`)."""
    save_id: int | None = None
    """A worker's save number, which scopes the test-only fault points; None for the blocking save."""


def coordinate(comm: Comm, step: str, payload: Any, fn: Callable[[list[Any]], Sequence[Any]]) -> Any:
    """Gather ``payload``, run ``fn`` on the coordinator, hand rank r its ``fn(...)[r]``.

    If the gather itself fails on the coordinator (a rank never arrived), the
    failure is still broadcast, so the ranks that did arrive fail promptly too.
    """
    comm.step = step
    outputs: Sequence[Any] | None = None
    error: BaseException | None = None
    failure: RankFailure | None = None
    try:
        gathered = comm.gather(payload)
        if comm.rank == 0:
            assert gathered is not None
            outputs = fn(gathered)
    except Exception as exc:
        if comm.rank != 0:
            raise
        error = exc
        failure = RankFailure(0, f"{type(exc).__name__}: {exc}", traceback.format_exc())
    if comm.world_size == 1:
        if error is not None:
            raise error
        assert outputs is not None
        return outputs[0]
    failure = comm.broadcast(failure)
    if failure is not None:
        if error is not None:
            raise error
        raise RanksFailedError(step, [failure])
    return comm.scatter(outputs)


# ------------------------------------------------------------------ planning


def plan_assignments(
    plans: Sequence[SavePlan], token: str, storage: Storage, staged: Sequence[StagedMask] | None = None
) -> list[RankAssignment]:
    """The coordinator's part of planning: dedup, validate, spread each rank's items over files.

    A rank writes at most ``MAX_FILES_PER_RANK`` files, fewer where the
    storage says fewer streams suit it (``files_per_rank``, as LocalStorage has).
    ``staged`` (per rank, a mask over its plan's items) limits each rank to what it staged.
    """
    gp = create_global_plan(plans, dedup="balanced", staged=staged)
    max_files = MAX_FILES_PER_RANK
    if isinstance(storage, FilesPerRankHint):
        max_files = max(1, min(max_files, int(storage.files_per_rank)))
    preferred: Sequence[SavePlan | None] = gp.preferred or [None] * len(gp.plans)
    return [
        RankAssignment(
            token=token,
            files=assign_files(p, rank, gp.per_rank_fqns, max_files),
            preferred=None if pref is None else _tensor_keys(pref),
        )
        for rank, (p, pref) in enumerate(zip(gp.plans, preferred, strict=True))
    ]


def _tensor_keys(plan: SavePlan) -> tuple[Key, ...]:
    return tuple((it.index.fqn, it.index.offset) for it in plan.items if it.type is not WriteItemType.BYTE_IO)


def assign_files(
    plan: SavePlan, rank: int, per_rank: frozenset[str], max_files: int
) -> tuple[FileAssignment, ...]:
    """Spread one rank's tensor items over a few files of similar size, largest first."""
    items = [it for it in plan.items if it.type is not WriteItemType.BYTE_IO]
    total = sum(it.tensor_storage_size() or 0 for it in items)
    n = max(1, min(max_files, len(items), -(-total // _MIN_FILE_BYTES)))
    bins: list[tuple[int, int]] = [(0, k) for k in range(n)]
    members: list[list[int]] = [[] for _ in range(n)]
    order = sorted(range(len(items)), key=lambda i: (-(items[i].tensor_storage_size() or 0), i))
    for i in order:
        load, k = heapq.heappop(bins)
        members[k].append(i)
        heapq.heappush(bins, (load + (items[i].tensor_storage_size() or 0), k))
    files = []
    for k in range(n):
        if not members[k]:
            continue
        files.append(
            FileAssignment(
                name=shard_file_name(rank, k),
                items=tuple(
                    (items[i].index.fqn, items[i].index.offset or (), items[i].index.fqn in per_rank)
                    for i in sorted(members[k])
                ),
            )
        )
    return tuple(files)


# ------------------------------------------------------------------- writing


def write_jobs(assignment: RankAssignment, data: RankData, rank: int) -> list[FileJob]:
    """Turn an assignment into file jobs: shapes and dtypes from the plan, bytes from ``data.sources``."""
    planned = {
        (it.index.fqn, it.index.offset): it.tensor_data
        for it in data.plan.items
        if it.tensor_data is not None
    }
    jobs = []
    for fa in assignment.files:
        entries = []
        for fqn, offsets, per_rank in fa.items:
            td = planned[(fqn, offsets)]
            sizes = td.sizes
            whole = td.size == sizes and not any(offsets)
            entries.append(
                WriteEntry(
                    fqn=fqn,
                    offsets=offsets,
                    sizes=sizes,
                    dtype=td.dtype,
                    name=chunk_name(fqn, offsets, whole, rank if per_rank else None),
                    nbytes=math.prod(sizes) * td.properties.itemsize,
                    source=data.sources[(fqn, offsets)],
                    rank=rank if per_rank else None,
                    global_shape=td.size,
                    address=data.addresses.get((fqn, offsets)),
                )
            )
        jobs.append(FileJob(fa.name, tuple(entries)))
    return jobs


# -------------------------------------------------------------------- commit


def assemble_metadata(results: Sequence[RankResult], tree: Any) -> Metadata:
    """The checkpoint's metadata from every rank's report (coordinator only)."""
    world = len(results)
    files: dict[str, FileRecord] = {}
    props: dict[str, tuple[str, tuple[int, ...]]] = {}
    chunks: dict[str, list[ChunkRecord]] = {}
    per_rank_tensors: set[str] = set()
    for rank, result in enumerate(results):
        for wf in result.files:
            files[wf.name] = FileRecord(rank, wf.size, wf.header_length, wf.header_checksum)
            for c in wf.chunks:
                props.setdefault(c.fqn, (c.dtype, c.global_shape))
                chunks.setdefault(c.fqn, []).append(
                    ChunkRecord(
                        c.offsets, c.sizes, wf.name, c.name, c.byte_offset, c.byte_length, c.checksums, c.rank
                    )
                )
                if c.rank is not None:
                    per_rank_tensors.add(c.fqn)
    tensors = {
        fqn: TensorRecord(
            dtype_name=props[fqn][0],
            shape=props[fqn][1],
            chunks=tuple(sorted(cs, key=lambda c: (c.rank or 0, c.offsets))),
            per_rank=fqn in per_rank_tensors,
        )
        for fqn, cs in chunks.items()
    }
    values = _merge_values([r.values for r in results], world)
    pickled = any(_is_pickled(v) for v in values.values())
    return Metadata(
        tensors=tensors,
        values=values,
        files=files,
        tree=tree,
        world_size=world,
        block_size=BLOCK_SIZE,
        pickled=pickled,
    )


def commit_checkpoint(
    storage: Storage,
    location: str,
    token: str,
    results: Sequence[RankResult],
    tree: Any,
) -> Metadata:
    """Coordinator only: metadata from every rank's report, written last, committing the checkpoint."""
    # The token makes every save's metadata.json unique, how a load proves it read one save.
    md = dataclasses.replace(assemble_metadata(results, tree), token=token)
    storage.commit(location, token, encode_metadata(md))
    return md


def _merge_values(by_rank: Sequence[Mapping[str, Any]], world: int) -> dict[str, ValueRecord]:
    """One record per key; keys whose value differs between ranks keep each rank's own."""
    encoded: dict[str, dict[int, str]] = {}
    raw: dict[str, dict[int, Any]] = {}
    for rank, vals in enumerate(by_rank):
        for fqn, enc in vals.items():
            encoded.setdefault(fqn, {})[rank] = json.dumps(enc, sort_keys=True)
            raw.setdefault(fqn, {})[rank] = enc
    out: dict[str, ValueRecord] = {}
    for fqn, per in encoded.items():
        if len(set(per.values())) == 1:
            out[fqn] = ValueRecord(value=next(iter(raw[fqn].values())))
        else:
            slots = [raw[fqn].get(r, ABSENT) for r in range(world)]
            out[fqn] = ValueRecord(per_rank=tuple(slots))
    return out


def _is_pickled(v: ValueRecord) -> bool:
    candidates = v.per_rank if v.per_rank is not None else (v.value,)
    return any(isinstance(x, dict) and "$pickle" in x for x in candidates)


# ------------------------------------------------ the steps both paths run


def plan_together(
    comm: Comm, target: SaveTarget, plan: SavePlan, staged: StagedMask = None
) -> RankAssignment:
    """Collective: the coordinator plans from every rank's local plan and begins the save.

    The assignment carries the coordinator's token: it names the save from
    then on, on every rank. ``staged`` masks the items of ``plan`` this rank
    staged (None: all), which alone it may be given to write.
    """

    def make(gathered: list[tuple[SavePlan, StagedMask]]) -> list[RankAssignment]:
        fail_point("plan", comm.rank, target.save_id)
        plans = [p for p, _ in gathered]
        masks = [m for _, m in gathered]
        out = plan_assignments(
            plans, target.token, target.storage, None if all(m is None for m in masks) else masks
        )
        target.storage.begin_save(target.location, target.token)
        return out

    return coordinate(comm, "save planning", (plan, staged), make)  # type: ignore[no-any-return]


async def write_assignment(
    rank: int, target: SaveTarget, assignment: RankAssignment, data: RankData
) -> list[WrittenFile]:
    """This rank's shard files, written and durable (local: not collective)."""
    fail_point("write_jobs", rank, target.save_id)
    jobs = write_jobs(assignment, data, rank)
    return await write_files(target.storage, target.location, assignment.token, jobs, block_size=BLOCK_SIZE)


def commit_reports(rank: int, target: SaveTarget, results: Sequence[RankResult], tree: Any) -> Metadata:
    """Coordinator only: commit the checkpoint from every rank's report."""
    fail_point("commit", rank, target.save_id)
    return commit_checkpoint(target.storage, target.location, target.token, results, tree)


def commit_together(comm: Comm, target: SaveTarget, result: RankResult, tree: Any) -> Metadata:
    """Collective: every rank's report to the coordinator, which commits; its metadata on every rank."""

    def commit(results: list[RankResult]) -> list[Metadata]:
        return [commit_reports(comm.rank, target, results, tree)] * len(results)

    return coordinate(comm, "commit", result, commit)  # type: ignore[no-any-return]


@contextmanager
def aborting_on_failure(comm: Comm, target: SaveTarget) -> Iterator[None]:
    """A step that fails on any rank fails here on every rank: the coordinator removes the staging area."""
    try:
        yield
    except BaseException:
        if comm.rank == 0:
            target.storage.abort_save(target.location, target.token)
        raise


# ------------------------------------------------------------ the whole flow


def save_collective(
    comm: Comm,
    storage: Storage,
    location: str,
    local: RankData,
    tree: Any,
    options: SaveOptions,
    *,
    stage_s: float = 0.0,
) -> Metadata:
    """Plan, write and commit, every step collective over ``comm``.

    ``options`` were applied when ``local`` was built (pickling, replica
    checks); none of them changes a step from here on.
    """
    t0 = time.perf_counter()
    target = SaveTarget(storage, location, uuid.uuid4().hex[:16])
    assignment = plan_together(comm, target, local.plan)
    # Only the coordinator's token was used: from here on every rank names the save by it.
    target = dataclasses.replace(target, token=assignment.token)
    t1 = time.perf_counter()
    with aborting_on_failure(comm, target):

        def write() -> list[WrittenFile]:
            # Everything between planning and the commit runs inside a collective step:
            # a rank failing outside one would leave the others waiting in the next.
            return run_blocking(write_assignment(comm.rank, target, assignment, local))

        written = run_collectively(comm, "writing shards", write)
        t2 = time.perf_counter()
        md = commit_together(comm, target, RankResult(written, local.values), tree)
    stats = SaveStats(
        stage_s=stage_s,
        plan_s=t1 - t0,
        write_s=t2 - t1,
        commit_s=time.perf_counter() - t2,
        bytes_written=sum(f.size for f in written),
        bytes_copied=sum(f.copied for f in written),
    )
    return with_stats(md, stats)


def with_stats(md: Metadata, stats: SaveStats) -> Metadata:
    return dataclasses.replace(md, stats=stats)
