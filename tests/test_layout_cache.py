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


# ---------------------------------------------------- what the cache keeps alive; blocking saves


def test_the_cache_keeps_no_tensor_of_a_state_dict_alive() -> None:
    """A model replaced by another of the same layout is freed: the cache keeps plans, not data."""
    import gc
    import weakref

    cache = LayoutCache()
    old = {"w": torch.randn(1000), "b": torch.randn(10), "step": 1}
    gone = weakref.ref(old["w"])
    _prepare(cache, old)
    del old
    new = {"w": torch.randn(1000), "b": torch.randn(10), "step": 2}
    again = _prepare(cache, new)
    del again
    gc.collect()
    assert cache.hits == 1
    assert gone() is None, "the cache holds a tensor of a state dict nobody holds any more"


def test_a_checkpointer_frees_a_replaced_state(tmp_path: Path) -> None:
    import gc
    import weakref

    with ac.AsyncCheckpointer(start=True, timeout=60) as ck:
        state = {"w": torch.randn(64, 64), "b": torch.randn(64)}
        gone = weakref.ref(state["w"])
        ck.save(state, tmp_path / "a").result(60)
        state = {"w": torch.randn(64, 64), "b": torch.randn(64)}  # rebuilt: a restart in the process
        ck.save(state, tmp_path / "b").result(60)
        gc.collect()
        assert gone() is None, "the checkpointer keeps the first state's tensors alive"
    got = ac.load_state_dict(tmp_path / "b")
    assert torch.equal(got["w"], state["w"])


def test_repeated_blocking_saves_reuse_the_local_plan_and_stay_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ac.save`` plans a layout once per thread, like the checkpointer; every save is still exact."""
    from async_ckpt import layout_cache

    built: list[int] = []
    real = layout_cache.build_local_plan

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(layout_cache, "build_local_plan", counting)
    saves = []
    for i in range(4):
        sd = {"w": torch.randn(300, 7) + i, "step": i, "tags": ["a", i], "opt": {0: {"m": torch.ones(3) * i}}}
        ac.save(sd, tmp_path / f"s{i}")
        saves.append(sd)
    ac.save({"w": torch.zeros(5), "step": 9}, tmp_path / "other")  # another layout: planned afresh
    assert len(built) == 2, f"{len(built)} local plans built for 2 layouts"
    for i, want in enumerate(saves):
        got = ac.load_state_dict(tmp_path / f"s{i}")
        assert torch.equal(got["w"], want["w"]) and got["step"] == i and got["tags"] == ["a", i]
        assert torch.equal(got["opt"][0]["m"], want["opt"][0]["m"])
    with pytest.raises(TypeError, match="tags"):  # the cache never lets a refused value through
        ac.save(
            {"w": torch.zeros(300, 7), "step": 0, "tags": ["a", object()], "opt": {0: {"m": torch.ones(3)}}},
            tmp_path / "x",
        )


@pytest.mark.slow
@pytest.mark.ranks(2)
def test_meshes_are_told_apart_by_what_they_are_not_by_id(rank: Any) -> None:
    """An equal mesh built anew keeps the plan; a mesh with the ranks swapped gets its own.

    The cache's signature named a mesh by ``id()``: a rebuilt, equal mesh missed, and a
    mesh built after another died could take its address and its cached plan. Here the
    same key, global shape and placements over a mesh listing the ranks in the other
    order: each rank holds the other half of the rows, at the other offset.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    r = rank.rank
    cache = LayoutCache()
    meshes = []

    def offsets(order: list[int]) -> list[Any]:
        mesh = DeviceMesh("cpu", order)
        meshes.append(mesh)  # all alive: no address is reused within this test
        local = torch.full((3, 2), float(order.index(r)))
        sd = {"w": DTensor.from_local(local, mesh, [Shard(0)], run_check=False)}
        return [it.index.offset for it in _prepare(cache, sd).local.plan.items]

    assert offsets([0, 1]) == [(3 * r, 0)]
    assert offsets([0, 1]) == [(3 * r, 0)] and cache.hits == 1, "an equal mesh built anew missed the cache"
    assert offsets([1, 0]) == [(3 * [1, 0].index(r), 0)] and cache.hits == 1


def test_a_plan_made_to_verify_replicas_is_never_reused_without() -> None:
    """``verify_replicas=True`` plans hash every replica; a later save without it must not write them so.

    A blocking save may verify replicas once and not the next time, on the same layout
    (tests/test_dist_dedup.py saves both ways in a row).
    """
    cache = LayoutCache()
    sd = {"t": torch.ones(5), "same": torch.zeros(3, 4)}
    verified = cache.prepare(flatten(sd), allow_pickle=False, verify_replicas=True)
    trusted = cache.prepare(flatten(sd), allow_pickle=False, verify_replicas=False)
    assert cache.hits == 0, "the plan made to verify replicas was taken for a save without"
    assert trusted.local.plan != verified.local.plan


def test_a_mesh_that_cannot_be_hashed_is_never_taken_for_another() -> None:
    """A mesh with no hash (or no weak reference) gets a fresh token each save: a miss, never an alias."""
    from async_ckpt.layout_cache import _mesh_token

    class Unhashable:
        __hash__ = None  # type: ignore[assignment]

    m = Unhashable()
    assert _mesh_token(m) != _mesh_token(m)
