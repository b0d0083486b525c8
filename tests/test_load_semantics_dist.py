"""Load semantics across ranks (gloo): agreement before finishing, one call order, FSDP2 lists.

Each test spawns real ranks through ``tests/harness.py::run_ranks``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks
from torch import nn

import async_ckpt as ac

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

# ---------------------------------------------------------------- item 5: agree, then finish


class Logged(nn.Linear):
    def __init__(self) -> None:
        super().__init__(4, 3)
        self.loads = 0

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self.loads += 1
        return super().load_state_dict(*args, **kwargs)


def _one_rank_fails(rank: int, world: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    ac.save({"model": Logged(), "step": 5}, Path(root) / "c")
    torch.manual_seed(100 + rank)
    model = Logged()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target: dict[str, Any] = {"model": model, "step": 0}
    if rank == 1:
        target["not_saved"] = torch.zeros(2)  # only rank 1's load fails
    try:
        ac.load(target, Path(root) / "c")
    except ac.CheckpointError as exc:
        error = str(exc)
    else:
        error = ""
    return {
        "error": error,
        "unchanged": all(torch.equal(model.state_dict()[k], v) for k, v in before.items()),
        "loads": model.loads,
        "step": target["step"],
    }


def test_a_rank_whose_load_would_succeed_stays_untouched_when_another_fails(tmp_path: Path) -> None:
    out = run_ranks(2, _one_rank_fails, str(tmp_path), timeout=240)
    for rank, r in enumerate(out):
        assert "not_saved" in r["error"], (rank, r)
        assert r["unchanged"], f"rank {rank}: the model was changed by a failed load"
        assert r["loads"] == 0 and r["step"] == 0, (rank, r)


# ---------------------------------------------------------------- item 14: one order on every rank


class Collective:
    """A Stateful whose state_dict/load_state_dict run a collective naming itself."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _agree(self, what: str) -> None:
        names: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(names, f"{what} {self.name}")
        if len(set(names)) != 1:
            raise AssertionError(f"ranks ran different collectives at once: {names}")

    def state_dict(self) -> dict[str, Any]:
        self._agree("state_dict")
        return {"v": torch.ones(2)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._agree("load_state_dict")


def _collectives_in_statefuls(rank: int, world: int, root: str) -> str:
    order = ["A", "B"] if rank == 0 else ["B", "A"]
    ac.save({k: Collective(k) for k in order}, Path(root) / "c")
    ac.load({k: Collective(k) for k in order}, Path(root) / "c")
    return "ok"


def test_statefuls_with_collectives_in_different_key_orders_do_not_deadlock(tmp_path: Path) -> None:
    # A short process-group timeout: a regression fails in seconds rather than hanging.
    assert run_ranks(2, _collectives_in_statefuls, str(tmp_path), timeout=240, pg_timeout=20) == ["ok"] * 2


# ---------------------------------------------------------------- item 16 with FSDP2 and DTensor


def _fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4))
    fully_shard(model[0])
    fully_shard(model[1])
    fully_shard(model)
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(2, 4, generator=torch.Generator().manual_seed(1))).sum().backward()
    opt.step()
    opt.zero_grad()


def _fsdp_param_groups(rank: int, world: int, root: str, save_all: bool) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = _fsdp_model()
    opt = torch.optim.Adam(model.parameters() if save_all else model[1].parameters(), lr=0.01)
    _step(model, opt)
    msd, osd = get_state_dict(model, opt)
    saved_params = list(osd["param_groups"][0]["params"])
    saved_avg = osd["state"]["1.weight"]["exp_avg"].full_tensor()
    ac.save({"model": msd, "optim": osd}, Path(root) / "c")

    # The next run trains the other set of parameters: its param list has another length.
    torch.manual_seed(1)
    model2 = _fsdp_model()
    opt2 = torch.optim.Adam(model2[1].parameters() if save_all else model2.parameters(), lr=0.5)
    _step(model2, opt2)
    msd2, osd2 = get_state_dict(model2, opt2)
    target_len = len(osd2["param_groups"][0]["params"])
    ac.load({"model": msd2, "optim": osd2}, Path(root) / "c", strict=False)
    group = osd2["param_groups"][0]
    loaded_avg = osd2["state"]["1.weight"]["exp_avg"]
    return {
        "saved": saved_params,
        "target_len": target_len,
        "loaded": list(group["params"]),
        "lr": group["lr"],
        "same_avg": bool(torch.equal(loaded_avg.full_tensor(), saved_avg)),
        "is_dtensor": type(loaded_avg).__name__ == "DTensor",
        "same_weight": all(torch.equal(msd2[k].full_tensor(), v.full_tensor()) for k, v in msd.items()),
    }


@pytest.mark.parametrize("save_all", [True, False], ids=["shorter-target", "longer-target"])
def test_fsdp2_param_group_lists_of_another_length_load(tmp_path: Path, save_all: bool) -> None:
    out = run_ranks(2, _fsdp_param_groups, str(tmp_path), save_all, timeout=300)
    for r in out:
        assert r["target_len"] != len(r["saved"])
        assert r["loaded"] == r["saved"], r
        assert r["lr"] == 0.01
        assert r["same_weight"]
        assert r["same_avg"] and r["is_dtensor"]
