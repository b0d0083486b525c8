"""Saves under a staging budget (issue 14 item 2): the state goes to the worker round by round.

With ``AsyncCheckpointer(staging_budget=B)`` a rank whose state needs more
than ``B`` bytes of staging copies it in rounds of whole tensors into a
``B``-byte buffer; the worker writes each round to its own shard files before
the buffer is reused. Checked here on real workers and files: loads are
bit-exact (one rank, two ranks with different round counts, tensors larger
than the budget, split into chunks that fit, many small tensors, overlap mode with an optimizer step right
after), the pool never holds more than the budget, and a failure or a worker
death in a middle round, or ``close()`` during the rounds, fails that save
cleanly (nothing committed, no staging area left) while the next save works.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import async_ckpt as ac
from async_ckpt import _faults
from async_ckpt.testing import assert_state_dicts_equal

MB = 1 << 20
BUDGET = 1 * MB
KILL_ENV = "ASYNC_CKPT_KILL_AT"
FAIL_ENV = "ASYNC_CKPT_FAIL_AT"


def _small_tensors(seed: int, n: int = 40, prefix: str = "") -> dict[str, Any]:
    """``n`` tensors of 64 KiB in several dtypes: many rounds of many tensors each."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {}
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out[f"{prefix}f32_{i}"] = torch.randn(16384, generator=g)
        elif kind == 1:
            out[f"{prefix}bf16_{i}"] = torch.randn(128, 256, generator=g).to(torch.bfloat16)
        elif kind == 2:
            out[f"{prefix}i64_{i}"] = torch.randint(-(2**40), 2**40, (8192,), generator=g)
        else:
            out[f"{prefix}bool_{i}"] = torch.rand(65536, generator=g) > 0.5
    out["empty"] = torch.empty(0, 3)
    out["step"] = seed
    out["name"] = f"run-{seed}"
    return out


def _state_with_big_tensor(seed: int) -> dict[str, Any]:
    sd = _small_tensors(seed, 12)
    sd["big"] = torch.randn(3 * MB // 4, generator=torch.Generator().manual_seed(seed + 100))
    return sd


def _blank(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}


def _load(path: Path | str, like: dict[str, Any]) -> dict[str, Any]:
    target = _blank(like)
    ac.load(target, path)
    return target


def _nbytes(sd: dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values() if isinstance(v, torch.Tensor))


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _pause_mid_rounds() -> tuple[threading.Event, threading.Event]:
    reached, go_on = threading.Event(), threading.Event()

    def hook() -> None:
        reached.set()
        assert go_on.wait(120), "staging was never let go on"

    _faults.set_hook("stage", hook)
    return reached, go_on


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    c = ac.AsyncCheckpointer(staging_budget=BUDGET, start=True)
    yield c
    c.close()


# ------------------------------------------------------------- bit-exact


def test_budgeted_saves_of_many_small_tensors_load_bit_exact(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    for version in range(2):  # the second save reuses the plan and the round buffer
        sd = _small_tensors(version)
        want = copy.deepcopy(sd)
        assert _nbytes(sd) > 2 * BUDGET
        pending = ck.save(sd, tmp_path / f"v{version}")
        for v in sd.values():  # staged: changing the state now must not reach the checkpoint
            if isinstance(v, torch.Tensor) and v.numel():
                v.zero_() if v.dtype != torch.bool else v.fill_(True)
        md = pending.result(120)
        # Each round is written to shard files of its own: the state went in several.
        assert len(md.files) >= _nbytes(want) // BUDGET, md.files.keys()
        got = _load(tmp_path / f"v{version}", want)
        assert_state_dicts_equal(
            {k: v for k, v in got.items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in want.items() if isinstance(v, torch.Tensor)},
        )
        assert ac.load_state_dict(tmp_path / f"v{version}")["step"] == version
        assert ck.staging_bytes <= BUDGET, ck.staging_bytes
    assert ck.staging_allocations == 1, "the round buffer is allocated once and reused"


def test_a_tensor_larger_than_the_budget_is_split_into_chunks(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    sd = _state_with_big_tensor(7)
    # Rows larger than half the budget: split along the second dimension too.
    sd["wide"] = torch.randn(3, 300_000, generator=torch.Generator().manual_seed(8))
    sd["long_bf16"] = torch.randn(5, 100, 1000, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    sd["odd"] = torch.randint(0, 255, (1_234_567,), dtype=torch.uint8)
    want = copy.deepcopy(sd)
    md = ck.save(sd, tmp_path / "big").result(120)
    # The buffer stays within the budget: a tensor larger than half of it is
    # staged in pieces, each a chunk of its own in the checkpoint.
    assert ck.staging_bytes <= BUDGET, ck.staging_bytes
    chunks = {fqn: len(t.chunks) for fqn, t in md.tensors.items()}
    assert chunks["big"] >= 6 and chunks["wide"] >= 6 and chunks["odd"] >= 3, chunks
    assert chunks["f32_0"] == 1, chunks
    got = _load(tmp_path / "big", want)
    assert_state_dicts_equal(
        {k: v for k, v in got.items() if isinstance(v, torch.Tensor)},
        {k: v for k, v in want.items() if isinstance(v, torch.Tensor)},
    )
    # Read whole, as a reader that knows nothing of the budget would.
    whole = ac.load_state_dict(tmp_path / "big")
    for key in ("big", "wide", "long_bf16", "odd"):
        assert torch.equal(whole[key], want[key]), key
    # A region across the pieces, read into a narrowed target.
    part = {"wide": torch.zeros(3, 300_000)}
    ac.load(part, tmp_path / "big")
    assert torch.equal(part["wide"], want["wide"])
    sd2 = _state_with_big_tensor(8)  # the second save reuses the layout (cached slices)
    sd2["wide"], sd2["long_bf16"], sd2["odd"] = sd["wide"] + 1, sd["long_bf16"] * 2, sd["odd"] // 2
    want2 = copy.deepcopy(sd2)
    ck.save(sd2, tmp_path / "big2").result(120)
    whole2 = ac.load_state_dict(tmp_path / "big2")
    for key in ("big", "wide", "long_bf16", "odd", "f32_0"):
        assert torch.equal(whole2[key], want2[key]), key


def test_a_state_within_the_budget_is_one_round_in_a_buffer_of_its_size(tmp_path: Path) -> None:
    sd = {"w": torch.arange(1000.0), "b": torch.ones(10, dtype=torch.int32)}
    with ac.AsyncCheckpointer(staging_budget=BUDGET) as c:
        md = c.save(sd, tmp_path / "small").result(120)
        assert c.staging_bytes < 8192, c.staging_bytes
    assert len(md.files) == 1, md.files.keys()
    assert_state_dicts_equal(_load(tmp_path / "small", sd), sd)


def test_staging_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="staging_budget"):
        ac.AsyncCheckpointer(staging_budget=0)
    with pytest.raises(TypeError, match="staging_budget"):
        ac.AsyncCheckpointer(staging_budget=1.5)  # type: ignore[arg-type]


def test_overlap_save_then_optimizer_step_saves_the_pre_step_state(
    ck: ac.AsyncCheckpointer, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 256)).square().mean().backward()
        opt.step()
    want = copy.deepcopy({"model": model.state_dict(), "optim": opt.state_dict()})
    assert sum(p.numel() * 4 for p in model.parameters()) * 3 > 2 * BUDGET  # several rounds
    reached, go_on = _pause_mid_rounds()
    # A guarded step waits for staging: let staging go on a little after the step was called.
    handle = register_optimizer_step_pre_hook(lambda *_: threading.Timer(0.5, go_on.set).start())
    try:
        pending = ck.save({"model": model, "optim": opt}, tmp_path / "ov", overlap=True)
        opt.zero_grad()
        model(torch.randn(8, 256)).square().mean().backward()
        assert reached.wait(60), "staging never reached its middle round"
        assert not pending.staged.done()
        opt.step()  # the guard holds it until the last round is copied
        assert pending.staged.done()
    finally:
        handle.remove()
        go_on.set()
        _faults.set_hook("stage", None)
    for k, v in model.state_dict().items():
        assert not torch.equal(v, want["model"][k]), k
    pending.result(120)
    got = ac.load_state_dict(tmp_path / "ov")
    assert_state_dicts_equal(got["model"], want["model"])
    assert_state_dicts_equal(got["optim"]["state"], want["optim"]["state"])


# -------------------------------------------------------------- failures


def test_a_write_failure_in_a_middle_round_fails_the_save_and_the_next_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAIL_ENV, "write_round2:0")  # save 0, third round; the worker inherits it
    with ac.AsyncCheckpointer(staging_budget=BUDGET) as c:
        sd = _small_tensors(3)
        with pytest.raises(ac.CheckpointError, match="write_round2"):
            c.save(sd, tmp_path / "bad").result(120)
        assert not (tmp_path / "bad").exists()
        assert _leftovers(tmp_path) == [], "the failed save's staging area must be removed"
        c.save(sd, tmp_path / "good").result(120)
    assert_state_dicts_equal(
        {k: v for k, v in _load(tmp_path / "good", sd).items() if isinstance(v, torch.Tensor)},
        {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)},
    )


def test_worker_killed_mid_rounds_fails_the_save_and_the_next_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KILL_ENV, "write_round1:0")
    with ac.AsyncCheckpointer(staging_budget=BUDGET) as c:
        sd = _small_tensors(4)
        pending = c.save(sd, tmp_path / "killed", overlap=True)
        with pytest.raises(ac.WorkerDiedError):
            pending.result(120)
        assert not (tmp_path / "killed").exists()
        monkeypatch.delenv(KILL_ENV)  # the next worker starts without it
        c.save(sd, tmp_path / "after").result(120)
        assert c.worker_starts == 2
        assert c.staging_bytes <= BUDGET
    got = _load(tmp_path / "after", sd)
    assert_state_dicts_equal(
        {k: v for k, v in got.items() if isinstance(v, torch.Tensor)},
        {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)},
    )


@pytest.mark.parametrize("wait", [True, False], ids=["waits", "gives-up"])
def test_close_during_rounds_does_not_hang(tmp_path: Path, wait: bool) -> None:
    c = ac.AsyncCheckpointer(staging_budget=BUDGET, start=True)
    reached, go_on = _pause_mid_rounds()
    try:
        sd = _small_tensors(5)
        pending = c.save(sd, tmp_path / "c", overlap=True)
        assert reached.wait(60), "staging never reached its middle round"
        assert not pending.staged.done()
        go_on.set()
        c.close(timeout=None if wait else 0.0)
    finally:
        go_on.set()
        _faults.set_hook("stage", None)
        c.close()
    if wait:
        pending.result(0)
        got = _load(tmp_path / "c", sd)
        assert_state_dicts_equal(
            {k: v for k, v in got.items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)},
        )
    else:
        # Closed before it finished: it failed, or it got as far as committing.
        exc = pending.exception(0)
        assert exc is None or isinstance(exc, ac.CheckpointError), exc
        if exc is not None:
            assert not (tmp_path / "c").exists()
    assert _leftovers(tmp_path) == []


# -------------------------------------------------------------- two ranks


def _rank_state(rank: int, version: int) -> dict[str, Any]:
    # Rank 0's state fits the budget (one round); rank 1's takes many.
    sd = _small_tensors(10 * version + rank, 8 if rank == 0 else 72, prefix=f"r{rank}.")
    sd["shared"] = torch.arange(4096.0) + version  # replicated: written once
    return sd


@pytest.mark.slow
@pytest.mark.ranks(2, timeout=600)
def test_two_ranks_with_different_round_counts(rank: Any, tmp_path: Path) -> None:
    r = rank.rank
    os.environ[FAIL_ENV] = "write_round3:2:1"  # save 2, rank 1's fourth round; its worker inherits it
    root = tmp_path / "ckpts"
    with ac.AsyncCheckpointer(staging_budget=BUDGET, timeout=300.0) as c:
        sd = _rank_state(r, 0)
        want = copy.deepcopy(sd)
        c.save(sd, root / "a").result(300)
        assert c.staging_bytes <= BUDGET
        got = _load(root / "a", want)
        assert_state_dicts_equal(
            {k: v for k, v in got.items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in want.items() if isinstance(v, torch.Tensor)},
        )
        # Rank 1 cannot even prepare this save: rank 0's workers hear it while agreeing on the plan.
        bad = {**_rank_state(r, 1), "bad": object()} if r == 1 else _rank_state(r, 1)
        if r == 1:
            with pytest.raises((TypeError, ac.CheckpointError)):
                c.save(bad, root / "bad")
        else:
            with pytest.raises(ac.CheckpointError, match="preparing the state dict"):
                c.save(bad, root / "bad").result(300)
        rank.barrier()
        # Save 2 fails in rank 1's middle round: every rank's save fails, nothing is committed.
        with pytest.raises(ac.CheckpointError, match="write_round3"):
            c.save(_rank_state(r, 1), root / "b").result(300)
        assert not (root / "b").exists()
        rank.barrier()
        sd = _rank_state(r, 2)
        want = copy.deepcopy(sd)
        c.save(sd, root / "c").result(300)  # the cached plan, agreed before the first round
        got = _load(root / "c", want)
        assert_state_dicts_equal(
            {k: v for k, v in got.items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in want.items() if isinstance(v, torch.Tensor)},
        )
        assert c.staging_bytes <= BUDGET
    if r == 0:
        assert _leftovers(root) == []
