"""Staging budget and replica-sharded staging together: budgeted saves stage only what this rank writes.

Real ranks (gloo), real workers, real files. After a budgeted save of a
layout, the worker tells the trainer which items its rank writes; the next
budgeted save of that layout splits only those into rounds. What was staged
is read from the save's stats (``bytes_staged``, ``rounds``) and from the pool
(``staging_bytes``); what was written from the committed metadata. Every save
is loaded back bit-exact on the saving ranks and in one process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import local_bytes, restart_worker, run_ranks

import async_ckpt as ac
from async_ckpt import staged_rounds
from async_ckpt.testing import same_bits

KiB = 1 << 10
FAIL_ENV = "ASYNC_CKPT_FAIL_AT"


def _replicated(version: int, extra: bool = False) -> dict[str, torch.Tensor]:
    """16 tensors of 64 KiB in three dtypes (1 MiB), the same on every rank."""
    g = torch.Generator().manual_seed(100 + version)
    out: dict[str, torch.Tensor] = {}
    for i in range(16):
        if i % 4 == 1:
            out[f"bf16_{i}"] = torch.randn(128, 256, generator=g).to(torch.bfloat16)
        elif i % 4 == 2:
            out[f"i64_{i}"] = torch.randint(-(2**40), 2**40, (8192,), generator=g)
        else:
            out[f"f32_{i}"] = torch.randn(16384, generator=g)
    if extra:
        out["extra"] = torch.randn(7000, generator=g)
    return out


def _sharded(world: int, version: int) -> dict[str, torch.Tensor]:
    """Global tensors saved as DTensors with Shard(0) (rows uneven over the ranks)."""
    g = torch.Generator().manual_seed(900 + version)
    return {f"sh{i}": torch.randn(64 * world + 3, 256, generator=g) for i in range(4)}


def _state(world: int, version: int, *, extra: bool = False, mesh: Any = None) -> dict[str, Any]:
    model: dict[str, Any] = {k: v.clone() for k, v in _replicated(version, extra).items()}
    if mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor

        for k, v in _sharded(world, version).items():
            model[k] = distribute_tensor(v, mesh, [Shard(0)])
    return {"model": model, "step": version}


def _want(world: int, version: int, *, extra: bool = False, sharded: bool = False) -> dict[str, torch.Tensor]:
    want = _replicated(version, extra)
    if sharded:
        want.update(_sharded(world, version))
    return want


def _check_on_ranks(path: str, world: int, version: int, mesh: Any, **kw: Any) -> None:
    got = _state(world, 0, mesh=mesh if kw.get("sharded") else None, extra=kw.get("extra", False))
    with torch.no_grad():
        for t in got["model"].values():
            (t.to_local() if hasattr(t, "to_local") else t).zero_()
    got["step"] = -1
    ac.load(got, path)
    for k, w in _want(world, version, **kw).items():
        g = got["model"][k]
        assert same_bits(g.full_tensor() if hasattr(g, "full_tensor") else g, w), (path, k)
    assert got["step"] == version


def _check_in_one_process(path: Path, world: int, version: int, **kw: Any) -> None:
    want = _want(world, version, **kw)
    got = {"model": {k: torch.zeros_like(v) for k, v in want.items()}, "step": -1}
    ac.load(got, path)
    for k, w in want.items():
        assert same_bits(got["model"][k], w), (path, k)
    assert got["step"] == version


def _written_by(md: ac.Metadata, rank: int) -> int:
    """Tensor bytes this rank's shard files hold."""
    return sum(
        c.byte_length for rec in md.tensors.values() for c in rec.chunks if md.files[c.file].rank == rank
    )


def _record(ck: ac.AsyncCheckpointer, md: ac.Metadata, rank: int) -> dict[str, Any]:
    assert md.stats is not None
    return {
        "staged": md.stats.bytes_staged,
        "rounds": md.stats.rounds,
        "cached": md.stats.plan_cached,
        "written": _written_by(md, rank),
        "pool": ck.staging_bytes,
    }


# ------------------------------- fully replicated: each rank stages its share


def _replicated_body(rank: int, world: int, root: str, budget: int) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {"saves": [], "verify": []}
    with ac.AsyncCheckpointer(staging_budget=budget, timeout=120.0, start=True) as ck:
        dist.barrier()
        for version in range(3):
            sd = _state(world, version)
            out["local"] = local_bytes(sd)
            pending = ck.save(sd, f"{root}/v{version}")
            with torch.no_grad():  # after save() returns: must not reach the checkpoint
                for t in sd["model"].values():
                    t.add_(1)
            md = pending.result(120)
            out["saves"].append(_record(ck, md, rank))
            _check_on_ranks(f"{root}/v{version}", world, version, None)
    # verify_replicas hashes and compares every replica: every save stages everything.
    with ac.AsyncCheckpointer(staging_budget=budget, timeout=120.0, verify_replicas=True) as ck:
        for version in range(2):
            md = ck.save(_state(world, version), f"{root}/vr{version}").result(120)
            out["verify"].append(_record(ck, md, rank))
    return out


@pytest.mark.slow
def test_replicated_state_under_a_budget_stages_each_ranks_share_after_the_first_save(tmp_path: Path) -> None:
    world, budget = 2, 768 * KiB  # the state (1 MiB) needs rounds; each rank's half fits one
    results = run_ranks(world, _replicated_body, str(tmp_path), budget, timeout=240.0, pg_timeout=120.0)
    for rank, r in enumerate(results):
        local = r["local"]
        first, *later = r["saves"]
        # The first save of a layout stages everything, in rounds within the budget.
        assert first["staged"] == local and first["rounds"] >= 2 and first["pool"] <= budget, (rank, first)
        for s in later:
            # Then only what this rank writes: half the rounds' bytes, one round, a buffer of that size.
            assert s["staged"] == s["written"] < 0.6 * local, (rank, s)
            assert s["rounds"] == 1, (rank, s)
            assert s["pool"] < 0.6 * local + 64 * KiB < budget, (rank, s)
        # The subset's plan is the first save's: no planning round after it.
        assert [s["cached"] for s in r["saves"]] == [False, True, True], (rank, r["saves"])
        assert all(v["staged"] == local for v in r["verify"]), (rank, r["verify"])
    assert sum(r["saves"][-1]["written"] for r in results) == results[0]["local"]
    for v in range(3):
        _check_in_one_process(tmp_path / f"v{v}", world, v)
    for v in range(2):
        _check_in_one_process(tmp_path / f"vr{v}", world, v)


# ----------------------- a layout change, and ranks staging different amounts


_LAYOUT_SAVES = [(f"a{v}", v, False) for v in range(2)]
_LAYOUT_SAVES += [(f"b{v}", 2 + v, True) for v in range(3)]
_LAYOUT_SAVES += [(f"a{v}", 3 + v, False) for v in range(2, 5)]
"""(name, version, extra): layout A, then B (one more tensor), then A again."""


def _layouts_body(rank: int, world: int, root: str, budget: int) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {"saves": []}
    with ac.AsyncCheckpointer(staging_budget=budget, timeout=120.0, start=True) as ck:
        dist.barrier()
        for name, version, extra in _LAYOUT_SAVES:
            # Save b1: rank 1 stages everything while rank 0 stages its share.
            ck._layouts.replica_staging = not (name == "b1" and rank == 1)
            if name == "a3":
                # Rank 1's worker dies between saves: the new one has no plans, its trainer
                # still stages its share, so the ranks plan afresh with what each staged.
                out["restarted"] = restart_worker(ck, kill=rank == 1)
                dist.barrier()
            sd = _state(world, version, extra=extra)
            md = ck.save(sd, f"{root}/{name}").result(120)
            out["saves"].append({**_record(ck, md, rank), "local": local_bytes(sd)})
            _check_on_ranks(f"{root}/{name}", world, version, None, extra=extra)
    return out


@pytest.mark.slow
def test_a_layout_change_between_budgeted_saves_stages_everything_once(tmp_path: Path) -> None:
    world, budget = 2, 256 * KiB  # every save takes several rounds, the shares too
    results = run_ranks(world, _layouts_body, str(tmp_path), budget, timeout=240.0, pg_timeout=120.0)
    for rank, r in enumerate(results):
        a0, a1, b0, b1, b2, *a_again = r["saves"]
        for full in (a0, b0):  # a layout's first save
            assert full["staged"] == full["local"], (rank, full)
        for share in (a1, b2, *a_again):  # A's subset is still known after B's saves and a restart
            assert share["staged"] == share["written"] < 0.6 * share["local"], (rank, share)
            assert 2 <= share["rounds"] < a0["rounds"], (rank, share)
        if rank == 1:
            assert b1["staged"] == b1["local"], b1
        else:
            assert b1["staged"] == b1["written"] < 0.6 * b1["local"], b1
        # A planning round for each layout's first save and after the restart (a3).
        cached = [s["cached"] for s in r["saves"]]
        assert cached == [False, True, False, True, True, True, False, True], (rank, cached)
        assert max(s["pool"] for s in r["saves"]) <= budget
    assert results[1]["restarted"] and not results[0]["restarted"]
    for name, version, extra in _LAYOUT_SAVES:
        _check_in_one_process(tmp_path / name, world, version, extra=extra)


# -------------------------------- a mixed state: DTensor shards and replicas


def _mixed_body(rank: int, world: int, root: str, budget: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {"saves": []}
    with ac.AsyncCheckpointer(staging_budget=budget, timeout=120.0, start=True) as ck:
        dist.barrier()
        for version in range(3):
            sd = _state(world, version, mesh=mesh)
            md = ck.save(sd, f"{root}/m{version}").result(120)
            shard_bytes = sum(
                t.to_local().numel() * t.to_local().element_size()
                for t in sd["model"].values()
                if hasattr(t, "to_local")
            )
            out["saves"].append({**_record(ck, md, rank), "local": local_bytes(sd), "shard": shard_bytes})
            _check_on_ranks(f"{root}/m{version}", world, version, mesh, sharded=True)
    return out


@pytest.mark.slow
def test_a_mixed_state_stages_its_shards_and_its_share_of_the_replicas(tmp_path: Path) -> None:
    world, budget = 2, 256 * KiB
    results = run_ranks(world, _mixed_body, str(tmp_path), budget, timeout=240.0, pg_timeout=120.0)
    replicated = sum(t.numel() * t.element_size() for t in _replicated(0).values())
    for rank, r in enumerate(results):
        first, *later = r["saves"]
        assert first["staged"] == first["local"], (rank, first)
        for s in later:
            # Its own shards (which only it holds) and about half of the replicas.
            assert s["staged"] == s["written"], (rank, s)
            assert s["shard"] + 0.3 * replicated < s["staged"] < s["shard"] + 0.7 * replicated, (rank, s)
            assert s["rounds"] < first["rounds"] and s["cached"], (rank, s)
    for v in range(3):
        _check_in_one_process(tmp_path / f"m{v}", world, v, sharded=True)


# ------------------- a failed round: the next save stages everything again


def _failure_body(rank: int, world: int, root: str, budget: int) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {"saves": []}
    os.environ[FAIL_ENV] = "write_round1:2:1"  # save 2, rank 1's second round; its worker inherits it
    try:
        ck = ac.AsyncCheckpointer(staging_budget=budget, timeout=120.0, start=True)
    finally:
        del os.environ[FAIL_ENV]
    with ck:
        dist.barrier()
        for version in range(5):
            sd = _state(world, version)
            try:
                md = ck.save(sd, f"{root}/f{version}").result(120)
            except ac.CheckpointError as exc:
                out["error"] = (version, str(exc))
                out["saves"].append(None)
                continue
            out["saves"].append({**_record(ck, md, rank), "local": local_bytes(sd)})
            _check_on_ranks(f"{root}/f{version}", world, version, None)
    return out


@pytest.mark.slow
def test_a_failed_round_makes_the_next_budgeted_save_stage_everything(tmp_path: Path) -> None:
    world, budget = 2, 256 * KiB
    results = run_ranks(world, _failure_body, str(tmp_path), budget, timeout=240.0, pg_timeout=120.0)
    for rank, r in enumerate(results):
        s0, s1, failed, s3, s4 = r["saves"]
        assert failed is None and r["error"][0] == 2 and "write_round1" in r["error"][1], (
            rank,
            r.get("error"),
        )
        assert s0["staged"] == s0["local"], (rank, s0)
        assert s1["staged"] == s1["written"] < 0.6 * s1["local"], (rank, s1)
        # The failure forgot the subset: everything is staged, then the share again.
        assert s3["staged"] == s3["local"], (rank, s3)
        assert s4["staged"] == s4["written"] < 0.6 * s4["local"], (rank, s4)
    assert not (tmp_path / "f2").exists()
    for v in (0, 1, 3, 4):
        _check_in_one_process(tmp_path / f"f{v}", world, v)


# State dicts changing differently, under a budget too: test_replica_staging.py
# (test_state_dicts_changing_differently_fail_once_naming_the_key[budget]).


# ------------------------- never commit a checkpoint that lacks a planned item


def test_an_item_planned_for_this_rank_but_staged_in_no_round_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trainer whose rounds leave out a tensor (the fault injected here) must not
    # get a committed checkpoint without it: the worker fails the save naming it.
    split = staged_rounds.split_rounds

    def dropping_b(tensors: Any, capacity: int) -> Any:
        return [[m for m in r if m[0][0] != "b"] for r in split(tensors, capacity)]

    state = {"a": torch.arange(1000.0), "b": torch.arange(2000.0), "c": torch.ones(3)}
    with ac.AsyncCheckpointer(staging_budget=4 * KiB, timeout=60.0) as ck:
        monkeypatch.setattr(staged_rounds, "split_rounds", dropping_b)
        with pytest.raises(ac.CheckpointError, match="rank 0: 'b'"):
            ck.save(state, tmp_path / "x").result(120)
        assert not (tmp_path / "x").exists()
        monkeypatch.undo()
        ck.save(state, tmp_path / "y").result(120)
    got = {k: torch.zeros_like(v) for k, v in state.items()}
    ac.load(got, tmp_path / "y")
    assert all(same_bits(got[k], v) for k, v in state.items())
