"""What the trainer and its worker say to each other over their pipe (small, picklable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..buffer_layout import BufferSpec, Layout
from ..format.metadata import Metadata
from ..planning import SavePlan
from ..save_options import SaveOptions
from ..storage.base import Storage

__all__ = [
    "DropLayout",
    "DropSlot",
    "Finished",
    "LocalFailure",
    "Ready",
    "RegisterLayout",
    "RegisterSlot",
    "Released",
    "Round",
    "RoundWritten",
    "RoundsAbort",
    "RoundsBegin",
    "SaveRequest",
    "Shutdown",
    "StageOnly",
    "WorkerConfig",
]


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    rank: int
    world_size: int
    store_host: str | None
    store_port: int | None
    store_prefix: str
    session: str
    timeout: float
    log_level: int
    nice: int = 15
    idle: bool = False
    """SCHED_IDLE and the idle I/O class, where the OS allows (``worker/priority.py``)."""
    store_secret: str | None = None
    """Presented to the workers' store before it serves us (``worker/kvstore.py``)."""


@dataclass(frozen=True, slots=True)
class Ready:
    pid: int


@dataclass(frozen=True, slots=True)
class RegisterSlot:
    """Followed on the pipe by one file descriptor per segment of ``layout``."""

    slot_id: int
    layout: Layout


@dataclass(frozen=True, slots=True)
class DropSlot:
    slot_id: int


@dataclass(frozen=True, slots=True)
class RegisterLayout:
    """A rank's local plan and container tree, sent once; saves then name it by ``layout_id``."""

    layout_id: str
    plan: SavePlan
    tree: Any


@dataclass(frozen=True, slots=True)
class DropLayout:
    """The trainer forgot this layout; so does the worker (the trainer alone decides which are kept)."""

    layout_id: str


@dataclass(frozen=True, slots=True)
class SaveRequest:
    save_id: int
    slot_id: int
    layout_key: str
    layout_id: str
    storage: Storage
    location: str
    values: dict[str, Any]
    options: SaveOptions
    stage_s: float
    stall_s: float


@dataclass(frozen=True, slots=True)
class LocalFailure:
    """The trainer could not even prepare this save; the worker tells the other ranks."""

    save_id: int
    error: str


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class Released:
    """The worker no longer reads the slot of this save: the trainer may reuse it."""

    save_id: int


@dataclass(frozen=True, slots=True)
class StageOnly:
    """Stage only these tensor items of this layout from now on: the ones this rank writes.

    Sent before ``Finished`` when what the save staged differs from them
    (replica-sharded staging, ``replica_staging.py``).
    """

    save_id: int
    layout_id: str
    keys: tuple[tuple[str, tuple[int, ...] | None], ...]


@dataclass(frozen=True, slots=True)
class Finished:
    save_id: int
    metadata: Metadata | None = None
    error: str | None = None
    error_type: str = ""
    error_fields: tuple[tuple[str, Any], ...] = ()
    """Public attributes of the error (``ranks``, ``failures``), so the trainer can rebuild its type."""
    traceback: str = ""


# ------------------------------------------------- budgeted saves (worker/rounds.py)


@dataclass(frozen=True, slots=True)
class RoundsBegin:
    """A save staged round by round: the workers agree on its plan now; its tensors follow in rounds.

    ``request.slot_id`` names the round buffer; ``request.stage_s`` and
    ``stall_s`` are 0 here (the last ``Round`` carries them).
    """

    request: SaveRequest
    staged: tuple[tuple[str, tuple[int, ...] | None], ...] | None = None
    """The tensor items the rounds will carry when only some of the plan's (replica-sharded
    staging: the ones this rank wrote last time); None when every one. The worker reuses a
    cached plan only if it gives this rank none but these, else plans with them as its mask."""


@dataclass(frozen=True, slots=True)
class Round:
    """One round of a budgeted save is staged: ``specs`` say where each of its tensors lies in the buffer."""

    save_id: int
    index: int
    specs: tuple[BufferSpec, ...]
    last: bool
    stage_s: float = 0.0
    stall_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RoundsAbort:
    """The trainer could not stage the rest of a budgeted save: its worker fails it on every rank."""

    save_id: int
    error: str


@dataclass(frozen=True, slots=True)
class RoundWritten:
    """The worker wrote round ``index`` (durable): the trainer may copy the next one over its bytes."""

    save_id: int
    index: int
