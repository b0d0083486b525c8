"""Run a function on N gloo ranks: the pooled ranks of ``async_ckpt.testing``.

    results = run_ranks(2, _body, tmp_path)      # _body(rank, world_size, tmp_path)

The ranks are spawned once per world size and reused across calls (and tests);
a call that fails, dies or hangs on any rank ends its pool, and the next call
spawns a new one. ``fresh=True`` spawns processes for one call alone: for a
body that kills its rank, or must start from a clean interpreter (env read at
import, a worker started with a fault armed in its environment).
"""

from __future__ import annotations

from async_ckpt.testing import RankFailed, run_ranks

__all__ = ["RankFailed", "run_ranks"]
