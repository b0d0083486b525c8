"""The trainer's side of replica-sharded staging: the layout cache stages the subset the worker named.

In one process, no worker: ``LayoutCache.subsets.record`` is what the listener
thread calls on the worker's ``StageOnly``.
"""

from __future__ import annotations

from typing import Any

import torch

from async_ckpt.layout_cache import LayoutCache
from async_ckpt.staging import make_layout
from async_ckpt.state_dict import flatten


def _sd(v: float) -> dict[str, Any]:
    return {"a": torch.full((100,), v), "b": torch.full((30,), v), "c": torch.full((7,), v), "step": int(v)}


def _prepare(cache: LayoutCache, sd: dict[str, Any], verify: bool = False) -> Any:
    return cache.prepare(flatten(sd), allow_pickle=False, verify_replicas=verify)


def test_the_named_subset_is_staged_in_a_layout_of_its_own_until_forgotten() -> None:
    cache = LayoutCache()
    full = _prepare(cache, _sd(1.0))
    assert set(full.local.tensors) == {("a", (0,)), ("b", (0,)), ("c", (0,))}
    cache.subsets.record(full.layout_id, (("c", (0,)), ("a", (0,))))
    sd = _sd(2.0)
    reduced = _prepare(cache, sd)
    # The full plan still goes to the worker under the same layout id; only the copy shrinks.
    assert reduced.layout_id == full.layout_id and reduced.local.plan == full.local.plan
    assert list(reduced.local.tensors) == [("a", (0,)), ("c", (0,))], "the full layout's order"
    assert reduced.local.tensors[("a", (0,))] is sd["a"]
    assert reduced.layout.key != full.layout.key
    assert reduced.layout.nbytes == (100 + 7) * 4
    assert reduced.layout == make_layout({k: t for k, t in reduced.local.tensors.items()})
    assert reduced.local.values == {"step": 2}
    assert _prepare(cache, _sd(3.0)).layout is reduced.layout, "built once, then reused"
    # verify_replicas hashes every replica, so it stages every one.
    assert set(_prepare(cache, _sd(4.0), verify=True).local.tensors) == set(full.local.tensors)
    cache.replica_staging = False
    assert _prepare(cache, _sd(5.0)).layout.key == full.layout.key
    cache.replica_staging = True
    cache.subsets.record(full.layout_id, None)  # a failed save: everything again
    assert _prepare(cache, _sd(6.0)).layout.key == full.layout.key


def test_an_empty_subset_stages_nothing_and_a_foreign_one_is_ignored() -> None:
    cache = LayoutCache()
    full = _prepare(cache, _sd(1.0))
    cache.subsets.record(full.layout_id, ())
    empty = _prepare(cache, _sd(2.0))
    assert empty.local.tensors == {} and empty.layout.nbytes == 0 and empty.layout.segment_sizes == ()
    cache.subsets.record(full.layout_id, (("zz", (0,)),))  # not a key of this layout
    assert _prepare(cache, _sd(3.0)).layout.key == full.layout.key
