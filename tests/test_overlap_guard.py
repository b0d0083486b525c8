"""The optimizer step guard of overlap saves (issue 14 item 3).

``save(..., overlap=True)`` stages on a helper thread; an ``optimizer.step()``
called before that copy is done must wait for it, or the checkpoint mixes
pre- and post-step values. Each test pauses staging half way through its copy
(``_faults`` hook ``stage``), so the step is called while staging is still
running, not merely soon after the save returned. The pause ends when a
global optimizer post-hook runs (an unguarded step has then changed every
tensor: the rest of the copy takes post-step values) or, for a guarded step
that is waiting, after a short delay.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import async_ckpt as ac
from async_ckpt import _faults, api

_RELEASE_AFTER_S = 0.5
"""How long a waiting (guarded) step keeps staging paused: no assertion depends on it."""


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    """The default checkpointer (``ac.async_save`` uses it too); one worker for the module."""
    c = api._default_checkpointer(None)
    c.start()
    yield c
    api._close_defaults()


def _trained(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 96), nn.Linear(96, 8))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train_step(model, opt)
    opt.step()  # Adam's state exists: it is saved and changed by the next step too
    return model, opt


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(16, 96)).square().mean().backward()


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return copy.deepcopy({"model": model.state_dict(), "optim": opt.state_dict()})


def _assert_bits_equal(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got)}"
        assert got.dtype == want.dtype and got.shape == want.shape, where
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), (
            f"{where}: not the pre-step value"
        )
    elif isinstance(want, dict):
        assert sorted(map(str, got)) == sorted(map(str, want)), where
        by_str = {str(k): v for k, v in got.items()}
        for k, v in want.items():
            _assert_bits_equal(by_str[str(k)], v, f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_bits_equal(g, w, f"{where}.{i}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _assert_changed(model: nn.Module, before: dict[str, Any]) -> None:
    """The step did change the weights: a checkpoint of the new ones would differ."""
    for k, v in model.state_dict().items():
        assert not torch.equal(v, before["model"][k]), k


def _empty_hooks(opt: torch.optim.Optimizer) -> bool:
    return not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


@contextlib.contextmanager
def _paused_staging(fail: bool = False) -> Iterator[threading.Event]:
    """Staging stops half way through its copy until an optimizer step has run (or a guarded one waits).

    Yields an event set once staging has reached the pause. ``fail``: staging
    then raises there instead of going on.
    """
    reached = threading.Event()
    release = threading.Event()

    def hook() -> None:
        reached.set()
        assert release.wait(120), "staging was never released"
        if fail:
            raise RuntimeError("injected staging failure")

    def before_any_step(*_: Any) -> None:
        # A guarded step waits for staging: let staging go on after a while.
        threading.Timer(_RELEASE_AFTER_S, release.set).start()

    def after_any_step(*_: Any) -> None:
        release.set()

    handles = [
        register_optimizer_step_pre_hook(before_any_step),
        register_optimizer_step_post_hook(after_any_step),
    ]
    _faults.set_hook("stage", hook)
    try:
        yield reached
    finally:
        release.set()
        _faults.set_hook("stage", None)
        for h in handles:
            h.remove()


def _step_while_staging(pending: ac.PendingCheckpoint, reached: threading.Event, opt: Any) -> None:
    assert reached.wait(60), "staging never started"
    assert not pending.staged.done(), "staging must still be running when the step is called"
    opt.step()


# --------------------------------------------------------------- seen by the walk


def test_step_right_after_overlap_save_waits_for_staging(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    model, opt = _trained()
    _train_step(model, opt)
    want = _snapshot(model, opt)
    with _paused_staging() as reached:
        pending = ck.save({"model": model, "optim": opt}, tmp_path / "c", overlap=True)
        _step_while_staging(pending, reached, opt)
        assert pending.staged.done(), "the step ran before staging finished"
    _assert_changed(model, want)
    pending.result(120)
    _assert_bits_equal(ac.load_state_dict(tmp_path / "c"), want)
    assert _empty_hooks(opt), "the guard must remove itself once its save is staged"


def test_guard_finds_optimizer_inside_containers_and_stateful_wrappers(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    class AppState:
        """DCP's recipe: a Stateful holding model and optimizer, returning plain state dicts."""

        def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
            self.model = model
            self.optimizer = optimizer

        def state_dict(self) -> dict[str, Any]:
            return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            raise NotImplementedError

    for i, wrap in enumerate(
        [
            lambda m, o: {"app": AppState(m, o)},
            lambda m, o: {"parts": [{"model": m}, ("x", {"optimizers": [o]})]},
        ]
    ):
        model, opt = _trained(i)
        _train_step(model, opt)
        want = _snapshot(model, opt)
        with _paused_staging() as reached:
            pending = ck.save(wrap(model, opt), tmp_path / f"c{i}", overlap=True)
            _step_while_staging(pending, reached, opt)
        pending.result(120)
        got = ac.load_state_dict(tmp_path / f"c{i}")
        flat = (
            got["app"]
            if i == 0
            else {"model": got["parts"][0]["model"], "optim": got["parts"][1][1]["optimizers"][0]}
        )
        _assert_bits_equal(flat, want)
        assert _empty_hooks(opt)


class _Pair(NamedTuple):
    first: Any
    second: Any


class _Wrapper:
    """A Stateful that holds its parts as attributes, as DCP's ``AppState`` recipe does."""

    def __init__(self, **parts: Any) -> None:
        self.__dict__.update(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"n": 1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError


class _ListOf(list):  # type: ignore[type-arg]
    """A list subclass: a container, walked like a list."""


def test_guard_finds_optimizers_wherever_the_walk_meets_them(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    """Each placement the guard's search covers; optimizers it must not guard stay unhooked."""

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)

    found = {name: sgd() for name in ("dict", "list", "tuple", "named", "sub", "ordered", "deep", "shared")}
    found |= {name: sgd() for name in ("attr", "attr_list", "attr_dict", "inner_wrapper", "after_stateful")}
    hidden = {name: sgd() for name in ("in_module", "long_attr_list", "deep_wrapper")}
    module = nn.Linear(2, 2)
    module.opt = hidden["in_module"]  # type: ignore[assignment]
    deep: Any = {"o": found["deep"]}
    for _ in range(30):
        deep = {"d": [deep]}
    too_deep_wrapper: Any = _Wrapper(o=hidden["deep_wrapper"])
    for _ in range(8):
        too_deep_wrapper = {"d": too_deep_wrapper}
    sd = {
        "a": {"x": found["dict"], "y": [found["list"], (1, found["tuple"])]},
        "b": _Pair(torch.zeros(1), found["named"]),
        "c": _ListOf([found["sub"]]),
        "d": collections.OrderedDict(o=found["ordered"]),
        "e": deep,
        "f": [found["shared"]],
        "g": [found["shared"]],
        "h": _Wrapper(
            opt=found["attr"],
            opts=[found["attr_list"]],
            by_name={"x": found["attr_dict"]},
            inner=_Wrapper(opt=found["inner_wrapper"]),
            long=[hidden["long_attr_list"]] + [0] * 64,
        ),
        "i": module,
        "j": [_Wrapper(), {"o": found["after_stateful"]}],
        "k": too_deep_wrapper,
    }
    pending = ck.save(sd, tmp_path / "c", overlap=True)
    try:
        hooked = {name for name, o in {**found, **hidden}.items() if not _empty_hooks(o)}
        assert hooked == set(found)
    finally:
        pending.result(120)
        for o in [*found.values(), *hidden.values()]:
            o.step()
    assert all(_empty_hooks(o) for o in found.values())


def test_two_overlap_saves_in_flight_each_guarded(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    model, opt = _trained(3)
    _train_step(model, opt)
    want = _snapshot(model, opt)
    with _paused_staging() as reached:
        first = ck.save({"model": model, "optim": opt}, tmp_path / "a", overlap=True)
        second = ck.save({"model": model, "optim": opt}, tmp_path / "b", overlap=True)
        _step_while_staging(first, reached, opt)
        assert first.staged.done() and second.staged.done()
    for p, name in ((first, "a"), (second, "b")):
        p.result(120)
        _assert_bits_equal(ac.load_state_dict(tmp_path / name), want)
    assert _empty_hooks(opt)


# ------------------------------------------------------------ explicit guard=[...]


def test_explicit_guard_for_optimizer_hidden_from_the_walk(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    model, opt = _trained(4)
    _train_step(model, opt)
    want = _snapshot(model, opt)
    # Plain state dicts share the tensors but hold no optimizer object to find.
    sd = {"model": model.state_dict(), "optim": opt.state_dict()}
    with _paused_staging() as reached:
        pending = ck.save(sd, tmp_path / "c", overlap=True, guard=[opt])
        _step_while_staging(pending, reached, opt)
    pending.result(120)
    _assert_bits_equal(ac.load_state_dict(tmp_path / "c"), want)
    assert _empty_hooks(opt)


def test_guard_false_registers_nothing_and_bad_guard_is_refused(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    model, opt = _trained(5)
    with _paused_staging() as reached:
        pending = ck.save({"model": model, "optim": opt}, tmp_path / "c", overlap=True, guard=False)
        assert reached.wait(60)
        assert _empty_hooks(opt)
    pending.result(120)
    with pytest.raises(TypeError, match="guard"):
        ck.save({"model": model}, tmp_path / "d", overlap=True, guard=[model])  # type: ignore[list-item]


# ---------------------------------------------------------------- lifetime


def test_guard_removed_at_next_step_when_staging_finished_first(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    model, opt = _trained(6)
    pending = ck.save({"model": model, "optim": opt}, tmp_path / "c", overlap=True)
    pending.staged.wait(60)
    # Staging ended on its own thread, which never touches the optimizer's hooks (the
    # trainer may be iterating them); the next step removes the guard without waiting.
    _train_step(model, opt)
    opt.step()
    assert _empty_hooks(opt)
    pending.result(120)
    opt.step()
    assert _empty_hooks(opt)


def test_failed_staging_lets_the_step_go_on(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    model, opt = _trained(7)
    _train_step(model, opt)
    with _paused_staging(fail=True) as reached:
        pending = ck.save({"model": model, "optim": opt}, tmp_path / "c", overlap=True)
        _step_while_staging(pending, reached, opt)
        assert pending.staged.done(), "the step did not wait for staging"
    err = pending.exception(120)
    assert isinstance(err, ac.CheckpointError) and "injected staging failure" in str(err)
    assert _empty_hooks(opt)
    assert not (tmp_path / "c").exists()
    # The checkpointer and the optimizer are still fine.
    ck.save({"model": model, "optim": opt}, tmp_path / "d").result(120)


def test_module_async_save_overlap_guarded_in_asyncio_loop(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    model, opt = _trained(8)
    _train_step(model, opt)
    want = _snapshot(model, opt)

    async def main() -> ac.PendingCheckpoint:
        with _paused_staging() as reached:
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            pending = await ac.async_save(sd, tmp_path / "c", overlap=True, guard=[opt])
            _step_while_staging(pending, reached, opt)
        await pending
        return pending

    pending = asyncio.run(main())
    assert pending.done()
    _assert_bits_equal(ac.load_state_dict(tmp_path / "c"), want)
    assert _empty_hooks(opt)


def test_a_tensor_resized_before_it_was_staged_fails_the_save_naming_its_key(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    # Against the contract (tensors change in place only once staged), but it happens: the
    # error must say which tensor, not only torch's "size of tensor a must match tensor b".
    sd = {"early": torch.randn(64), "late": {"w": torch.randn(1000)}}
    late = sd["late"]["w"]
    _faults.set_hook("stage", lambda: late.resize_(2000))  # the second half is not copied yet
    try:
        pending = ck.save(sd, tmp_path / "c", overlap=True, guard=False)
        with pytest.raises(ac.CheckpointError) as err:
            pending.result(120)
    finally:
        _faults.set_hook("stage", None)
    msg = str(err.value)
    assert "'late.w'" in msg and "(1000,)" in msg and "(2000,)" in msg, msg
    assert not (tmp_path / "c").exists()
    ck.save({"w": torch.randn(8)}, tmp_path / "next").result(120)  # the checkpointer goes on
