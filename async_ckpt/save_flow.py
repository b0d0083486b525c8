"""One collective save: local plans -> global plan -> shard writes -> metadata -> commit.

Every step runs on all ranks of a ``Comm``. A failure on any rank is carried
to every rank before the next collective, so no rank is left waiting; the
coordinator (rank 0) then removes the staging area. Used in-process by the
blocking ``save`` and, over the workers' own comm, by the background workers.
"""

from __future__ import annotations

import heapq
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

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
from .format.shard import chunk_name
from .local_plan import LocalPlan, tensor_bytes
from .planning import SavePlan, WriteItemType, create_global_plan
from .storage.base import Storage
from .worker.loop import run_blocking
from .worker.pipeline import FileJob, WriteEntry, WrittenFile, write_files

__all__ = ["ABSENT", "RankAssignment", "SaveOptions", "assign_files", "coordinate", "save_collective"]

ABSENT = {"$absent": True}
"""Per-rank value slot of a rank that did not hold the key."""

_MIN_FILE_BYTES = 64 << 20

Key = tuple[str, tuple[int, ...] | None]


@dataclass(frozen=True, slots=True)
class SaveOptions:
    allow_pickle: bool = False
    verify_replicas: bool = False
    block_size: int = checksum.DEFAULT_BLOCK_SIZE
    max_files_per_rank: int = 4
    dedup: str = "balanced"


@dataclass(frozen=True, slots=True)
class FileAssignment:
    name: str
    items: tuple[tuple[str, tuple[int, ...], bool], ...]
    """(fqn, offsets, per_rank) of each chunk, in file order."""


@dataclass(frozen=True, slots=True)
class RankAssignment:
    """What the coordinator tells one rank to do."""

    token: str
    files: tuple[FileAssignment, ...]
    owned_values: frozenset[str]
    per_rank_values: frozenset[str] = field(default_factory=frozenset)


def coordinate(comm: Comm, step: str, payload: Any, fn: Callable[[list[Any]], Sequence[Any]]) -> Any:
    """Gather ``payload``, run ``fn`` on the coordinator, hand rank r its ``fn(...)[r]``."""
    gathered = comm.gather(payload)
    outputs: Sequence[Any] | None = None
    error: BaseException | None = None
    failure: RankFailure | None = None
    if comm.rank == 0:
        assert gathered is not None
        try:
            outputs = fn(gathered)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below
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


def assign_files(plan: SavePlan, rank: int, per_rank: frozenset[str], max_files: int) -> tuple[FileAssignment, ...]:
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
        chosen = sorted(members[k])
        files.append(
            FileAssignment(
                name=f"shard-r{rank:05d}-{k:02d}.safetensors",
                items=tuple(
                    (items[i].index.fqn, items[i].index.offset or (), items[i].index.fqn in per_rank)
                    for i in chosen
                ),
            )
        )
    return tuple(files)


def save_collective(
    comm: Comm,
    storage: Storage,
    location: str,
    local: LocalPlan,
    tree: Any,
    options: SaveOptions,
    *,
    stage_s: float = 0.0,
    sources: Mapping[Key, Callable[[], memoryview]] | None = None,
) -> Metadata:
    """Plan, write and commit. ``sources`` overrides where each chunk's bytes come from."""
    t0 = time.perf_counter()
    plans_box: dict[str, list[SavePlan]] = {}  # the coordinator keeps the plans for commit

    def plan_globally(plans: list[SavePlan]) -> list[RankAssignment]:
        plans_box["plans"] = plans
        gp = create_global_plan(plans, dedup=options.dedup)
        token = uuid.uuid4().hex[:16]
        out = []
        for rank, p in enumerate(gp.plans):
            owned = frozenset(it.index.fqn for it in p.items if it.type is WriteItemType.BYTE_IO)
            out.append(
                RankAssignment(
                    token=token,
                    files=assign_files(p, rank, gp.per_rank_fqns, options.max_files_per_rank),
                    owned_values=owned,
                    per_rank_values=gp.per_rank_fqns,
                )
            )
        storage.begin_save(location, token)
        return out

    assignment: RankAssignment = coordinate(comm, "save planning", local.plan, plan_globally)
    t1 = time.perf_counter()
    try:
        written = run_collectively(
            comm, "writing shards", lambda: _write(storage, location, assignment, local, options, sources, comm.rank)
        )
        t2 = time.perf_counter()
        values = {fqn: local.values[fqn] for fqn in assignment.owned_values}
        payload = (written, values)

        def commit(results: list[tuple[list[WrittenFile], dict[str, Any]]]) -> list[Metadata]:
            md = _assemble(results, plans_box["plans"], assignment, tree, options, comm.world_size)
            storage.commit(location, assignment.token, encode_metadata(md))
            return [md] * comm.world_size

        md: Metadata = coordinate(comm, "commit", payload, commit)
    except BaseException:
        if comm.rank == 0:
            storage.abort_save(location, assignment.token)
        raise
    t3 = time.perf_counter()
    stats = SaveStats(
        stage_s=stage_s,
        plan_s=t1 - t0,
        write_s=t2 - t1,
        commit_s=t3 - t2,
        bytes_written=sum(f.size for f in written),
    )
    return Metadata(
        tensors=md.tensors, values=md.values, files=md.files, tree=md.tree,
        world_size=md.world_size, block_size=md.block_size, pickled=md.pickled, stats=stats,
    )


def _write(
    storage: Storage,
    location: str,
    assignment: RankAssignment,
    local: LocalPlan,
    options: SaveOptions,
    sources: Mapping[Key, Callable[[], memoryview]] | None,
    rank: int,
) -> list[WrittenFile]:
    shapes = {
        it.index.fqn: it.tensor_data.size for it in local.plan.items if it.tensor_data is not None
    }
    jobs = []
    for fa in assignment.files:
        entries = []
        for fqn, offsets, per_rank in fa.items:
            tensor = local.tensors[(fqn, offsets)]
            sizes = tuple(tensor.shape)
            whole = shapes[fqn] == sizes and not any(offsets)
            src = sources[(fqn, offsets)] if sources is not None else _lazy_bytes(tensor)
            entries.append(
                WriteEntry(
                    fqn=fqn, offsets=offsets, sizes=sizes, dtype=tensor.dtype,
                    name=chunk_name(fqn, offsets, whole, rank if per_rank else None),
                    nbytes=tensor.numel() * tensor.element_size(), source=src,
                    rank=rank if per_rank else None,
                )
            )
        jobs.append(FileJob(fa.name, tuple(entries)))
    return run_blocking(
        write_files(storage, location, assignment.token, jobs, block_size=options.block_size)
    )


def _lazy_bytes(tensor: torch.Tensor) -> Callable[[], memoryview]:
    return lambda: tensor_bytes(tensor)


def _assemble(
    results: list[tuple[list[WrittenFile], dict[str, Any]]],
    plans: list[SavePlan],
    assignment: RankAssignment,
    tree: Any,
    options: SaveOptions,
    world: int,
) -> Metadata:
    props: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for plan in plans:
        for it in plan.items:
            if it.tensor_data is not None and it.index.fqn not in props:
                props[it.index.fqn] = (it.tensor_data.dtype, it.tensor_data.size)
    files: dict[str, FileRecord] = {}
    chunks: dict[str, list[ChunkRecord]] = {fqn: [] for fqn in props}
    values: dict[str, ValueRecord] = {}
    per_rank_values: dict[str, list[Any]] = {}
    for rank, (written, owned) in enumerate(results):
        for wf in written:
            files[wf.name] = FileRecord(rank, wf.size, wf.header_length, wf.header_checksum)
            for c in wf.chunks:
                chunks[c.fqn].append(
                    ChunkRecord(c.offsets, c.sizes, wf.name, c.name, c.byte_offset, c.byte_length, c.checksums, c.rank)
                )
        for fqn, enc in owned.items():
            if fqn in assignment.per_rank_values:
                per_rank_values.setdefault(fqn, [ABSENT] * world)[rank] = enc
            else:
                values[fqn] = ValueRecord(value=enc)
    for fqn, slots in per_rank_values.items():
        values[fqn] = ValueRecord(per_rank=tuple(slots))
    tensors = {
        fqn: TensorRecord(
            dtype=props[fqn][0],
            shape=props[fqn][1],
            chunks=tuple(sorted(cs, key=lambda c: (c.rank or 0, c.offsets))),
            per_rank=fqn in assignment.per_rank_values,
        )
        for fqn, cs in chunks.items()
    }
    pickled = any(isinstance(v.value, dict) and "$pickle" in v.value for v in values.values()) or any(
        isinstance(x, dict) and "$pickle" in x for v in values.values() for x in (v.per_rank or ())
    )
    return Metadata(
        tensors=tensors, values=values, files=files, tree=tree,
        world_size=world, block_size=options.block_size, pickled=pickled,
    )
