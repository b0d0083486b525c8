"""``CheckpointManager``: retention, latest/steps/restore, leftovers, async saves, the resume example.

Worker starts cost seconds, so the in-process tests share one module-scoped
``AsyncCheckpointer`` (passed as ``checkpointer=``, which a manager uses but
never closes); the example runs as two real processes, crash then resume.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.manager import parse_step, step_name
from async_ckpt.testing import same_bits

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt() -> Iterator[ac.AsyncCheckpointer]:
    with ac.AsyncCheckpointer(max_in_flight=2, start=True) as c:
        yield c


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(64, 33, generator=g),
        "h": torch.randn(7, generator=g).to(torch.bfloat16),
        "ids": torch.randint(-(2**40), 2**40, (5,), generator=g),
        "nested": {"flags": torch.rand(4, generator=g) > 0.5, "lr": 0.1 * step},
        "step": step,
    }


def _blank() -> dict[str, Any]:
    return {
        "w": torch.zeros(64, 33),
        "h": torch.zeros(7, dtype=torch.bfloat16),
        "ids": torch.zeros(5, dtype=torch.int64),
        "nested": {"flags": torch.zeros(4, dtype=torch.bool), "lr": 0.0},
        "step": -1,
    }


def _dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"keep_last": -1}, ValueError, "keep_last cannot be negative."),
        ({"keep_every": 0}, ValueError, "keep_every must be positive"),
        ({"max_in_flight": 0}, ValueError, "max_in_flight must be at least 1."),
        ({"timeout": 0}, ValueError, "timeout must be positive."),
        ({"keep_last": "3"}, TypeError, "keep_last must be an int or None"),
        ({"keep_every": True}, TypeError, "keep_every must be an int or None"),
    ],
)
def test_config_is_validated(tmp_path: Path, kwargs: dict[str, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        ac.CheckpointManager(tmp_path, **kwargs)


def test_bad_root_and_step(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="Cannot detect"):
        ac.CheckpointManager("nosuchscheme://x")
    m = ac.CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="step cannot be negative"):
        m.save(-1, {})
    with pytest.raises(TypeError, match="step must be an int"):
        m.path("3")  # type: ignore[arg-type]
    m.close()
    with pytest.raises(ac.CheckpointError, match="closed"):
        m.save(1, {})


def test_names(tmp_path: Path) -> None:
    m = ac.CheckpointManager(tmp_path)
    assert m.path(42) == f"{tmp_path}/step-00000042"
    assert step_name(123456789) == "step-123456789"
    assert parse_step("step-00000042") == 42 and parse_step("step-7") == 7
    assert parse_step("step-x") is None and parse_step(".step-00000001.tmp-0123456789abcdef") is None


# --------------------------------------------------------------- retention


def test_retention_keep_last_and_keep_every(tmp_path: Path, ckpt: ac.AsyncCheckpointer) -> None:
    with ac.CheckpointManager(tmp_path, keep_last=2, keep_every=3, checkpointer=ckpt) as m:
        pendings = [m.save(step, _state(step)) for step in range(1, 9)]
        assert all(p.result(60) is not None for p in pendings)  # none lost its staging dir
        m.wait(60)
        assert m.steps() == [3, 6, 7, 8]
        assert m.latest() == 8
    assert _dirs(tmp_path) == [step_name(s) for s in (3, 6, 7, 8)]
    assert ckpt.worker_pid is not None, "the manager must not close a checkpointer it was given"


def test_newest_committed_is_always_kept(tmp_path: Path, ckpt: ac.AsyncCheckpointer) -> None:
    with ac.CheckpointManager(tmp_path / "a", keep_last=0, checkpointer=ckpt) as m:
        for step in (1, 2, 3):
            m.save(step, _state(step))
        m.wait(60)
        assert m.steps() == [3]
    with ac.CheckpointManager(tmp_path / "b", keep_every=5, checkpointer=ckpt) as m:
        for step in range(1, 8):
            m.save(step, _state(step))
        m.wait(60)
        assert m.steps() == [5, 7]
    with ac.CheckpointManager(tmp_path / "c", checkpointer=ckpt) as m:  # default: keep all
        for step in (1, 2, 3):
            m.save(step, _state(step))
        m.wait(60)
        assert m.steps() == [1, 2, 3]


def test_leftovers_removed_after_a_commit(tmp_path: Path, ckpt: ac.AsyncCheckpointer) -> None:
    stale = tmp_path / ".step-00000009.tmp-0123456789abcdef"
    stale.mkdir()
    (stale / "shard-r00000-00.safetensors").write_bytes(b"x" * 100)
    uncommitted = tmp_path / "step-00000010"
    uncommitted.mkdir()
    (uncommitted / "shard-r00000-00.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    m = ac.CheckpointManager(tmp_path, keep_last=3, checkpointer=ckpt)
    assert m.steps() == [] and m.latest() is None
    # Nothing is cleaned before a save of this manager commits.
    assert stale.exists() and uncommitted.exists()
    m.save(1, _state(1)).result(60)
    m.wait(60)
    assert _dirs(tmp_path) == ["notes.txt", "step-00000001"]
    # An interrupted save of the very step being saved again does not block it.
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / "junk").write_bytes(b"x")
    m.save(2, _state(2)).result(60)
    m.wait(60)
    assert m.steps() == [1, 2]
    m.close()


def test_in_flight_step_is_never_removed(tmp_path: Path, ckpt: ac.AsyncCheckpointer) -> None:
    m = ac.CheckpointManager(tmp_path, keep_last=1, checkpointer=ckpt)
    m.save(1, _state(1)).result(60)
    m.wait(60)
    # Pretend step 2 is being written: its staging dir and an uncommitted step dir exist.
    _, ticket = m._begin(2)
    staging = tmp_path / ".step-00000002.tmp-00112233aabbccdd"
    staging.mkdir()
    (tmp_path / "step-00000002").mkdir()
    m._apply_retention(1)
    assert staging.exists() and (tmp_path / "step-00000002").exists()
    m._forget(ticket)
    m._apply_retention(1)
    assert _dirs(tmp_path) == ["step-00000001"]
    m.close()


# ---------------------------------------------------------------- restore


def test_latest_steps_restore_bit_exact(tmp_path: Path, ckpt: ac.AsyncCheckpointer) -> None:
    with ac.CheckpointManager(tmp_path, checkpointer=ckpt) as m:
        with pytest.raises(ac.CheckpointError, match="no committed checkpoint under"):
            m.restore(_blank())
        for step in (10, 20, 30):
            m.save(step, _state(step))
        m.wait(60)
        assert m.steps() == [10, 20, 30] and m.latest() == 30

        target = _blank()
        w = target["w"]
        assert m.restore(target) == 30
        assert target["w"] is w, "tensors are loaded in place"
        want = _state(30)
        for key in ("w", "h", "ids"):
            assert same_bits(target[key], want[key])
        assert same_bits(target["nested"]["flags"], want["nested"]["flags"])
        assert target["nested"]["lr"] == want["nested"]["lr"] and target["step"] == 30

        older = _blank()
        assert m.restore(older, step=20) == 20
        assert same_bits(older["w"], _state(20)["w"]) and older["step"] == 20
        with pytest.raises(ac.CheckpointError, match="missing from checkpoint"):
            m.restore({**_blank(), "extra": torch.zeros(1)})
        assert m.restore({**_blank(), "extra": torch.zeros(1)}, strict=False) == 30


@pytest.mark.asyncio
async def test_async_save_through_the_manager(tmp_path: Path, ckpt: ac.AsyncCheckpointer) -> None:
    async with ac.CheckpointManager(tmp_path, keep_last=1, checkpointer=ckpt) as m:
        state = _state(1)
        pending = await m.async_save(1, state)
        state["w"].fill_(-1.0)  # staged: the caller may modify its tensors at once
        md = await pending
        assert "w" in md.tensors
        await (await m.async_save(2, _state(2)))
    assert m.steps() == [2]  # leaving the block waited for retention
    target = _blank()
    assert m.restore(target) == 2 and same_bits(target["w"], _state(2)["w"])


# ---------------------------------------------------------------- example


def _load_example() -> Any:
    spec = importlib.util.spec_from_file_location("resume_example", REPO / "examples" / "resume.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_resume_example_crash_then_resume(tmp_path: Path) -> None:
    root = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "examples" / "resume.py"), "--root", str(root), "--steps", "12"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    crashed = subprocess.run([*cmd, "--crash-at", "8"], capture_output=True, text=True, env=env, timeout=120)
    assert crashed.returncode == 1, crashed.stderr
    assert "step 8: crashing" in crashed.stdout
    latest = ac.CheckpointManager(root).latest()
    assert latest == 6

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from step {latest}" in resumed.stdout
    assert "finished at step 12" in resumed.stdout
    assert ac.CheckpointManager(root).steps() == [9, 12]

    # Bit-exact resume: the same digest as an uninterrupted run (computed here, no checkpoints).
    example = _load_example()
    model, optim, data = example.build()
    for _ in range(12):
        example.train_step(model, optim, data)
    assert f"digest {example.digest(model)}" in resumed.stdout
