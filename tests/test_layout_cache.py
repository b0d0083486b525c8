"""The trainer's plan cache: reused while the state dict keeps its structure, never across structures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt.layout_cache import LayoutCache
from async_ckpt.state_dict import flatten


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
    ],
    ids=["int-bool", "int-float", "str-int", "list-tuple", "list-dict", "empty-list-dict"],
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
