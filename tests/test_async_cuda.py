"""The async save path with CUDA tensors: pinned staging, D2H copies, overlap mode.

Skipped without a GPU. Everything runs on one checkpointer (one worker start).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.testing import same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "model": {
            "w": torch.randn(4 << 20, device="cuda", generator=g),  # 16 MiB
            "bf16": torch.randn(257, 129, device="cuda", generator=g).to(torch.bfloat16),
            "t": torch.randn(64, 48, device="cuda", generator=g).t(),  # non-contiguous
            "i": torch.arange(1000, device="cuda") * seed,
            "cpu": torch.randn(100, generator=torch.Generator().manual_seed(seed)),
        },
        "step": seed,
    }


def _clone(sd: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: v.detach().clone() for k, v in sd["model"].items()}, "step": sd["step"]}


def _check(path: Path, want: dict[str, Any], device: str) -> None:
    target = {
        "model": {k: torch.zeros(v.shape, dtype=v.dtype, device=device) for k, v in want["model"].items()},
        "step": -1,
    }
    ac.load(target, path)
    for k, v in want["model"].items():
        assert target["model"][k].device.type == device, k
        assert same_bits(target["model"][k], v), k
    assert target["step"] == want["step"]


@pytest.fixture(scope="module")
def ck() -> Iterator[ac.AsyncCheckpointer]:
    with ac.AsyncCheckpointer(start=True, timeout=60) as c:
        yield c


def test_pinned_staging_and_d2h_round_trip(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(1)
    want = _clone(sd)
    p = ck.save(sd, tmp_path / "a")
    slots = ck._pool.slots()
    assert slots and slots[0].pinned, "staging buffers are not pinned under CUDA"
    # Staged: the caller may overwrite its GPU tensors at once.
    with torch.no_grad():
        for v in sd["model"].values():
            v.zero_()
    torch.cuda.synchronize()
    md = p.result(timeout=120)
    assert md.tensors["model.w"].shape == (4 << 20,)
    _check(tmp_path / "a", want, "cuda")
    _check(tmp_path / "a", want, "cpu")


def test_overlap_mode_with_cuda_tensors(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(2)
    want = _clone(sd)
    p = ck.save(sd, tmp_path / "ov", overlap=True)
    # Work queued on the default stream while staging runs on the side stream.
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(5):
        x = x @ x
        x = x / x.norm()
    p.staged.wait(timeout=60)
    with torch.no_grad():
        for v in sd["model"].values():
            v.add_(1)
    md = p.result(timeout=120)
    assert md.stats is not None
    _check(tmp_path / "ov", want, "cuda")


@pytest.mark.asyncio
async def test_async_overlap_mode_with_cuda_tensors(ck: ac.AsyncCheckpointer, tmp_path: Path) -> None:
    sd = _state(3)
    want = _clone(sd)
    p = await ck.async_save(sd, tmp_path / "aov", overlap=True)
    await p.staged
    with torch.no_grad():
        for v in sd["model"].values():
            v.mul_(-1)
    md = await p
    assert md.stats is not None
    # Same layout again: cached plan, same pinned slot.
    allocations = ck._pool.allocations
    md2 = await (await ck.async_save(sd, tmp_path / "aov2"))
    assert md2.stats is not None and md2.stats.plan_cached
    assert ck._pool.allocations == allocations and ck._pool.slots()[0].pinned
    _check(tmp_path / "aov", want, "cuda")
