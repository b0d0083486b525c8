"""The few collectives a save or load needs, over whatever carries them.

``Comm`` is deliberately tiny: gather to the coordinator (rank 0), broadcast
from it, scatter from it. ``ProcessGroupComm`` runs them on a torch process
group (the blocking ``save``/``load``); the background workers use their own
store-backed implementation (``worker/comm.py``). Every comm also has a
``step`` (the name of the collective step under way, for its errors) and
``begin`` (a new key scope per save, where the comm has keys; a no-op
elsewhere). ``LocalComm`` is the
one-process case, with no torch.distributed at all, and the one-rank case
inside a job (``process_group=SINGLE_RANK``).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch.distributed as dist

    from .single_rank import ProcessGroupArg

# torch.distributed is imported where a process group is used, never at import
# time: the worker process uses this module's comms and failures without torch.

__all__ = [
    "Comm",
    "LocalComm",
    "ProcessGroupComm",
    "RankFailure",
    "RanksFailedError",
    "comm_for",
    "run_collectively",
]

T = TypeVar("T")


@runtime_checkable
class Comm(Protocol):
    rank: int
    world_size: int
    step: str
    """The collective step under way; a comm's timeout errors name it."""

    def begin(self, scope: str) -> None:
        """Start the collectives of one save (``scope`` is unique per save)."""
        ...

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on the coordinator (in rank order), ``None`` elsewhere."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """The coordinator's ``obj`` on every rank."""
        ...

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        """Rank r gets ``objs[r]`` from the coordinator."""
        ...


class LocalComm:
    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.step = "save"

    def begin(self, scope: str) -> None:
        pass

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        assert objs is not None
        return objs[0]


class ProcessGroupComm:
    """Object collectives on a torch.distributed group (gloo or any backend with CPU objects)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._root = dist.get_global_rank(group, 0) if group is not None else 0
        self.step = "save"

    def begin(self, scope: str) -> None:
        pass  # the process group orders its collectives itself

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        self._dist.gather_object(obj, out, dst=self._root, group=self.group)
        return out

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=self._root, group=self.group)
        return box[0]

    def scatter(self, objs: Sequence[Any] | None) -> Any:
        out: list[Any] = [None]
        self._dist.scatter_object_list(
            out, list(objs) if objs is not None else None, src=self._root, group=self.group
        )
        return out[0]


def comm_for(process_group: ProcessGroupArg) -> Comm:
    """The comm for a blocking call: the group given, the default group, or none (also for SINGLE_RANK)."""
    import torch.distributed as dist

    from .single_rank import SingleRank

    if isinstance(process_group, SingleRank):
        return LocalComm()
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return LocalComm()
    comm = ProcessGroupComm(process_group)
    return LocalComm() if comm.world_size == 1 else comm


@dataclass(frozen=True, slots=True)
class RankFailure:
    rank: int
    error: str
    traceback: str


class RanksFailedError(CheckpointError):
    """One or more ranks failed a collective step; carries each rank's error."""

    def __init__(self, step: str, failures: Sequence[RankFailure]) -> None:
        self.failures = list(failures)
        ranks = ", ".join(str(f.rank) for f in self.failures)
        detail = "\n".join(f"  rank {f.rank}: {f.error}" for f in self.failures)
        first_tb = self.failures[0].traceback if self.failures else ""
        super().__init__(
            f"{step} failed on rank(s) {ranks}:\n{detail}\n"
            f"--- traceback from rank {self.failures[0].rank} ---\n{first_tb}"
        )


def run_collectively(comm: Comm, step: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it fails anywhere, raise the same error everywhere.

    Without this, a rank that failed locally would leave the others waiting in
    the next collective until the process group times out.
    """
    result: T | None = None
    failure: RankFailure | None = None
    error: BaseException | None = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
        failure = RankFailure(comm.rank, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if comm.world_size == 1:
            raise
    if comm.world_size > 1:
        comm.step = step
        try:
            statuses = comm.gather(failure)
        except Exception as exc:
            if comm.rank != 0:
                raise
            statuses = [RankFailure(0, f"{type(exc).__name__}: {exc}", traceback.format_exc())]
        failures = comm.broadcast([f for f in statuses if f is not None] if statuses is not None else None)
        if failures:
            # The failing rank keeps its own exception type (a TypeError stays one).
            if error is not None:
                raise error
            raise RanksFailedError(step, failures)
    return result  # type: ignore[return-value]
