"""pytest hooks and fixtures of ``async_ckpt.testing`` (no torch import here: loading stays cheap).

A test marked ``@pytest.mark.ranks(n)`` is not called in the pytest process.
Its fixtures are set up there as usual; then the module name, the function's
qualname and the fixture values (pickled) go to each of ``n`` pooled rank
processes, which import the module and call the body inside their gloo group.
``rank`` and ``mesh`` are stand-ins that each rank replaces with its own view.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "ckpt_dir",
    "mesh",
    "pytest_addoption",
    "pytest_configure",
    "pytest_pyfunc_call",
    "pytest_sessionfinish",
    "rank",
]

_PER_RANK = {"rank": "rank", "mesh": "mesh"}
DEFAULT_TIMEOUT = 240.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "ranks_timeout",
        "seconds a @pytest.mark.ranks test may run on its ranks before they are named and stopped",
        default=str(DEFAULT_TIMEOUT),
    )
    parser.addoption(
        "--ranks-fresh",
        action="store_true",
        help="spawn new rank processes for every ranks test and run_ranks call instead of reusing a pool",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("ranks_fresh"):
        from . import _pool

        _pool.always_fresh = True
    config.addinivalue_line(
        "markers",
        "ranks(n, *, timeout=None, fresh=False, pg_timeout=60): run the test body on n pooled gloo ranks "
        "(async_ckpt.testing); fresh=True spawns processes for this test alone",
    )


class _Stand(str):
    """What ``rank``/``mesh`` hold in the pytest process: replaced on every rank."""

    __slots__ = ()


def _need_ranks(request: pytest.FixtureRequest, name: str) -> None:
    if request.node.get_closest_marker("ranks") is None:
        raise pytest.UsageError(
            f"{request.node.nodeid}: fixture {name!r} exists only in tests marked @pytest.mark.ranks(n)"
        )


@pytest.fixture
def rank(request: pytest.FixtureRequest) -> Any:
    """This rank's ``RankContext`` (``.rank``, ``.world_size``, ``.mesh()``, ``.barrier()``)."""
    _need_ranks(request, "rank")
    return _Stand("rank")


@pytest.fixture
def mesh(request: pytest.FixtureRequest) -> Any:
    """A 1-D CPU ``DeviceMesh`` over all ranks of the test."""
    _need_ranks(request, "mesh")
    return _Stand("mesh")


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    """A checkpoint directory shared by all ranks of the test (it does not exist yet)."""
    return tmp_path / "ckpt"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    marker = pyfuncitem.get_closest_marker("ranks")
    if marker is None:
        return None
    __tracebackhide__ = True
    from ._pool import Call, run_call

    world, timeout, fresh, pg_timeout = _marker_args(pyfuncitem, marker)
    kwargs: dict[str, Any] = {}
    rank_args: dict[str, str] = {}
    for name in pyfuncitem._fixtureinfo.argnames:
        value = pyfuncitem.funcargs[name]
        if isinstance(value, _Stand):
            rank_args[name] = str(value)
            continue
        try:
            pickle.dumps(value)
        except Exception as e:  # noqa: BLE001 - any pickling failure means the same thing here
            raise pytest.UsageError(
                f"{pyfuncitem.nodeid}: fixture {name!r} cannot be sent to the rank processes ({e!r}); "
                "a ranks test takes only picklable fixture values (tmp_path, ckpt_dir, parameters ...) "
                "and the per-rank 'rank' and 'mesh'"
            ) from None
        kwargs[name] = value
    module = pyfuncitem.module
    assert module is not None
    call = Call(
        module=module.__name__,
        module_file=str(module.__file__),
        qualname=pyfuncitem.function.__qualname__,
        kwargs=kwargs,
        rank_args=rank_args,
        pg_timeout=pg_timeout,
        label=pyfuncitem.nodeid,
    )
    run_call(world, call, timeout=timeout, fresh=fresh)
    return True


def _marker_args(item: pytest.Function, marker: pytest.Mark) -> tuple[int, float, bool, float]:
    if len(marker.args) != 1 or not isinstance(marker.args[0], int) or marker.args[0] < 1:
        raise pytest.UsageError(f"{item.nodeid}: use @pytest.mark.ranks(n) with n >= 1, got {marker.args}")
    unknown = set(marker.kwargs) - {"timeout", "fresh", "pg_timeout"}
    if unknown:
        raise pytest.UsageError(f"{item.nodeid}: unknown ranks() argument(s) {sorted(unknown)}")
    timeout = marker.kwargs.get("timeout") or float(item.config.getini("ranks_timeout"))
    return (
        marker.args[0],
        float(timeout),
        bool(marker.kwargs.get("fresh", False)),
        float(marker.kwargs.get("pg_timeout", 60.0)),
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    pool = sys.modules.get("async_ckpt.testing._pool")
    if pool is not None:
        pool.close_pools()
