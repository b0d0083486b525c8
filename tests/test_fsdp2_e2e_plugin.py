"""FSDP2 save and resume on the async_ckpt.testing plugin, in the style of PyTorch's DCP e2e tests.

A model is trained with FSDP2 (``fully_shard``) on 4 ranks and saved with
``async_save``; the reference is its full (unsharded) state taken at the same
moment. Resuming on 2 ranks and on 4 must give that state back bit for bit,
model and optimizer, DTensors compared by their full tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks
from torch import nn

import async_ckpt as ac
from async_ckpt.testing import assert_state_dicts_equal

pytestmark = pytest.mark.slow

MODELS = ["flat", "nested"]


def _model(kind: str, seed: int) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    if kind == "flat":
        model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    else:
        model = nn.Sequential(
            nn.Sequential(nn.Linear(16, 24), nn.LayerNorm(24)), nn.ReLU(), nn.Linear(24, 7, bias=False)
        )
    for layer in model:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    return model


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        model(torch.randn(4, 16, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _sharded(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd, "step": 3}


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    return {"model": msd, "optim": osd, "step": 3}


def _train_and_save_on_4(rank: int, world: int, root: str, kind: str) -> None:
    import asyncio

    model = _model(kind, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, steps=3, rank=rank)
    state = _sharded(model, opt)

    async def save() -> None:
        await (await ac.async_save(state, Path(root) / "ckpt"))

    asyncio.run(save())
    full = _full(model, opt)
    if rank == 0:
        torch.save(full, Path(root) / "full.pt")


@pytest.fixture(scope="module", params=MODELS)
def saved_on_4(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """A checkpoint saved by 4 FSDP2 ranks with async_save, and its full state beside it."""
    kind = request.param
    root = tmp_path_factory.mktemp(f"fsdp2_{kind}")
    run_ranks(4, _train_and_save_on_4, str(root), kind, timeout=300)
    return kind, root


def _resume(kind: str, checkpoint: Path) -> dict[str, Any]:
    # Another seed: anything not loaded shows as a difference.
    model = _model(kind, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    _train(model, opt, steps=1, rank=99)  # the optimizer has state to overwrite
    state = _sharded(model, opt)
    state["step"] = 0
    ac.load(state, checkpoint)
    return state


@pytest.mark.ranks(2)
def test_fsdp2_saved_on_4_resumes_on_2_bit_exact(saved_on_4: tuple[str, Path]) -> None:
    kind, root = saved_on_4
    state = _resume(kind, root / "ckpt")
    assert_state_dicts_equal(state, torch.load(root / "full.pt", weights_only=True))


@pytest.mark.ranks(4)
def test_fsdp2_saved_on_4_resumes_on_4_bit_exact(saved_on_4: tuple[str, Path]) -> None:
    kind, root = saved_on_4
    state = _resume(kind, root / "ckpt")
    assert_state_dicts_equal(state, torch.load(root / "full.pt", weights_only=True))


@pytest.mark.ranks(2)
async def test_fsdp2_resumed_on_2_saves_async_and_reloads_bit_exact(
    saved_on_4: tuple[str, Path], ckpt_dir: Path
) -> None:
    kind, root = saved_on_4
    await (await ac.async_save(_resume(kind, root / "ckpt"), ckpt_dir))
    state = _resume(kind, ckpt_dir)
    assert_state_dicts_equal(state, torch.load(root / "full.pt", weights_only=True))


@pytest.mark.ranks(2)
def test_fsdp2_resume_from_a_missing_checkpoint_names_it(ckpt_dir: Path) -> None:
    model = _model("flat", seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    with pytest.raises(ac.CheckpointError, match="ckpt"):
        ac.load(_sharded(model, opt), ckpt_dir)
