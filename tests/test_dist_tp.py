"""Tensor parallel round trip: a ColwiseParallel/RowwiseParallel MLP and its SGD state.

On 2 ranks: save model + optimizer, take a step (parameters change), load,
and check that the parameters and momentum buffers are the saved ones again.
Then build the same model on the meta device, parallelize it, and load its
``state_dict()``: the dict is filled in place with materialised DTensors, and
``load_state_dict(sd, assign=True)`` gives a model equal to the saved one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.testing import RankContext

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

TIMEOUT = 180.0  # generous: the 2-core machine is often shared
PLAN_KEYS = ("0", "2")


def _model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5))


def _parallel(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    # 6 hidden units over 2 ranks for the column shard; odd sizes keep it honest.
    return parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, generator=gen)
    opt.zero_grad()
    model(x).square().sum().backward()
    opt.step()


def _locals(sd: dict[str, Any]) -> dict[str, tuple[torch.Tensor, tuple[Any, ...]]]:
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in sd.items():
        assert isinstance(v, DTensor), (k, type(v))
        out[k] = (v.to_local().detach().clone(), tuple(v.placements))
    return out


def _assert_same(
    actual: dict[str, Any], expected: dict[str, tuple[torch.Tensor, Any]], rank: int, what: str
) -> None:
    from torch.distributed.tensor import DTensor

    assert set(actual) == set(expected), (what, set(actual) ^ set(expected))
    for k, (want, placements) in expected.items():
        got = actual[k]
        assert isinstance(got, DTensor), (what, k)
        assert not got.to_local().is_meta, (what, k)
        assert tuple(got.placements) == placements, (what, k, got.placements, placements)
        assert torch.equal(got.to_local().detach(), want), (
            f"rank {rank} {what} {k}: {got.to_local()} != {want}"
        )


def _tp_body(rank: int, world: int, path: str, model_path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world,))
    model = _parallel(_model(), mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt, seed=0)  # momentum buffers exist now

    md = ac.save({"model": model, "optim": opt}, path)
    assert md.tensors["model.0.weight"].shape == (6, 8)
    assert md.tensors["optim.state.0.momentum_buffer"].shape == (6, 8)
    ac.save(model.state_dict(), model_path)

    saved_params = _locals(model.state_dict())
    saved_momenta = {
        k: v.to_local().clone()
        for k, v in ((i, s["momentum_buffer"]) for i, s in opt.state_dict()["state"].items())
    }
    assert len(saved_momenta) == 4
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        saved_out = model(x).clone()

    _step(model, opt, seed=1)
    changed = _locals(model.state_dict())
    assert any(not torch.equal(changed[k][0], saved_params[k][0]) for k in saved_params), (
        "the step changed nothing"
    )

    param_objs = [id(p) for p in model.parameters()]
    ac.load({"model": model, "optim": opt}, path)
    assert [id(p) for p in model.parameters()] == param_objs
    _assert_same(model.state_dict(), saved_params, rank, "after load")
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(s["momentum_buffer"].to_local(), saved_momenta[i]), f"rank {rank} momentum {i}"
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    with torch.no_grad():
        assert torch.equal(model(x), saved_out)

    # The same model on the meta device: nothing allocated until the load.
    with torch.device("meta"):
        meta_model = _parallel(_model(), mesh)
    sd = meta_model.state_dict()
    assert all(v.to_local().is_meta for v in sd.values())
    sd_id, keys = id(sd), list(sd)
    ac.load(sd, model_path)
    assert id(sd) == sd_id and list(sd) == keys
    assert not any(isinstance(v, torch.Tensor) and (v.is_meta or v.to_local().is_meta) for v in sd.values())
    _assert_same(sd, saved_params, rank, "meta state dict")
    meta_model.load_state_dict(sd, assign=True)
    for name, p in meta_model.named_parameters():
        assert isinstance(p, DTensor) and not p.to_local().is_meta, name
    _assert_same(meta_model.state_dict(), saved_params, rank, "meta model after assign")
    with torch.no_grad():
        assert torch.equal(meta_model(x), saved_out)

    # A meta model passed as a Stateful is materialised by the load itself.
    with torch.device("meta"):
        meta_model2 = _parallel(_model(), mesh)
    ac.load({"model": meta_model2}, path)
    _assert_same(meta_model2.state_dict(), saved_params, rank, "meta Stateful model")


@pytest.mark.ranks(2, timeout=TIMEOUT)
def test_tensor_parallel_round_trip_and_meta_load(rank: RankContext, tmp_path: Path) -> None:
    _tp_body(rank.rank, rank.world_size, str(tmp_path / "ckpt"), str(tmp_path / "model_only"))
    if not rank.is_main:
        return
    md = ac.read_metadata(tmp_path / "ckpt")
    # Colwise shards rows, rowwise shards columns, the rowwise bias is replicated (one chunk).
    assert len(md.tensors["model.0.weight"].chunks) == 2
    assert len(md.tensors["model.2.weight"].chunks) == 2
    assert {c.sizes for c in md.tensors["model.2.weight"].chunks} == {(5, 3)}
    assert len(md.tensors["model.2.bias"].chunks) == 1
    assert md.values["optim.param_groups.0.lr"].value == 0.1
