"""What a rank of the test pool runs: the call both the pool (``_pool.py``) and a rank (``_rank.py``) know."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_PG_TIMEOUT", "Call"]

DEFAULT_PG_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Call:
    """What a rank runs: ``fn(*args, **kwargs)``, or a test function found by module and qualname.

    ``pass_rank`` prepends ``(rank, world_size)`` to the arguments (the harness
    style); ``rank_args`` names keyword arguments whose value is replaced on the
    rank by its ``RankContext`` (``"rank"``) or a 1-D ``DeviceMesh`` (``"mesh"``).
    """

    fn: Callable[..., Any] | None = None
    module: str = ""
    module_file: str = ""
    qualname: str = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    rank_args: dict[str, str] = field(default_factory=dict)
    pass_rank: bool = False
    pg_timeout: float = DEFAULT_PG_TIMEOUT
    sys_path: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    """The calling process's environment when the call was made (set by ``run_call``)."""
    label: str = ""
