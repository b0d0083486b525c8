"""``run_ranks``: call a function on N pooled gloo ranks outside the marker style."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._pool import DEFAULT_PG_TIMEOUT, Call, run_call

__all__ = ["run_ranks"]


def run_ranks(
    world: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 180.0,
    pg_timeout: float = DEFAULT_PG_TIMEOUT,
    fresh: bool = False,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return the results by rank.

    ``fn`` and ``args`` must pickle (a module-level function). The ranks come from
    the shared pool; ``fresh=True`` spawns processes for this call alone (for a
    body that kills its rank or needs a clean interpreter). Raises ``RankFailed``
    naming the rank(s) that raised, died or did not finish within ``timeout``.
    """
    call = Call(fn=fn, args=args, pass_rank=True, pg_timeout=pg_timeout, label=getattr(fn, "__name__", ""))
    return run_call(world, call, timeout=timeout, fresh=fresh)
