"""What a load does to its target: extra keys, failures, ties, namedtuples, plain lists, Statefuls.

Single process, real checkpoints under ``tmp_path``. The multi-rank cases are in
test_load_semantics_dist.py.
"""

from __future__ import annotations

import shutil
import typing
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import async_ckpt as ac

FIXTURES = Path(__file__).parent / "fixtures"

# ---------------------------------------------------------------- helpers


class Net(nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        if extra:
            self.register_buffer("extra", torch.arange(4.0))
            self.more = nn.Linear(2, 2)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.mid = nn.Linear(3, 3)
        self.lm_head = nn.Linear(3, 5, bias=False)
        self.lm_head.weight = self.embed.weight


class Recorder:
    """A Stateful that records its calls."""

    def __init__(self, value: torch.Tensor, fail: Exception | None = None) -> None:
        self.value = value
        self.fail = fail
        self.calls: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        self.calls.append("state_dict")
        return {"v": self.value}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.calls.append("load_state_dict")
        if self.fail is not None:
            raise self.fail
        self.value = sd["v"]


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(now[k], v), f"{k} changed by a failed load"


# ---------------------------------------------------------------- item 6: extra keys, errors


@pytest.mark.parametrize("strict", [True, False])
def test_extra_checkpoint_keys_under_a_module_are_ignored(tmp_path: Path, strict: bool) -> None:
    torch.manual_seed(0)
    src = Net(extra=True)
    ac.save({"m": src}, tmp_path / "c")
    torch.manual_seed(1)
    dst = Net()
    weight = dst.fc.weight
    ac.load({"m": dst}, tmp_path / "c", strict=strict)
    assert dst.fc.weight is weight
    assert torch.equal(dst.fc.weight, src.fc.weight) and torch.equal(dst.fc.bias, src.fc.bias)
    assert not hasattr(dst, "extra") and not hasattr(dst, "more")


def test_extra_checkpoint_keys_under_a_meta_module_are_ignored(tmp_path: Path) -> None:
    src = Net(extra=True)
    ac.save({"m": src}, tmp_path / "c")
    with torch.device("meta"):
        dst = Net()
    ac.load({"m": dst}, tmp_path / "c")
    assert not dst.fc.weight.is_meta
    assert isinstance(dst.fc.weight, nn.Parameter)
    assert torch.equal(dst.fc.weight, src.fc.weight)
    assert list(dst.state_dict()) == ["fc.weight", "fc.bias"]


def test_a_failed_load_leaves_the_module_untouched(tmp_path: Path) -> None:
    """A key missing from the checkpoint is found before anything in the target changes."""
    torch.manual_seed(0)
    ac.save({"m": Net(), "step": 3}, tmp_path / "c")
    torch.manual_seed(1)
    dst = Net()
    rec = Recorder(torch.zeros(2))
    before = snapshot(dst)
    target = {"m": dst, "r": rec, "step": 0}
    with pytest.raises(ac.CheckpointError, match=r"'r\.v'"):
        ac.load(target, tmp_path / "c")
    assert_unchanged(dst, before)
    assert target["step"] == 0
    assert "load_state_dict" not in rec.calls


def test_a_shape_mismatch_after_a_module_leaves_it_untouched(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ac.save({"a": Net(), "b": torch.zeros(3)}, tmp_path / "c")
    dst = Net()
    before = snapshot(dst)
    with pytest.raises(ac.CheckpointError, match="'b': shape mismatch"):
        ac.load({"a": dst, "b": torch.zeros(4)}, tmp_path / "c")
    assert_unchanged(dst, before)


def test_an_error_from_load_state_dict_is_a_checkpoint_error_naming_the_key(tmp_path: Path) -> None:
    ac.save({"obj": Recorder(torch.ones(2))}, tmp_path / "c")
    rec = Recorder(torch.zeros(2), fail=ValueError("group sizes differ"))
    with pytest.raises(ac.CheckpointError, match=r"'obj'.*group sizes differ") as info:
        ac.load({"obj": rec}, tmp_path / "c")
    assert isinstance(info.value.__cause__, ValueError)


# ---------------------------------------------------------------- item 7: ties


def test_tied_weights_survive_a_meta_device_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = Tied()
    ac.save({"model": src}, tmp_path / "c")
    with torch.device("meta"):
        dst = Tied()
    assert dst.lm_head.weight is dst.embed.weight
    ac.load({"model": dst}, tmp_path / "c")
    assert dst.lm_head.weight is dst.embed.weight
    assert isinstance(dst.embed.weight, nn.Parameter) and not dst.embed.weight.is_meta
    assert torch.equal(dst.embed.weight, src.embed.weight)
    assert torch.equal(dst.mid.weight, src.mid.weight)
    # One storage: an update through one name is seen through the other.
    with torch.no_grad():
        dst.embed.weight[0, 0] = 42.0
    assert dst.lm_head.weight[0, 0].item() == 42.0


def test_tied_meta_tensors_in_a_plain_state_dict_share_one_tensor(tmp_path: Path) -> None:
    src = Tied()
    ac.save({"model": src.state_dict()}, tmp_path / "c")
    with torch.device("meta"):
        dst = Tied()
    sd = dst.state_dict()
    ac.load({"model": sd}, tmp_path / "c")
    assert sd["embed.weight"] is sd["lm_head.weight"]
    dst.load_state_dict(sd, assign=True)
    assert dst.lm_head.weight.data_ptr() == dst.embed.weight.data_ptr()
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)


def test_tied_weights_of_a_real_module_stay_tied(tmp_path: Path) -> None:
    src = Tied()
    ac.save({"model": src}, tmp_path / "c")
    dst = Tied()
    ac.load({"model": dst}, tmp_path / "c")
    assert dst.lm_head.weight is dst.embed.weight
    assert torch.equal(dst.embed.weight, src.embed.weight)


# ---------------------------------------------------------------- item 8: namedtuples, torch.Size

Pair = namedtuple("Pair", ["w", "n"])


class Box(typing.NamedTuple):
    lo: Any
    hi: Any


def test_namedtuples_come_back_as_their_type(tmp_path: Path) -> None:
    src = {
        "p": Pair(torch.arange(3.0), 7),
        "q": Pair("a", (1, 2)),
        "nest": [Box(torch.ones(2), Pair(torch.zeros(1), "x")), 5],
    }
    ac.save(src, tmp_path / "c")
    target = {
        "p": Pair(torch.zeros(3), 0),
        "q": Pair("", ()),
        "nest": [Box(torch.zeros(2), Pair(torch.ones(1), "")), 0],
    }
    w = target["p"].w
    ac.load(target, tmp_path / "c")
    assert type(target["p"]) is Pair and target["p"].w is w
    assert torch.equal(w, torch.arange(3.0)) and target["p"].n == 7
    assert target["q"] == Pair("a", (1, 2)) and type(target["q"]) is Pair
    box = target["nest"][0]
    assert type(box) is Box and type(box.hi) is Pair
    assert torch.equal(box.lo, torch.ones(2)) and torch.equal(box.hi.w, torch.zeros(1))
    assert box.hi.n == "x" and target["nest"][1] == 5


def test_namedtuple_fields_are_recorded_in_the_tree(tmp_path: Path) -> None:
    md = ac.save({"p": Pair(torch.ones(1), 2)}, tmp_path / "c")
    assert md.tree == {"d": [["p", {"n": [["w", {"x": "p.0"}], ["n", {"x": "p.1"}]]}]]}


def test_a_namedtuple_with_other_fields_is_refused(tmp_path: Path) -> None:
    ac.save({"p": Pair(torch.ones(1), 2)}, tmp_path / "c")
    with pytest.raises(ac.CheckpointError, match=r"'p'.*fields"):
        ac.load({"p": Box(torch.zeros(1), 0)}, tmp_path / "c")


def test_torch_size_round_trips_as_a_value(tmp_path: Path) -> None:
    src = {"shape": torch.Size([2, 3]), "shapes": [torch.Size([1]), torch.Size([])], "t": torch.ones(1)}
    md = ac.save(src, tmp_path / "c")
    assert "shape" in md.values and "shape.0" not in md.values
    target: dict[str, Any] = {"shape": None, "shapes": None, "t": torch.zeros(1)}
    ac.load(target, tmp_path / "c")
    assert type(target["shape"]) is torch.Size and target["shape"] == torch.Size([2, 3])
    assert [type(s) for s in target["shapes"]] == [torch.Size, torch.Size]
    assert target["shapes"] == [torch.Size([1]), torch.Size([])]


# ---------------------------------------------------------------- item 16: plain lists


def test_a_plain_list_is_one_value_replaced_whole(tmp_path: Path) -> None:
    md = ac.save({"names": ["a.w", "a.b"], "nested": [[1, 2], ("x", None)]}, tmp_path / "c")
    assert set(md.values) == {"names", "nested"}
    shorter: dict[str, Any] = {"names": ["x"], "nested": []}
    names = shorter["names"]
    ac.load(shorter, tmp_path / "c")
    assert shorter == {"names": ["a.w", "a.b"], "nested": [[1, 2], ("x", None)]}
    assert shorter["names"] is names  # lists are still filled in place
    longer: dict[str, Any] = {"names": [f"p{i}" for i in range(12)], "nested": [[0], [0], [0]]}
    ac.load(longer, tmp_path / "c")
    assert longer["names"] == ["a.w", "a.b"]
    assert type(longer["nested"][1]) is tuple


def test_a_target_may_hold_any_plain_value_where_a_plain_list_was_saved(tmp_path: Path) -> None:
    ac.save({"a": [1, 2], "b": (3, 4), "c": []}, tmp_path / "c")
    target: dict[str, Any] = {"a": None, "b": 0, "c": "text"}
    ac.load(target, tmp_path / "c")
    assert target == {"a": [1, 2], "b": (3, 4), "c": []}
    assert type(target["b"]) is tuple


def test_lists_holding_tensors_or_dicts_keep_per_index_keys(tmp_path: Path) -> None:
    src = {"tl": [torch.ones(2), 3], "dl": [{"lr": 0.1, "params": [0, 1]}]}
    md = ac.save(src, tmp_path / "c")
    assert "tl.0" in md.tensors and "tl.1" in md.values
    assert "dl.0.params" in md.values and "dl.0.lr" in md.values
    target: dict[str, Any] = {"tl": [torch.zeros(2), 0], "dl": [{"lr": 0.0, "params": [5, 6, 7]}]}
    ac.load(target, tmp_path / "c")
    assert torch.equal(target["tl"][0], torch.ones(2)) and target["tl"][1] == 3
    assert target["dl"] == [{"lr": 0.1, "params": [0, 1]}]


def test_param_group_lists_of_another_length_load(tmp_path: Path) -> None:
    """Fine-tuning: the optimizer's param lists change length between runs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    ac.save({"optim": opt.state_dict()}, tmp_path / "c")
    small = torch.optim.SGD(model[1].parameters(), lr=0.5, momentum=0.9)
    target = {"optim": small.state_dict()}
    ac.load(target, tmp_path / "c", strict=False)
    assert target["optim"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert target["optim"]["param_groups"][0]["lr"] == 0.1


def test_a_checkpoint_with_per_index_plain_lists_still_loads(tmp_path: Path) -> None:
    """tests/fixtures/v1_plain_lists was written by the code before plain lists became values."""
    ckpt = tmp_path / "old"
    shutil.copytree(FIXTURES / "v1_plain_lists", ckpt)
    assert ac.read_metadata(ckpt).values.keys() >= {"names.0", "nested.1.1"}
    target: dict[str, Any] = {
        "w": torch.zeros(2, 3),
        "tl": [torch.zeros(2), torch.zeros(3)],
        "optim": {"param_groups": [{"params": ["only"], "lr": 0.0, "betas": (0.0, 0.0)}]},
        "names": [],
        "nested": None,
        "empty": ["stale"],
        "step": 0,
    }
    ac.load(target, ckpt)
    assert torch.equal(target["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(target["tl"][1], torch.full((3,), 2.0))
    group = target["optim"]["param_groups"][0]
    assert group == {"params": ["a.w", "a.b"], "lr": 0.1, "betas": (0.9, 0.99)}
    assert type(group["betas"]) is tuple
    assert target["names"] == ["x", "y", "z"]
    assert target["nested"] == [[1, 2], (3, "s")]
    assert target["empty"] == [] and target["step"] == 7


def test_old_checkpoint_rebuilds_plain_lists_a_stateful_lacks(tmp_path: Path) -> None:
    ckpt = tmp_path / "old"
    shutil.copytree(FIXTURES / "v1_plain_lists", ckpt)

    class Bag:
        def __init__(self) -> None:
            self.sd: dict[str, Any] = {}

        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            self.sd = sd

    bag = Bag()
    ac.load({"optim": bag}, ckpt, strict=False)
    assert bag.sd == {"param_groups": [{"params": ["a.w", "a.b"], "lr": 0.1, "betas": (0.9, 0.99)}]}


# ---------------------------------------------------------------- item 17: Statefuls stay put


class SpyDict(dict):  # type: ignore[type-arg]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[Any] = []

    def __setitem__(self, key: Any, value: Any) -> None:
        self.writes.append(key)
        super().__setitem__(key, value)


def test_load_does_not_write_statefuls_back_into_their_parent(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ac.save({"m": Net(), "opt": Recorder(torch.ones(2)), "t": torch.ones(1)}, tmp_path / "c")
    target = SpyDict(m=Net(), opt=Recorder(torch.zeros(2)), t=torch.zeros(1))
    ac.load(target, tmp_path / "c")
    assert target.writes == []
    assert torch.equal(target["opt"].value, torch.ones(2)) and torch.equal(target["t"], torch.ones(1))


# ---------------------------------------------------------------- item 14 (order) in one process


class Ordered:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def state_dict(self) -> dict[str, Any]:
        self.log.append(f"state_dict {self.name}")
        return {"x": torch.ones(1)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.log.append(f"load_state_dict {self.name}")


def test_statefuls_are_called_in_key_order(tmp_path: Path) -> None:
    log: list[str] = []
    ac.save({"b": Ordered("b", log), "a": Ordered("a", log)}, tmp_path / "c")
    assert log == ["state_dict a", "state_dict b"]
    log.clear()
    ac.load({"b": Ordered("b", log), "a": Ordered("a", log)}, tmp_path / "c")
    assert log == ["state_dict a", "state_dict b", "load_state_dict a", "load_state_dict b"]


def test_statefuls_inside_statefuls_are_loaded_before_their_parent(tmp_path: Path) -> None:
    class Parent(Ordered):
        def __init__(self, log: list[str]) -> None:
            super().__init__("parent", log)
            self.child = Ordered("child", log)

        def state_dict(self) -> dict[str, Any]:
            self.log.append("state_dict parent")
            return {"child": self.child, "y": torch.ones(1)}

    log: list[str] = []
    ac.save({"p": Parent(log), "a": Ordered("a", log)}, tmp_path / "c")
    assert log == ["state_dict a", "state_dict parent", "state_dict child"]
    log.clear()
    ac.load({"p": Parent(log), "a": Ordered("a", log)}, tmp_path / "c")
    assert log[:3] == ["state_dict a", "state_dict parent", "state_dict child"]
    assert log[3:] == ["load_state_dict child", "load_state_dict a", "load_state_dict parent"]


# ---------------------------------------------------------------- dtype: refused, or cast on request


def test_a_dtype_mismatch_raises_unless_cast_is_asked_for(tmp_path: Path) -> None:
    src = torch.tensor([1.5, -2.25, 3.0])
    ac.save({"w": src, "m": Net()}, tmp_path / "c")
    target = {"w": torch.zeros(3, dtype=torch.bfloat16), "m": Net().to(torch.float64)}
    with pytest.raises(ac.CheckpointError, match="dtype mismatch"):
        ac.load(target, tmp_path / "c")
    w = target["w"]
    ac.load(target, tmp_path / "c", cast=True)
    assert target["w"] is w and w.dtype == torch.bfloat16
    assert torch.equal(w, src.to(torch.bfloat16))
    assert target["m"].fc.weight.dtype == torch.float64


def test_convert_to_torch_rebuilds_namedtuples_and_plain_lists(tmp_path: Path) -> None:
    from async_ckpt.cli import main

    ac.save({"p": Pair(torch.ones(2), 3), "names": ["a", "b"]}, tmp_path / "c")
    assert main(["convert", str(tmp_path / "c"), "--to", "torch", str(tmp_path / "out.pt")]) == 0
    state = torch.load(tmp_path / "out.pt", weights_only=True)
    assert set(state) == {"p", "names"}
    assert type(state["p"]) is tuple and torch.equal(state["p"][0], torch.ones(2)) and state["p"][1] == 3
    assert state["names"] == ["a", "b"]
