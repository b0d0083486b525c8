"""A load never mixes two checkpoints saved to the same path (issue 11, item 2).

One process saves to a path over and over while another loads it (the "load
latest" pattern). Every value of save ``i`` is ``i``, so a load that mixes two
saves shows it. A load may return the old checkpoint or the new one, whole,
or fail with ``CheckpointReplacedError``; it never returns a mix and never
calls a replaced checkpoint corrupt.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt._faults import set_hook
from async_ckpt.convert import to_safetensors, to_torch
from async_ckpt.errors import CheckpointNotFoundError, CheckpointReplacedError, CorruptCheckpointError
from async_ckpt.load_flow import read_checkpoint_metadata
from async_ckpt.storage import LocalStorage
from async_ckpt.verify import verify_checkpoint

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

_W = 1 << 20  # 4 MiB: big enough that a load spends a while between its shard files
_B = 1 << 16


def _state(i: int) -> dict[str, Any]:
    return {"w": torch.full((_W,), float(i)), "b": torch.full((_B,), float(i)), "step": i}


def _target() -> dict[str, Any]:
    return {"w": torch.zeros(_W), "b": torch.zeros(_B), "step": -1}


def _save_forever(path: str, stop: Any, saves: Any) -> None:
    torch.set_num_threads(1)
    i = 0
    while not stop.is_set():
        i += 1
        ac.save(_state(i), path)
        saves.value = i


def _whole(sd: dict[str, Any]) -> bool:
    step = float(sd["step"])
    return bool((sd["w"] == step).all()) and bool((sd["b"] == step).all())


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_load_while_another_process_saves_returns_one_checkpoint_whole(tmp_path: Path, verify: bool) -> None:
    path = str(tmp_path / "latest")
    ctx = mp.get_context("spawn")
    stop, saves = ctx.Event(), ctx.Value("i", 0)
    saver = ctx.Process(target=_save_forever, args=(path, stop, saves), daemon=True)
    saver.start()
    outcomes: dict[str, int] = {"whole": 0, "replaced": 0}
    mixed: list[tuple[float, float, float]] = []
    try:
        deadline = time.monotonic() + 120
        while saves.value < 1:
            assert saver.is_alive() and time.monotonic() < deadline, "the saver never committed"
            time.sleep(0.05)
        # Enough loads to have hit the race dozens of times before the fix.
        while outcomes["whole"] + outcomes["replaced"] < 1500 and time.monotonic() < deadline:
            sd = _target()
            try:
                ac.load(sd, path, verify=verify)
            except CheckpointReplacedError as exc:
                assert "replaced" in str(exc) and path in str(exc)
                outcomes["replaced"] += 1
                continue
            except CheckpointNotFoundError:  # a crash-free overwrite never un-commits locally
                raise
            if _whole(sd):
                outcomes["whole"] += 1
            else:
                mixed.append((float(sd["step"]), float(sd["w"][0]), float(sd["b"][0])))
            assert saver.is_alive()
    finally:
        stop.set()
        saver.join(60)
        if saver.is_alive():
            saver.kill()
    assert not mixed, f"{len(mixed)} loads mixed two saves (step, w, b): {mixed[:5]}"
    assert outcomes["whole"] > 0 and saves.value > 10, (outcomes, saves.value)


# ----------------------------------------------- a save committed at an exact moment of a load


class _PlainStorage:
    """A third-party backend: the Storage protocol only, no ``open_checkpoint``, reads by path."""

    def __init__(self) -> None:
        self._local = LocalStorage()

    def __getattr__(self, name: str) -> Any:
        if name == "open_checkpoint":
            raise AttributeError(name)
        return getattr(self._local, name)


@pytest.fixture
def commit_during_load() -> Iterator[Callable[[str, int], list[int]]]:
    """``arm(path, times)``: the next ``times`` loads commit a new save to ``path`` right after
    reading metadata.json, before opening a shard. Returns the steps committed so far."""
    committed: list[int] = []

    def arm(path: str, times: int) -> list[int]:
        def save_next() -> None:
            if len(committed) < times:
                committed.append(int(ac.read_metadata(path).values["step"].value) + 1)
                ac.save(_state(committed[-1]), path)

        set_hook("load_metadata_read", save_next)
        return committed

    yield arm
    set_hook("load_metadata_read", None)


@pytest.mark.parametrize("storage", [None, _PlainStorage], ids=["local", "by-path"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_save_committed_between_metadata_and_shards_loads_the_new_checkpoint_whole(
    tmp_path: Path, commit_during_load: Any, verify: bool, storage: Any
) -> None:
    path = str(tmp_path / "c")
    ac.save(_state(1), path)
    committed = commit_during_load(path, 1)
    sd = _target()
    ac.load(sd, path, verify=verify, storage=storage() if storage else None)
    assert committed == [2]
    # The first attempt saw its checkpoint replaced; the retry read the new one, whole.
    assert sd["step"] == 2 and _whole(sd)


@pytest.mark.parametrize("storage", [None, _PlainStorage], ids=["local", "by-path"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_checkpoint_replaced_during_every_attempt_raises_replaced_error(
    tmp_path: Path, commit_during_load: Any, verify: bool, storage: Any
) -> None:
    path = str(tmp_path / "c")
    ac.save(_state(1), path)
    committed = commit_during_load(path, 2)
    sd = _target()
    with pytest.raises(CheckpointReplacedError, match="replaced") as info:
        ac.load(sd, path, verify=verify, storage=storage() if storage else None)
    assert path in str(info.value) and not isinstance(info.value, CorruptCheckpointError)
    assert committed == [2, 3]
    assert sd["step"] == -1  # no value of either save reached the target
    # The next load reads the last save whole.
    ac.load(sd, path, verify=verify, storage=storage() if storage else None)
    assert sd["step"] == 3 and _whole(sd)


def _ranks_read_different_saves(rank: int, world: int, root: Path) -> str:
    a, b, swapped = root / "a", root / "b", root / "swapped"
    ac.save(_state(1), str(a))  # both ranks: a 2-rank save
    ac.save(_state(2), str(b))
    if rank == 0:

        def swap() -> None:  # rank 0 has read save 1's metadata; rank 1 will read save 2's
            os.rename(a, root / "a-old")
            os.rename(b, a)
            swapped.touch()

        set_hook("load_metadata_read", swap)
    else:
        while not swapped.exists():
            time.sleep(0.01)
    sd = _target()
    try:
        ac.load(sd, str(a))
    except CheckpointReplacedError as exc:
        return str(exc)
    finally:
        set_hook("load_metadata_read", None)
    return f"loaded step {sd['step']}"


def test_ranks_that_read_different_saves_fail_alike(tmp_path: Path) -> None:
    """Each rank reads metadata.json itself: a save landing between two ranks' reads is caught."""
    out = run_ranks(2, _ranks_read_different_saves, tmp_path, timeout=240)
    for msg in out:
        assert "the ranks read different saves" in msg and str(tmp_path / "a") in msg, out


# ----------------------------------------- verify and convert read the metadata once, then by path


class _SavesOnFirstShardRead(LocalStorage):
    """Fault injection: opening the first shard by path first commits another save over it."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self._path = path
        self.fired = False
        self.step = 1

    def open_reader(self, location: str, name: str) -> Any:
        if not self.fired:
            self.fired = True
            self.step += 1
            ac.save(_state(self.step), self._path)
        return super().open_reader(location, name)


def test_verify_of_a_checkpoint_replaced_during_it_reports_the_replacement_not_damage(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    ac.save(_state(1), path)
    storage = _SavesOnFirstShardRead(path)
    report = verify_checkpoint(path, storage=storage)
    assert storage.fired
    assert [p.message for p in report.problems if "replaced" not in p.message] == []
    assert len(report.problems) == 1 and path in report.problems[0].message
    assert verify_checkpoint(path).ok  # the new checkpoint verifies


def test_convert_of_a_checkpoint_replaced_during_it_raises_replaced_error(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    ac.save(_state(1), path)
    storage = _SavesOnFirstShardRead(path)
    md = read_checkpoint_metadata(storage, path)
    for convert in (to_safetensors, to_torch):
        storage.fired = False
        kw: dict[str, Any] = {"slab_bytes": 1 << 20} if convert is to_safetensors else {}
        with pytest.raises(CheckpointReplacedError, match="replaced"):
            convert(storage, path, md, tmp_path / "out", rank=None, warn=lambda _: None, **kw)
        md = read_checkpoint_metadata(storage, path)
