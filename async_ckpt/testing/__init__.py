"""async_ckpt.testing: a pytest plugin for multi-rank tests, and bit-exact asserts.

    @pytest.mark.ranks(4)
    async def test_save(rank, ckpt_dir):       # runs on each of 4 gloo ranks
        await (await ac.async_save(state(rank.rank), ckpt_dir))

Enabled by the ``pytest11`` entry point (installing ``async-ckpt[test]``) or
``-p async_ckpt.testing``. See docs/testing.md. The plugin module imports no
torch; the helpers below load it on first use.
"""

from __future__ import annotations

from typing import Any

from .plugin import (
    ckpt_dir,
    mesh,
    pytest_addoption,
    pytest_configure,
    pytest_pyfunc_call,
    pytest_sessionfinish,
    rank,
)

__all__ = [
    "RankContext",
    "RankFailed",
    "assert_bits_equal",
    "assert_state_dicts_equal",
    "ckpt_dir",
    "mesh",
    "pytest_addoption",
    "pytest_configure",
    "pytest_pyfunc_call",
    "pytest_sessionfinish",
    "rank",
    "run_ranks",
    "raw_bytes",
    "same_bits",
]

_LAZY = {
    "RankContext": "._rank",
    "RankFailed": "._pool",
    "assert_bits_equal": ".asserts",
    "assert_state_dicts_equal": ".asserts",
    "same_bits": ".asserts",
    "raw_bytes": ".asserts",
    "run_ranks": "._run",
}


def __getattr__(name: str) -> Any:
    # Lazy so that pytest loading the plugin does not import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
