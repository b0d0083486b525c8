"""A budgeted save on the worker: the plan agreed first, then each staged round written as it comes.

A round's bytes are overwritten by a later round once written, so nothing can
be rewritten after a failed check at the commit barrier, as an unbudgeted
save with a cached plan may be (``save_job.py``). Hence the order:

    RoundsBegin --> agree: every rank has the same cached plan? --yes--> begin the save
                           |                                     no --> plan together
                                                                        (with what each rank staged)
    each Round k --> write its shard files (durable) --> RoundWritten(k)   (up to as many
                     rounds at once as the buffer has pieces: the trainer's waits bound it)
    after the last round is written: Released --> commit barrier: any rank's failure
    aborts the save on every rank, else commit

Ranks may have different numbers of rounds: the only collectives are the
agreement and the commit. A rank whose round fails (or whose trainer sends
``RoundsAbort``, or stops the worker) writes no more and goes straight to the
commit barrier with its failure; the others fail there once they have written
their rounds, and the coordinator removes the staging area. Each round's files
are named ``shard-r<rank>-round<k>-<i>``, so the files a rank writes are
distinct across rounds; fault points ``write_round<k>``
(``_faults``: fail before writing round k, kill after) test it.

Replica-sharded staging (``save_job.py`` for the unbudgeted path): after a
layout's first save the trainer stages only the items its rank wrote, and
``RoundsBegin.staged`` names them. The plan cache is keyed by the layout id,
the same whether a save stages everything or a share; a cached assignment is
reused only if it gives this rank nothing outside what it staged, else the
ranks plan together, each with a mask of what it staged. After the commit,
``StageOnly`` tells the trainer what this rank writes when that is not what it
staged. A rank whose rounds lack an item the plan gives it fails the save,
naming the item, instead of leaving it out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .._faults import fail_point, kill_point
from ..dist import Comm, RankFailure, RanksFailedError
from ..errors import CheckpointError
from ..format.metadata import Metadata, SaveStats
from ..format.shard import shard_file_name
from ..planning import SavePlan
from ..planning.staged import StagedMask
from ..save_flow import (
    FileAssignment,
    RankAssignment,
    RankData,
    RankResult,
    SaveTarget,
    aborting_on_failure,
    commit_reports,
    coordinate,
    plan_together,
    with_stats,
    write_assignment,
)
from ..writer.pipeline import WrittenFile
from .messages import Released, Round, RoundsAbort, RoundWritten, SaveRequest
from .staged_keys import Key, file_keys, plan_keys, stage_only_keys, staged_mask
from .views import byte_views, view_addresses, view_sources

__all__ = ["PlanCache", "mixed_budgets", "run_rounds"]

_MIN_FILE_BYTES = 4 << 20
"""A round goes to as many files as the plan gives the rank (written at once: one stream is slower),
but none smaller than this unless the round is."""

PlanCache = OrderedDict[tuple[str, Any], RankAssignment]
"""Per (layout id, options): the assignment last agreed, whose token is its plan id."""


class _RoundsStopped(RuntimeError):
    """The trainer sent no more rounds: it aborted the save, or stopped the worker."""


async def run_rounds(
    comm: Comm,
    session: str,
    cache: PlanCache,
    cache_size: int,
    req: SaveRequest,
    plan: SavePlan,
    tree: Any,
    maps: Sequence[mmap.mmap],
    next_round: Callable[[], Awaitable[Round | RoundsAbort | None]],
    reply: Callable[[Any], None],
    staged: Sequence[Key] | None = None,
) -> tuple[Metadata, tuple[Key, ...] | None]:
    """One budgeted save; ``next_round`` gives this save's next message (None: the worker is stopping).

    ``staged``: the tensor items the rounds carry, None when all of the plan's.
    Returns the metadata and what the trainer should stage from now on, None
    when it staged just that.
    """
    comm.begin(f"save{req.save_id}")
    target = SaveTarget(req.storage, req.location, f"{session}{req.save_id:08x}", req.save_id)
    cache_key = (req.layout_id, req.options)
    t0 = time.perf_counter()
    held = plan_keys(plan) if staged is None else frozenset(staged)
    cached = None if req.options.verify_replicas else cache.get(cache_key)
    if cached is not None and not all(k in held for fa in cached.files for k in file_keys(fa)):
        cached = None  # never write what was not staged
    mask = None if staged is None else staged_mask(plan, held)
    assignment, reused = await asyncio.to_thread(_agree, comm, target, plan, cached, mask)
    if not reused and not req.options.verify_replicas:
        cache[cache_key] = assignment
        cache.move_to_end(cache_key)
        while len(cache) > cache_size:
            cache.popitem(last=False)
    target = dataclasses.replace(target, token=assignment.token)
    t1 = time.perf_counter()
    written: list[WrittenFile] = []
    failure: RankFailure | None = None
    last: Round | None = None
    rounds = staged_bytes = 0
    carried: set[Key] = set()

    async def write_round(msg: Round) -> None:
        fail_point(f"write_round{msg.index}", comm.rank, req.save_id)
        views = byte_views(maps, msg.specs)
        local = RankData(plan, view_sources(views), req.values, view_addresses(views))
        files = _round_files(comm.rank, assignment, msg)
        written.extend(await write_assignment(comm.rank, target, files, local))
        kill_point(f"write_round{msg.index}", req.save_id, comm.rank)
        reply(RoundWritten(req.save_id, msg.index))

    try:
        # Rounds in different pieces of the buffer are written at once: one
        # round alone often has too few tensors to keep several streams busy.
        # The trainer bounds how many: it stages into a piece once its round is written.
        async with asyncio.TaskGroup() as group:
            while last is None or not last.last:
                msg = await next_round()
                if msg is None:
                    raise _RoundsStopped("the worker was stopped before the save's last round")
                if isinstance(msg, RoundsAbort):
                    raise _RoundsStopped(f"the trainer could not stage the save: {msg.error}")
                last = msg
                rounds += 1
                staged_bytes += sum(spec.nbytes for spec in msg.specs)
                carried.update(spec.key for spec in msg.specs)
                group.create_task(write_round(msg))
        _check_carried(comm.rank, req, assignment, carried)
    except Exception as exc:  # noqa: BLE001 - reported at the commit barrier, to every rank
        first = _first_cause(exc)
        failure = RankFailure(
            comm.rank, f"{type(first).__name__}: {first}", "".join(traceback.format_exception(first))
        )
    # The buffer is free before the commit: the trainer may stage its next save meanwhile.
    reply(Released(req.save_id))
    t2 = time.perf_counter()
    kill_point("before_commit", req.save_id, comm.rank)
    result = None if failure is not None else RankResult(written, req.values)
    md = await asyncio.to_thread(_commit, comm, target, tree, result, failure)
    kill_point("after_commit", req.save_id, comm.rank)
    stats = SaveStats(
        stage_s=last.stage_s if last is not None else 0.0,
        plan_s=t1 - t0,
        write_s=t2 - t1,
        commit_s=time.perf_counter() - t2,
        bytes_written=sum(f.size for f in written),
        bytes_copied=sum(f.copied for f in written),
        plan_cached=reused,
        stall_s=last.stall_s if last is not None else 0.0,
        bytes_staged=staged_bytes,
        rounds=rounds,
    )
    return with_stats(md, stats), stage_only_keys(assignment, held)


def _first_cause(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def mixed_budgets(budgeted: Sequence[int], world: int) -> CheckpointError:
    """The error for ranks that disagree on whether saves go in rounds: their workers' steps differ."""
    others = [r for r in range(world) if r not in budgeted]
    return CheckpointError(
        f"ranks {list(budgeted)} save in rounds (AsyncCheckpointer(staging_budget=...)) and ranks "
        f"{others} do not: set staging_budget on every rank of the group, or on none"
    )


def _check_carried(rank: int, req: SaveRequest, assignment: RankAssignment, carried: set[Key]) -> None:
    """Every item the plan gives this rank came in a round: else it would be missing from the checkpoint."""
    for fa in assignment.files:
        for fqn, offsets in file_keys(fa):
            if (fqn, offsets) not in carried:
                raise CheckpointError(
                    f"rank {rank}: {fqn!r} (offsets {offsets}) is planned for this rank's file "
                    f"{fa.name} of {req.location}, but no round of this save staged it"
                )


def _agree(
    comm: Comm,
    target: SaveTarget,
    plan: SavePlan,
    cached: RankAssignment | None,
    mask: StagedMask,
) -> tuple[RankAssignment, bool]:
    """Collective: the cached plan where every rank holds the same one, else a new plan; the save begun.

    ``mask``: which items of ``plan`` this rank staged (None: all), for planning afresh.
    """

    def decide(plan_ids: list[Any]) -> list[bool]:
        # A rank that could not prepare this save reports its failure here
        # instead (``SaveJobRunner.fail``, whose first collective lines up with this one).
        failed = [f for f in (getattr(p, "failure", None) for p in plan_ids) if f is not None]
        if failed:
            raise RanksFailedError("preparing the state dict", failed)
        # A rank without a budget sends its first report (SaveJobRunner.run) here, not a plan id.
        unbudgeted = [r for r, p in enumerate(plan_ids) if p is not None and not isinstance(p, str)]
        if unbudgeted:
            raise mixed_budgets([r for r in range(len(plan_ids)) if r not in unbudgeted], len(plan_ids))
        same = None not in plan_ids and len(set(plan_ids)) == 1
        if same:
            target.storage.begin_save(target.location, target.token)
        return [same] * len(plan_ids)

    with aborting_on_failure(comm, target):
        reuse = coordinate(comm, "save planning", cached.token if cached else None, decide)
    if reuse:
        assert cached is not None
        return RankAssignment(target.token, cached.files, cached.preferred), True
    return plan_together(comm, target, plan, mask), False


def _round_files(rank: int, assignment: RankAssignment, rnd: Round) -> RankAssignment:
    """The round's tensors that the plan gives this rank, in files of their own, in staging order.

    As many files as the plan's, of about equal size, so that as many streams
    write at once (one is slower: 32 MiB took 0.06-0.14 s alone here, four
    of them 0.19-0.25 s together).
    """
    planned = {(it[0], it[1]): it for fa in assignment.files for it in fa.items}
    items = [(planned[s.key], s.nbytes) for s in rnd.specs if s.key in planned]
    total = sum(n for _, n in items)
    count = max(1, min(len(assignment.files), len(items), -(-total // _MIN_FILE_BYTES)))
    groups: list[list[tuple[str, tuple[int, ...], bool]]] = [[]]
    done = 0
    for item, nbytes in items:
        if groups[-1] and len(groups) < count and done >= total * len(groups) / count:
            groups.append([])
        groups[-1].append(item)
        done += nbytes
    files = tuple(
        FileAssignment(shard_file_name(rank, k, round_index=rnd.index), tuple(g))
        for k, g in enumerate(groups)
        if g
    )
    return RankAssignment(assignment.token, files)


def _commit(
    comm: Comm, target: SaveTarget, tree: Any, result: RankResult | None, failure: RankFailure | None
) -> Metadata:
    """Collective: every rank's files or failure to the coordinator, which commits or aborts."""

    def decide(reports: list[tuple[RankResult | None, RankFailure | None]]) -> list[Metadata]:
        failed = [f for _, f in reports if f is not None]
        if failed:
            target.storage.abort_save(target.location, target.token)
            raise RanksFailedError("save", failed)
        results = [r for r, _ in reports if r is not None]
        return [commit_reports(comm.rank, target, results, tree)] * len(reports)

    with aborting_on_failure(comm, target):
        return coordinate(comm, "commit", (result, failure), decide)  # type: ignore[no-any-return]
