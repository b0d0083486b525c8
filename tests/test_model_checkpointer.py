"""A stateful model test of ``AsyncCheckpointer`` (hypothesis ``RuleBasedStateMachine``).

Random sequences of saves (``save``, overlap mode, ``async_save`` on an event
loop the machine owns, bursts over many layouts), awaits that time out or are
cancelled, mutations after staging, loads, SIGKILLed workers and closes, checked
against a model of what each path should hold:

* every pending resolves exactly once: successfully, or with a ``CheckpointError``
  only when a worker was killed after the save was made; never cancelled by
  an awaiter giving up, never anything else (every save here is valid);
* a successful save is on disk bit-exact with the values at its call (later
  saves to the same path supersede it); a save that died leaves the previous
  checkpoint, nothing, or itself (the kill may land after the commit);
* ``close()`` resolves every save made before it;
* nothing leaks: child processes, descriptors, memfds, ``/dev/shm`` entries,
  and the library logs no error.

CI runs a bounded, derandomised search; ``ASYNC_CKPT_MODEL_EXAMPLES=500`` (and
``ASYNC_CKPT_MODEL_STEPS``) run a longer one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import shutil
import signal
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _model_support import (
    N_LAYOUTS,
    ErrorLog,
    children,
    clone,
    fd_targets,
    make_state,
    match_on_disk,
    memfds,
    mutate,
    settle,
    shm_entries,
)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import async_ckpt as ac

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("ASYNC_CKPT_MODEL_EXAMPLES", "12"))
STEPS = int(os.environ.get("ASYNC_CKPT_MODEL_STEPS", "20"))
RESOLVE_S = 60.0
MAX_RESTARTS = 2
"""Kills plus closes per example: each costs a worker start (seconds)."""

PATHS = ("a", "b", "c")
layouts = st.integers(0, N_LAYOUTS - 1)
paths = st.sampled_from(PATHS)


@dataclass(eq=False)
class Save:
    pending: ac.PendingCheckpoint
    path: str
    want: dict[str, Any]
    kills_before: int
    how: str
    generation: int
    callbacks: list[int] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"<{self.how} save {self.pending.save_id} of checkpointer {self.generation} to {self.path}>"


class CheckpointerModel(RuleBasedStateMachine):
    saves_b = Bundle("saves")

    def __init__(self) -> None:
        super().__init__()
        self.fds0 = fd_targets()
        self.memfds0 = len(memfds())
        self.shm0 = shm_entries()
        self.children0 = children()
        self.errors = ErrorLog()
        logging.getLogger("async_ckpt").addHandler(self.errors)
        self.root = Path(tempfile.mkdtemp(prefix="ac-model-"))
        self.loop = asyncio.new_event_loop()
        self.ck: ac.AsyncCheckpointer | None = None
        self.max_in_flight = 1
        self.states: dict[int, dict[str, Any]] = {}
        self.saves: list[Save] = []
        self.applied: dict[str, int] = dict.fromkeys(PATHS, 0)
        """How many of each path's saves (in call order) the candidates account for."""
        self.candidates: dict[str, list[dict[str, Any] | None]] = {p: [None] for p in PATHS}
        self.kills = 0
        self.restarts = 0
        self.generation = 0
        """How many checkpointers this run closed (save ids restart in each)."""

    # ------------------------------------------------------------ helpers

    def _state(self, layout: int) -> dict[str, Any]:
        if layout not in self.states:
            self.states[layout] = make_state(layout, seed=len(self.states))
        return self.states[layout]

    def _track(self, pending: ac.PendingCheckpoint, path: str, want: dict[str, Any], how: str) -> Save:
        s = Save(pending, path, want, self.kills, how, self.generation)
        pending.add_done_callback(lambda _: s.callbacks.append(1))
        self.saves.append(s)
        return s

    def _outcome(self, s: Save, timeout: float = RESOLVE_S) -> str:
        """'ok' or 'died' (a legitimate failure); anything else fails the test."""
        try:
            exc = s.pending.exception(timeout)
        except concurrent.futures.CancelledError:
            raise AssertionError(
                f"{s} was cancelled (an awaiter giving up must not cancel the save)"
            ) from None
        except concurrent.futures.TimeoutError:
            raise AssertionError(f"{s} did not resolve within {timeout:.0f}s") from None
        assert len(s.callbacks) <= 1, f"{s}: done callbacks ran {len(s.callbacks)} times"
        if exc is None:
            assert isinstance(s.pending.result(0), ac.Metadata)
            assert s.pending.staged.done() and s.pending.staged.wait(0) >= 0, f"{s} committed, staging failed"
            return "ok"
        # The documented contract is a CheckpointError; WorkerDiedError is the usual one.
        if isinstance(exc, ac.CheckpointError) and self.kills > s.kills_before:
            return "died"
        raise AssertionError(f"{s} failed though no worker was killed after it: {exc!r}") from exc

    def _check_path(self, path: str) -> None:
        """Account for every save to ``path`` (waiting for them), then compare the disk."""
        mine = [s for s in self.saves if s.path == path]
        cands = self.candidates[path]
        for s in mine[self.applied[path] :]:
            if self._outcome(s) == "ok":
                cands = [s.want]
            else:
                cands = [*cands, *([] if None in cands else [None]), s.want]
        self.applied[path] = len(mine)
        found, why = match_on_disk(self.root / path, cands)
        assert found is not None, f"{path} after {mine}: {why}"
        self.candidates[path] = [cands[found]]

    def _open(self) -> None:
        # Neither niced nor idle: on a saturated CI machine such a worker makes every await slow.
        self.ck = ac.AsyncCheckpointer(
            max_in_flight=self.max_in_flight, start=True, timeout=RESOLVE_S, worker_nice=0, worker_idle=False
        )

    @property
    def _ck(self) -> ac.AsyncCheckpointer:
        assert self.ck is not None
        return self.ck

    # ------------------------------------------------------------- rules

    @initialize(max_in_flight=st.integers(1, 2))
    def open(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._open()

    @rule(target=saves_b, layout=layouts, path=paths, overlap=st.booleans())
    def save(self, layout: int, path: str, overlap: bool) -> Save:
        sd = self._state(layout)
        want = clone(sd)
        pending = self._ck.save(sd, self.root / path, overlap=overlap)
        return self._track(pending, path, want, "overlap" if overlap else "sync")

    @rule(target=saves_b, layout=layouts, path=paths, overlap=st.booleans())
    def async_save(self, layout: int, path: str, overlap: bool) -> Save:
        sd = self._state(layout)
        want = clone(sd)
        pending = self.loop.run_until_complete(self._ck.async_save(sd, self.root / path, overlap=overlap))
        return self._track(pending, path, want, "async-overlap" if overlap else "async")

    @rule(target=saves_b, batch=st.lists(st.tuples(layouts, paths), min_size=2, max_size=10))
    def save_burst(self, batch: list[tuple[int, str]]) -> Any:
        """Several saves in a row, most in new layouts: the caches on both sides churn."""
        out = []
        for layout, path in batch:
            sd = self._state(layout)
            want = clone(sd)
            out.append(self._track(self._ck.save(sd, self.root / path), path, want, "burst"))
        return multiple(*out)

    @rule(s=saves_b)
    def await_save(self, s: Save) -> None:
        try:
            self.loop.run_until_complete(asyncio.wait_for(s.pending, RESOLVE_S))
        except ac.CheckpointError:
            pass
        except asyncio.CancelledError:
            raise AssertionError(f"awaiting {s} raised CancelledError: the save was cancelled") from None
        self._outcome(s, 0)

    @rule(s=saves_b, staged=st.booleans())
    def await_with_tiny_timeout(self, s: Save, staged: bool) -> None:
        try:
            self.loop.run_until_complete(asyncio.wait_for(s.pending.staged if staged else s.pending, 0.001))
        except (TimeoutError, ac.CheckpointError):
            pass

    @rule(s=saves_b, staged=st.booleans())
    def cancel_awaiter(self, s: Save, staged: bool) -> None:
        async def wait() -> Any:
            return await (s.pending.staged if staged else s.pending)

        task = self.loop.create_task(wait())
        self.loop.run_until_complete(asyncio.sleep(0))
        task.cancel()
        try:
            self.loop.run_until_complete(task)
        except (asyncio.CancelledError, ac.CheckpointError):
            pass

    @rule()
    def mutate_after_staged(self) -> None:
        for s in self.saves:
            try:
                s.pending.staged.wait(RESOLVE_S)
            except ac.CheckpointError:
                pass  # judged by _outcome
            except concurrent.futures.CancelledError:
                raise AssertionError(f"{s}: staged was cancelled by an awaiter giving up") from None
        for sd in self.states.values():
            mutate(sd)

    @rule(path=paths)
    def load(self, path: str) -> None:
        self._check_path(path)

    @precondition(lambda self: self.restarts < MAX_RESTARTS)
    @rule()
    def kill_worker(self) -> None:
        # Counted even when there is no worker to kill: what hypothesis draws next
        # must not depend on timing.
        self.restarts += 1
        self.kills += 1
        pid = self._ck.worker_pid
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        assert settle(lambda: self._ck.worker_pid != pid, RESOLVE_S), "the worker's death went unnoticed"

    @precondition(lambda self: self.restarts < MAX_RESTARTS)
    @rule()
    def close_and_reopen(self) -> None:
        self.restarts += 1
        ck = self._ck
        ck.close()
        self.generation += 1
        left = [s for s in self.saves if not s.pending.done()]
        assert not left, f"close() returned with saves unresolved: {left}"
        self._open()

    # ---------------------------------------------------------- teardown

    def teardown(self) -> None:
        try:
            if self.ck is not None:
                for path in PATHS:
                    self._check_path(path)
        finally:
            try:
                if self.ck is not None:
                    self.ck.close()
            finally:
                self.loop.close()
                logging.getLogger("async_ckpt").removeHandler(self.errors)
                shutil.rmtree(self.root, ignore_errors=True)
        self._check_leaks()

    def _check_leaks(self) -> None:
        # Dropped first: a failed save's traceback may hold objects that own descriptors.
        self.saves.clear()
        gc.collect()
        new_children = lambda: children() - self.children0  # noqa: E731
        assert settle(lambda: not new_children()), f"child processes left: {new_children()}"
        assert settle(lambda: len(memfds()) <= self.memfds0), f"memfds left open: {memfds()}"
        assert settle(lambda: len(fd_targets()) <= len(self.fds0)), (
            f"descriptors left open: {sorted((Counter(fd_targets()) - Counter(self.fds0)).elements())}"
        )
        ours = sorted(n for n in shm_entries() - self.shm0 if "async_ckpt" in n or str(os.getpid()) in n)
        assert not ours, f"/dev/shm entries left: {ours}"
        assert not self.errors.records, "the library logged errors:\n" + "\n".join(self.errors.records)


@pytest.mark.timeout(max(900, EXAMPLES * 60))
def test_checkpointer_matches_its_model() -> None:
    run_state_machine_as_test(
        CheckpointerModel,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
