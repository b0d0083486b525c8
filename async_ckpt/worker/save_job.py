"""One save as the workers run it, with plan caching.

Steady state (layout unchanged since a plan was made): every worker writes
with its cached assignment straight away, then the commit barrier gathers the
reports; the coordinator commits only if every rank used the same cached plan.
Otherwise (first save, a changed layout, a restarted worker) the coordinator
discards what was written and all ranks plan together, write and commit:

    cached?  --yes--> write --> commit barrier --same plan everywhere--> commit
       |                              |
       no (write nothing)             +--any rank without it--> plan --> write --> commit
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import mmap
import time
import traceback
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._faults import kill_point
from ..buffer_layout import BufferSpec
from ..dist import Comm, RankFailure, RanksFailedError, run_collectively
from ..format.metadata import Metadata, SaveStats
from ..planning import SavePlan
from ..save_flow import (
    FileAssignment,
    RankAssignment,
    RankData,
    RankResult,
    SaveTarget,
    aborting_on_failure,
    commit_reports,
    commit_together,
    coordinate,
    plan_together,
    with_stats,
    write_assignment,
)
from ..writer.pipeline import WrittenFile
from .messages import Round, RoundsAbort, SaveRequest
from .rounds import PlanCache, mixed_budgets, run_rounds
from .staged_keys import Key, file_keys, stage_only_keys, staged_mask, subset_layout_key
from .views import view_addresses, view_sources

__all__ = ["SaveJobRunner"]

log = logging.getLogger("async_ckpt.worker")
_CACHE_SIZE = 8
"""Assignments kept: each layout's, and its staged subset's (replica-sharded staging)."""


@dataclass(frozen=True, slots=True)
class _Report:
    plan_id: str | None
    result: RankResult | None
    failure: RankFailure | None


@dataclass(frozen=True, slots=True)
class _Cached:
    plan_id: str
    files: tuple[FileAssignment, ...]
    stage_only: tuple[Key, ...] | None
    """What to tell the trainer to stage next time, None when it staged just that."""


class SaveJobRunner:
    def __init__(self, comm: Comm, session: str) -> None:
        self.comm = comm
        self.session = session
        # Keyed by the staged layout: a reused assignment only names items this rank staged.
        self._cache: OrderedDict[tuple[str, Any], _Cached] = OrderedDict()
        self._round_plans: PlanCache = OrderedDict()
        """Budgeted saves' plans (``rounds.py``), per layout id: reused where this rank staged their items."""
        self.stage_only: tuple[Key, ...] | None = None
        """After a successful ``run`` or ``run_rounds``: the tensor items the trainer should stage
        from now on, if not what it staged for this save (replica-sharded staging)."""

    async def run(
        self,
        req: SaveRequest,
        plan: SavePlan,
        tree: Any,
        specs: Mapping[Key, BufferSpec],
        views: Mapping[Key, memoryview],
    ) -> Metadata:
        """Save the items staged in a slot: ``specs`` says where each lies, ``views`` holds its bytes."""
        comm = self.comm
        comm.begin(f"save{req.save_id}")
        target = SaveTarget(req.storage, req.location, f"{self.session}{req.save_id:08x}", req.save_id)
        local = RankData(plan, view_sources(views), req.values, view_addresses(views))
        cache_key = (req.layout_key, req.options)
        cached = None if req.options.verify_replicas else self._cache.get(cache_key)
        if cached is not None and not all(k in views for fa in cached.files for k in file_keys(fa)):
            cached = None  # never write what was not staged
        self.stage_only = None
        t0 = time.perf_counter()
        report = _Report(None, None, None)
        if cached is not None:
            plan_id, files = cached.plan_id, cached.files
            try:
                req.storage.begin_save(req.location, target.token)
                written = await self._write(target, RankAssignment(target.token, files), local)
                report = _Report(plan_id, RankResult(written, req.values), None)
            except Exception as exc:  # noqa: BLE001 - reported at the commit barrier
                report = _Report(plan_id, None, _failure(comm.rank, exc))
        t1 = time.perf_counter()
        if cached is not None:
            kill_point("before_commit", req.save_id, comm.rank)
        outcome = await asyncio.to_thread(self._commit_or_replan, target, tree, report)
        if isinstance(outcome, Metadata):
            assert cached is not None
            self.stage_only = cached.stage_only
            kill_point("after_commit", req.save_id, comm.rank)
            done = report.result.files if report.result else []
            stats = self._stats(req, specs, 0.0, t1 - t0, time.perf_counter() - t1, done, True)
            return with_stats(outcome, stats)
        # Plan together, then write and commit.
        t2 = time.perf_counter()
        kill_point("plan", req.save_id, comm.rank)
        assignment = await asyncio.to_thread(plan_together, comm, target, plan, staged_mask(plan, views))
        # The coordinator's token, as the blocking save does: here every rank's is the same.
        target = dataclasses.replace(target, token=assignment.token)
        stage_only = stage_only_keys(assignment, views)
        self._remember(cache_key, _Cached(target.token, assignment.files, stage_only))
        if stage_only is not None and assignment.preferred is None:
            # The trainer's next save stages just these items, under a layout key of their
            # own: the same assignment serves it, so that save needs no planning round.
            reduced = subset_layout_key(specs, stage_only)
            if reduced is not None:
                self._remember((reduced, req.options), _Cached(target.token, assignment.files, None))
        t3 = time.perf_counter()
        written = await self._write_collectively(target, assignment, local)
        t4 = time.perf_counter()
        kill_point("before_commit", req.save_id, comm.rank)
        md = await asyncio.to_thread(self._commit, target, tree, RankResult(written, req.values))
        kill_point("after_commit", req.save_id, comm.rank)
        self.stage_only = stage_only
        stats = self._stats(req, specs, t3 - t2, t4 - t3, time.perf_counter() - t4, written, False)
        return with_stats(md, stats)

    async def run_rounds(
        self,
        req: SaveRequest,
        plan: SavePlan,
        tree: Any,
        maps: Sequence[mmap.mmap],
        next_round: Callable[[], Awaitable[Round | RoundsAbort | None]],
        reply: Callable[[Any], None],
        staged: Sequence[Key] | None = None,
    ) -> Metadata:
        """A budgeted save, its plan agreed before the first round is written (``rounds.py``).

        ``staged``: the items the rounds carry, None when all; ``stage_only`` as for ``run``.
        """
        self.stage_only = None
        md, stage_only = await run_rounds(
            self.comm,
            self.session,
            self._round_plans,
            _CACHE_SIZE,
            req,
            plan,
            tree,
            maps,
            next_round,
            reply,
            staged,
        )
        self.stage_only = stage_only
        return md

    def _remember(self, key: tuple[str, Any], entry: _Cached) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)

    async def fail(self, save_id: int, error: str) -> None:
        """Take part in a save this rank could not prepare, reporting the error at the barrier."""
        self.comm.begin(f"save{save_id}")
        report = _Report(None, None, RankFailure(self.comm.rank, error, ""))

        def decide(reports: list[_Report]) -> list[Any]:
            _refuse_mixed_budgets(reports)
            raise RanksFailedError("preparing the state dict", [r.failure for r in reports if r.failure])

        await asyncio.to_thread(coordinate, self.comm, "commit", report, decide)

    # ------------------------------------------------------------ the steps

    async def _write(
        self, target: SaveTarget, assignment: RankAssignment, local: RankData
    ) -> list[WrittenFile]:
        written = await write_assignment(self.comm.rank, target, assignment, local)
        assert target.save_id is not None
        kill_point("write", target.save_id, self.comm.rank)
        return written

    async def _write_collectively(
        self, target: SaveTarget, assignment: RankAssignment, local: RankData
    ) -> list[WrittenFile]:
        error: BaseException | None = None
        written: list[WrittenFile] = []
        try:
            written = await self._write(target, assignment, local)
        except Exception as exc:  # noqa: BLE001 - shared with every rank below
            error = exc

        def agree() -> list[WrittenFile]:
            if error is not None:
                raise error
            return written

        with aborting_on_failure(self.comm, target):
            return await asyncio.to_thread(run_collectively, self.comm, "writing shards", agree)

    def _commit_or_replan(self, target: SaveTarget, tree: Any, report: _Report) -> Metadata | str:
        def decide(reports: list[_Report]) -> list[Metadata | str]:
            _refuse_mixed_budgets(reports)
            failed = [r.failure for r in reports if r.failure is not None]
            if failed:
                target.storage.abort_save(target.location, target.token)
                raise RanksFailedError("save", failed)
            plan_ids = {r.plan_id for r in reports}
            if None in plan_ids or len(plan_ids) != 1:
                target.storage.abort_save(target.location, target.token)
                return ["replan"] * len(reports)
            results = [r.result for r in reports]
            assert all(r is not None for r in results)
            md = commit_reports(self.comm.rank, target, results, tree)  # type: ignore[arg-type]
            return [md] * len(reports)

        with aborting_on_failure(self.comm, target):
            return coordinate(self.comm, "commit", report, decide)  # type: ignore[no-any-return]

    def _commit(self, target: SaveTarget, tree: Any, result: RankResult) -> Metadata:
        with aborting_on_failure(self.comm, target):
            return commit_together(self.comm, target, result, tree)

    def _stats(
        self,
        req: SaveRequest,
        specs: Mapping[Key, BufferSpec],
        plan_s: float,
        write_s: float,
        commit_s: float,
        files: Sequence[WrittenFile],
        cached: bool,
    ) -> SaveStats:
        return SaveStats(
            stage_s=req.stage_s,
            plan_s=plan_s,
            write_s=write_s,
            commit_s=commit_s,
            bytes_written=sum(f.size for f in files),
            bytes_copied=sum(f.copied for f in files),
            plan_cached=cached,
            stall_s=req.stall_s,
            bytes_staged=sum(s.nbytes for s in specs.values()),
        )


def _refuse_mixed_budgets(reports: list[Any]) -> None:
    # A rank saving in rounds sends its plan id (rounds.py) where the others send a report.
    budgeted = [r for r, rep in enumerate(reports) if not isinstance(rep, _Report)]
    if budgeted:
        raise mixed_budgets(budgeted, len(reports))


def _failure(rank: int, exc: BaseException) -> RankFailure:
    return RankFailure(rank, f"{type(exc).__name__}: {exc}", "".join(traceback.format_exception(exc)))
