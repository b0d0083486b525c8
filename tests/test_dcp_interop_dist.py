"""DCP checkpoints saved by ``dcp.save`` on 4 gloo ranks (DTensor state, an optimizer) read by ``ac.load``.

The acceptance case of DCP reading: loaded on 2 ranks under other placements,
and into one process with plain tensors, every tensor and value bit for bit
what ``dcp.load`` gives for an identical target.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from harness import run_ranks
from torch import nn

import async_ckpt as ac

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

TIMEOUT = 300.0  # generous: 4 spawned ranks on a shared 2-core machine

# name -> global shape; uneven over 4 and 2 ranks.
SHAPES = {"w1": (10, 6), "w2": (5, 7), "b": (6,)}


def full(name: str, salt: str = "") -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32((name + salt).encode()))
    return torch.randn(SHAPES[name], generator=g)


def _params(mesh: Any, placements: dict[str, Any], salt: str) -> dict[str, nn.Parameter]:
    if mesh is None:
        return {n: nn.Parameter(full(n, salt)) for n in SHAPES}
    from torch.distributed.tensor import distribute_tensor

    return {n: nn.Parameter(distribute_tensor(full(n, salt), mesh, placements[n])) for n in SHAPES}


def _stepped(params: dict[str, nn.Parameter], mesh: Any, placements: dict[str, Any], salt: str) -> Any:
    """An AdamW over ``params`` after two steps with deterministic gradients: it has state."""
    opt = torch.optim.AdamW(list(params.values()), lr=0.01, betas=(0.8, 0.9))
    for step in range(2):
        for n, p in params.items():
            if mesh is None:
                p.grad = full(n, f"grad{step}{salt}")
            else:
                from torch.distributed.tensor import distribute_tensor

                p.grad = distribute_tensor(full(n, f"grad{step}{salt}"), mesh, placements[n])
        opt.step()
    return opt


def _state(mesh: Any, placements: dict[str, Any], salt: str) -> dict[str, Any]:
    params = _params(mesh, placements, salt)
    opt = _stepped(params, mesh, placements, salt)
    return {"model": params, "optim": opt, "step": 7 if salt == "" else 0, "note": f"saved{salt}"}


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _snapshot(node: Any) -> Any:
    if isinstance(node, torch.optim.Optimizer):
        return _snapshot(node.state_dict())
    if isinstance(node, torch.Tensor):
        local = node.to_local() if hasattr(node, "to_local") else node
        return (local.dtype, tuple(node.shape), tuple(local.shape), _bits(local))
    if isinstance(node, dict):
        return {k: _snapshot(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return (type(node).__name__, [_snapshot(v) for v in node])
    return node


def _save_on_4(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    placements = {"w1": [Shard(0)], "w2": [Shard(1)], "b": [Replicate()]}
    dcp.save(_state(mesh, placements, ""), checkpoint_id=path)


def _load_on_2(rank: int, world: int, path: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (world,))
    # Other placements than saved: w1 across the other dim, w2 by rows, b sharded.
    placements = {"w1": [Shard(1)], "w2": [Shard(0)], "b": [Shard(0)]}
    ours, theirs = _state(mesh, placements, "x"), _state(mesh, placements, "x")
    before = _snapshot(ours)
    ac.load(ours, path)
    dcp.load(theirs, checkpoint_id=path)
    assert _snapshot(ours) == _snapshot(theirs)
    assert _snapshot(ours) != before
    assert ours["step"] == 7 and ours["note"] == "saved"
    return {"exp_avg": len(ours["optim"].state_dict()["state"])}


@pytest.fixture(scope="module")
def dcp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcp4") / "ckpt"
    run_ranks(4, _save_on_4, str(path), timeout=TIMEOUT)
    assert sorted(p.name for p in path.iterdir()) == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    return path


def test_dcp_checkpoint_from_4_ranks_loads_on_2_ranks_bit_exact_against_dcp_load(dcp4: Path) -> None:
    results = run_ranks(2, _load_on_2, str(dcp4), timeout=TIMEOUT)
    assert results == [{"exp_avg": 3}] * 2


def test_dcp_checkpoint_from_4_ranks_loads_into_one_process_bit_exact_against_dcp_load(dcp4: Path) -> None:
    ours, theirs = _state(None, {}, "y"), _state(None, {}, "y")
    before = _snapshot(ours)
    ac.load(ours, dcp4)
    dcp.load(theirs, checkpoint_id=str(dcp4))
    assert _snapshot(ours) == _snapshot(theirs)
    assert _snapshot(ours) != before
    md = ac.read_metadata(dcp4)
    assert md.world_size == 4
    assert {len(md.tensors[f"model.{n}"].chunks) for n in ("w1", "w2")} == {4}


def test_dcp_checkpoint_loads_into_meta_device_tensors(dcp4: Path) -> None:
    target = {"model": {n: torch.empty(SHAPES[n], device="meta") for n in SHAPES}}
    ac.load(target, dcp4, strict=False)
    reference = {"model": {n: torch.zeros(SHAPES[n]) for n in SHAPES}}
    dcp.load(reference, checkpoint_id=str(dcp4))
    assert _snapshot(target) == _snapshot(reference)
