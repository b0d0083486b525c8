"""Ranks that disagree on ``staging_budget`` get an error that says so, on every rank, at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.errors import CheckpointError


@pytest.mark.slow
@pytest.mark.parametrize("budgeted", [0, 1])
@pytest.mark.ranks(2, timeout=600)
def test_ranks_with_different_staging_budgets_fail_naming_the_option(
    rank: Any, ckpt_dir: Path, budgeted: int
) -> None:
    # One rank saves in rounds, the other as usual: their workers run different
    # collectives, which used to surface as a TypeError from deep in the worker
    # (or, with the coordinator unbudgeted, carry on planning with mismatched steps).
    budget = 1 << 20 if rank.rank == budgeted else None
    state = {"w": torch.arange(1 << 20, dtype=torch.float32), "b": torch.ones(10)}
    with ac.AsyncCheckpointer(staging_budget=budget, timeout=120) as ck:
        with pytest.raises(CheckpointError, match="staging_budget") as info:
            ck.save(state, ckpt_dir / "a").result(timeout=300)
        assert f"ranks [{budgeted}] save in rounds" in str(info.value), str(info.value)
    assert not (ckpt_dir / "a" / "metadata.json").exists()
