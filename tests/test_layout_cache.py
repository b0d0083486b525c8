"""The trainer's plan cache: reused while the state dict keeps its structure, never across structures."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

import async_ckpt as ac
from async_ckpt.layout_cache import LayoutCache
from async_ckpt.state_dict import flatten


class _Pair(NamedTuple):
    a: Any
    b: Any


def _prepare(cache: LayoutCache, sd: dict[str, Any]) -> Any:
    return cache.prepare(flatten(sd), allow_pickle=False, verify_replicas=False)


def test_same_structure_hits_and_takes_fresh_tensors_and_values() -> None:
    cache = LayoutCache()
    first = _prepare(cache, {"w": torch.zeros(3), "step": 1, "nested": {"b": torch.ones(2)}})
    t = torch.full((3,), 7.0)
    again = _prepare(cache, {"w": t, "step": 2, "nested": {"b": torch.ones(2)}})
    assert cache.hits == 1 and again.layout_id == first.layout_id
    assert again.local.tensors[("w", (0,))] is t
    assert again.local.values != first.local.values  # step 1 -> 2


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({1: torch.zeros(2)}, {True: torch.zeros(2)}),  # 1 == True in Python, not in the tree
        ({1: torch.zeros(2)}, {1.0: torch.zeros(2)}),
        ({"1": torch.zeros(2)}, {1: torch.zeros(2)}),  # the same leaf name "x.1"
        ([torch.zeros(2)], (torch.zeros(2),)),  # list and tuple
        ([torch.zeros(2)], {"0": torch.zeros(2)}),
        ({"a": torch.zeros(2), "e": []}, {"a": torch.zeros(2), "e": {}}),  # empty containers
        ({1: {}}, {True: {}}),  # no leaf names to tell them apart
        ({"1": {}}, {1: {}}),
        ({1.0: []}, {1: []}),
        ({"a": torch.zeros(2)}, collections.OrderedDict(a=torch.zeros(2))),
        (collections.defaultdict(list, a=torch.zeros(2)), collections.defaultdict(int, a=torch.zeros(2))),
        ((torch.zeros(2), torch.ones(2)), _Pair(torch.zeros(2), torch.ones(2))),
        ([torch.zeros(2, dtype=torch.float64)], [np.zeros(2)]),  # saved as a tensor, loaded as an array
        ([torch.zeros(2), {}], [torch.zeros(2), {"k": {}}]),
    ],
    ids=[
        "int-bool",
        "int-float",
        "str-int",
        "list-tuple",
        "list-dict",
        "empty-list-dict",
        "empty-int-bool",
        "empty-str-int",
        "empty-float-int",
        "dict-ordered",
        "defaultdict-factory",
        "tuple-namedtuple",
        "tensor-numpy",
        "nested-empty",
    ],
)
def test_a_different_tree_with_the_same_leaves_is_a_miss(a: Any, b: Any) -> None:
    cache = LayoutCache()
    pa = _prepare(cache, {"x": a})
    pb = _prepare(cache, {"x": b})
    assert cache.hits == 0
    assert pb.tree == flatten({"x": b}).tree and pb.layout_id != pa.layout_id


@pytest.mark.slow
def test_changed_key_type_round_trips_through_the_async_checkpointer(tmp_path: Path) -> None:
    with ac.AsyncCheckpointer() as ck:
        ck.save({"x": {1: torch.arange(3.0)}}, tmp_path / "a").result(60)
        ck.save({"x": {True: torch.arange(3.0)}}, tmp_path / "b").result(60)
    got: dict[str, Any] = {"x": {True: torch.zeros(3)}}
    ac.load(got, tmp_path / "b")
    assert torch.equal(got["x"][True], torch.arange(3.0))
    md = ac.read_metadata(tmp_path / "b")
    assert "x.True" in md.tensors and "x.1" not in md.tensors


def _state() -> dict[str, Any]:
    return {
        "model": {"w": torch.zeros(3), "b": torch.ones(2)},
        "optim": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "step": 1,
    }


def _set_data(t: torch.Tensor, new: torch.Tensor) -> None:
    t.data = new  # swaps shape, dtype or device under the same object, without bumping _version


# Each changes the layout of the state from _state() but keeps every container, and
# the first four keep every tensor object too (same id, same _version for .data).
_LAYOUT_CHANGES = {
    "data-shape": lambda sd: _set_data(sd["model"]["w"], torch.zeros(4)),
    "data-dtype": lambda sd: _set_data(sd["model"]["w"], torch.zeros(3, dtype=torch.float64)),
    "resize_": lambda sd: sd["model"]["w"].resize_(2, 3),
    "set_": lambda sd: sd["model"]["b"].set_(torch.zeros(2, 1)),
    "meta-device": lambda sd: sd["model"].update(w=torch.zeros(3, device="meta")),
    "sparse": lambda sd: sd["model"].update(w=torch.zeros(3).to_sparse()),
    "tensor-to-int": lambda sd: sd["model"].update(b=2),
    "int-to-tensor": lambda sd: sd.update(step=torch.tensor(1)),
    "parameter": lambda sd: sd["model"].update(w=torch.nn.Parameter(torch.zeros(3))),
    "bfloat16-same-bytes": lambda sd: sd["model"].update(b=torch.ones(4, dtype=torch.bfloat16)),
    "renamed-key": lambda sd: sd["model"].update(c=sd["model"].pop("b")),
    "reordered-keys": lambda sd: sd["model"].update(w=sd["model"].pop("w")),
    "new-optimizer-state": lambda sd: sd["optim"]["state"].update({1: {"step": torch.tensor(1.0)}}),
}


@pytest.mark.parametrize("change", list(_LAYOUT_CHANGES))
def test_every_layout_change_is_seen_on_the_next_save(change: str) -> None:
    """A cache keyed on tensor ids (or ids and versions: `.data =` bumps no version) would reuse the plan."""
    cache = LayoutCache()
    sd = _state()
    first = _prepare(cache, sd)
    assert _prepare(cache, sd).layout_id == first.layout_id and cache.hits == 1
    _LAYOUT_CHANGES[change](sd)
    try:
        again = _prepare(cache, sd)
    except TypeError as exc:  # refused (meta, sparse): not staged by the old plan either
        assert "cannot save key 'model.w'" in str(exc)
        return
    assert cache.hits == 1, "the old plan was reused for a different layout"
    flat = flatten(sd)
    want = {k: v for k, v in flat.entries.items() if isinstance(v, torch.Tensor)}
    got = {k[0]: v for k, v in again.local.tensors.items()}
    assert got.keys() == want.keys() and all(got[k] is want[k] for k in want)
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)


def test_values_changed_in_place_are_encoded_afresh_on_a_hit() -> None:
    cache = LayoutCache()
    sd = _state()
    first = _prepare(cache, sd)
    sd["optim"]["param_groups"][0]["params"].append(7)  # a plain list: one value, changed in place
    sd["optim"]["param_groups"][0]["lr"] = 0.05
    sd["step"] = 2
    again = _prepare(cache, sd)
    assert cache.hits == 1 and again.layout_id == first.layout_id
    assert again.local.values["optim.param_groups.0.params"] == [0, 7]
    assert again.local.values["optim.param_groups.0.lr"] == 0.05
    assert again.local.values["step"] == 2


def test_tensor_replaced_by_another_of_the_same_layout_stages_the_new_one() -> None:
    cache = LayoutCache()
    sd = _state()
    _prepare(cache, sd)
    new = torch.full((3,), 5.0)
    sd["model"]["w"] = new
    again = _prepare(cache, sd)
    assert cache.hits == 1 and again.local.tensors[("model.w", (0,))] is new


class _Holder:
    """A Stateful standing for ``{"w": tensor}``: its entries come after the rest of its round."""

    def __init__(self, w: torch.Tensor) -> None:
        self.w = w

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise NotImplementedError


def test_same_tree_and_layouts_in_another_leaf_order_takes_each_tensor_by_name() -> None:
    """A Stateful in place of a plain dict gives the same tree, but its leaves come later:
    a cache that trusted the tree and the layouts alone would swap the two tensors."""
    cache = LayoutCache()
    w, b = torch.zeros(3), torch.ones(3)
    _prepare(cache, {"a": {"w": w}, "b": b})
    again = _prepare(cache, {"a": _Holder(w), "b": b})
    assert again.local.tensors[("a.w", (0,))] is w and again.local.tensors[("b", (0,))] is b


@pytest.mark.slow
@pytest.mark.ranks(1)
def test_a_hit_takes_dtensor_shards_without_recording_autograd(mesh: Any) -> None:
    # DTensor.to_local() with grad enabled runs an autograd Function per leaf: a graph node
    # holding the DTensor for every saved shard, and ~8 us each (12 ms a save for 1,436
    # DTensor leaves), inside the training loop's stall.
    from torch.distributed.tensor import DTensor, Shard

    def state() -> dict[str, Any]:
        return {
            f"p{i}": torch.nn.Parameter(DTensor.from_local(torch.randn(4), mesh, [Shard(0)], run_check=False))
            for i in range(3)
        }

    cache = LayoutCache()
    _prepare(cache, state())
    sd = state()
    with torch.enable_grad():
        again = _prepare(cache, sd)
    assert cache.hits == 1
    for fqn, p in sd.items():
        local = again.local.tensors[(fqn, (0,))]
        assert local.grad_fn is None, fqn
        assert local.data_ptr() == p._local_tensor.data_ptr()
