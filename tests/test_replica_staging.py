"""Replica-sharded staging: after a layout's first save, each rank stages only what it writes.

Real ranks (gloo, spawned), real workers, real files. Each test saves several
versions and loads every one back bit-exact: on the same ranks, on another
world size, and in one process. Staging memory is read from the pool
(``staging_bytes``) and from both processes' mappings of the segments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import local_bytes, restart_worker, run_ranks

import async_ckpt as ac
from async_ckpt.testing import same_bits

pytestmark = pytest.mark.slow

N_REP = 6


def _full(world: int, version: int, extra: bool = False) -> dict[str, torch.Tensor]:
    """The global tensors of one save, the same on every rank and in the parent."""
    g = torch.Generator().manual_seed(7000 + version)
    out = {f"rep{i}": torch.randn(300 + 97 * i, generator=g) for i in range(N_REP)}
    out["rep_bf16"] = torch.randn(33, 5, generator=g).to(torch.bfloat16)
    out["scalar"] = torch.tensor(float(version))
    out["sharded"] = torch.randn(4 * world + 1, 6, generator=g)  # uneven Shard(0)
    if extra:
        out["extra"] = torch.randn(77, generator=g)
    return out


def _state(world: int, version: int, mesh: Any, extra: bool = False) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    f = _full(world, version, extra)
    model: dict[str, Any] = {k: v.clone() for k, v in f.items() if k != "sharded"}
    model["sharded"] = distribute_tensor(f["sharded"], mesh, [Shard(0)])
    return {"model": model, "step": version}


def _blank(world: int, mesh: Any, extra: bool = False) -> dict[str, Any]:
    sd = _state(world, 0, mesh, extra)
    with torch.no_grad():
        for t in sd["model"].values():
            (t.to_local() if hasattr(t, "to_local") else t).zero_()
    sd["step"] = -1
    return sd


def _check_on_ranks(path: str, world: int, version: int, mesh: Any, extra: bool = False) -> None:
    """Load into DTensors over ``mesh`` (which may have another size than the saving ``world``)."""
    got = _blank(world, mesh, extra)
    ac.load(got, path)
    want = _full(world, version, extra)
    for k, w in want.items():
        g = got["model"][k]
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        assert same_bits(g, w), (path, k)
    assert got["step"] == version


def _check_in_one_process(path: Path, world: int, version: int, extra: bool = False) -> None:
    want = _full(world, version, extra)
    got = {"model": {k: torch.zeros_like(v) for k, v in want.items()}, "step": -1}
    ac.load(got, path)
    for k, w in want.items():
        assert same_bits(got["model"][k], w), (path, k)
    assert got["step"] == version


def _mapped_staging(pid: int) -> int:
    """Bytes of staging segments mapped in process ``pid`` (page-rounded, as the kernel maps them)."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "async_ckpt-staging" in line:
                lo, hi = line.split()[0].split("-")
                total += int(hi, 16) - int(lo, 16)
    return total


def _written_by(md: ac.Metadata, rank: int) -> tuple[int, int]:
    """(tensor bytes, chunks) this rank's shard files hold."""
    nbytes = n = 0
    for rec in md.tensors.values():
        for c in rec.chunks:
            if md.files[c.file].rank == rank:
                nbytes += c.byte_length
                n += 1
    return nbytes, n


def _memory(ck: ac.AsyncCheckpointer, md: ac.Metadata, rank: int) -> dict[str, int]:
    nbytes, n = _written_by(md, rank)
    pid = ck.worker_pid
    assert pid is not None
    return {
        "staging": ck.staging_bytes,
        "written": nbytes,
        "chunks": n,
        "trainer_mapped": _mapped_staging(os.getpid()),
        "worker_mapped": _mapped_staging(pid),
    }


# ------------------------------------------------------- 4 ranks, steady state


def _steady_body(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {"mem": [], "cached": []}
    with ac.AsyncCheckpointer(timeout=120.0, start=True) as ck:
        dist.barrier()
        for version in range(3):
            sd = _state(world, version, mesh)
            out["local"] = local_bytes(sd)
            pending = ck.save(sd, f"{root}/v{version}")
            with torch.no_grad():  # after save() returns: must not reach the checkpoint
                for t in sd["model"].values():
                    (t.to_local() if hasattr(t, "to_local") else t).add_(1)
            md = pending.result(120)
            assert md.stats is not None
            out["cached"].append(md.stats.plan_cached)
            out["mem"].append(_memory(ck, md, rank))
            _check_on_ranks(f"{root}/v{version}", world, version, mesh)
    return out


def _load_body(rank: int, world: int, root: str, saved_world: int, versions: list[int]) -> bool:
    """Load on ``world`` ranks what ``saved_world`` ranks saved (the DTensor resharded)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for v in versions:
        _check_on_ranks(f"{root}/v{v}", saved_world, v, mesh)
    return True


def test_four_ranks_stage_only_their_share_and_load_anywhere(tmp_path: Path) -> None:
    world = 4
    results = run_ranks(world, _steady_body, str(tmp_path), timeout=240.0, pg_timeout=120.0)
    for rank, r in enumerate(results):
        first, *later = r["mem"]
        # The first save of a layout stages everything.
        assert first["staging"] >= r["local"], (rank, first)
        for m in later:
            # Then only the items this rank writes (64-byte aligned each), in both processes.
            assert m["written"] <= m["staging"] <= m["written"] + 64 * (m["chunks"] + 1), (rank, m)
            assert m["staging"] < 0.6 * r["local"], (rank, m)
            assert m["worker_mapped"] == m["trainer_mapped"], (rank, m)
            assert m["trainer_mapped"] < first["trainer_mapped"], (rank, m)
        # The reduced layout reuses the plan: no planning round after the first save.
        assert r["cached"] == [False, True, True], (rank, r["cached"])
    assert sum(r["mem"][-1]["staging"] for r in results) < 1.5 * results[0]["local"]
    for v in range(3):
        _check_in_one_process(tmp_path / f"v{v}", world, v)
    assert (
        run_ranks(2, _load_body, str(tmp_path), world, [1, 2], timeout=180.0, pg_timeout=120.0) == [True] * 2
    )


# --------------------------------- 2 ranks: disagreeing ranks, a worker restart


def _disagree_body(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {"staging": []}
    with ac.AsyncCheckpointer(timeout=120.0, start=True) as ck:
        dist.barrier()
        for version in range(6):
            # Save 2: rank 1 stages everything while rank 0 stages its share.
            ck._layouts.replica_staging = not (version == 2 and rank == 1)
            if version == 4:
                # Rank 1's worker dies between saves; its trainer still stages its share.
                out["restarted"] = restart_worker(ck, kill=rank == 1)
                dist.barrier()
            md = ck.save(_state(world, version, mesh), f"{root}/v{version}").result(120)
            out["staging"].append(ck.staging_bytes)
            _check_on_ranks(f"{root}/v{version}", world, version, mesh)
        out["local"] = local_bytes(_state(world, 0, mesh))
        out["md_world"] = md.world_size
    return out


def test_ranks_disagreeing_and_a_restarted_worker(tmp_path: Path) -> None:
    world = 2
    r0, r1 = run_ranks(world, _disagree_body, str(tmp_path), timeout=240.0, pg_timeout=120.0)
    local = r0["local"]
    assert r0["staging"][0] >= local and r1["staging"][0] >= local
    assert all(s < 0.75 * local for s in r0["staging"][1:]), r0["staging"]
    assert r1["staging"][2] >= local, "rank 1 staged everything for save 2"
    assert all(s < 0.75 * local for s in r1["staging"][3:]), r1["staging"]
    assert r1["restarted"] and not r0["restarted"]
    for v in range(6):
        _check_in_one_process(tmp_path / f"v{v}", world, v)


# --------------------------- 2 ranks: two saves in flight, layout changes


def _inflight_body(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {}
    # (name, version, extra): layout A, then B (one more tensor), then A again.
    saves = [(f"a{v}", v, False) for v in range(4)]
    saves += [(f"b{v}", 10 + v, True) for v in range(3)]
    saves += [(f"c{v}", 20 + v, False) for v in range(2)]
    with ac.AsyncCheckpointer(max_in_flight=2, timeout=120.0, start=True) as ck:
        dist.barrier()
        pendings = []
        for name, version, extra in saves:
            sd = _state(world, version, mesh, extra)
            pendings.append(ck.save(sd, f"{root}/{name}"))
            with torch.no_grad():
                for t in sd["model"].values():
                    (t.to_local() if hasattr(t, "to_local") else t).mul_(-1)
            if name == "b2":
                pendings[-1].result(120)
                out["staging_b"] = ck.staging_bytes
        for p in pendings:
            p.result(120)
        out["staging_end"] = ck.staging_bytes
        for name, version, extra in saves:
            _check_on_ranks(f"{root}/{name}", world, version, mesh, extra)
        out["local"] = local_bytes(_state(world, 0, mesh))
    return out


def test_two_saves_in_flight_and_layout_changes(tmp_path: Path) -> None:
    world = 2
    results = run_ranks(world, _inflight_body, str(tmp_path), timeout=240.0, pg_timeout=120.0)
    for r in results:
        # Two slots of this rank's share, not two full copies.
        assert r["staging_end"] < 1.5 * r["local"], r
    names = [(f"a{v}", v, False) for v in range(4)]
    names += [(f"b{v}", 10 + v, True) for v in range(3)]
    names += [(f"c{v}", 20 + v, False) for v in range(2)]
    for name, version, extra in names:
        _check_in_one_process(tmp_path / name, world, version, extra)


# ----------------------------- 4 ranks, a tiny state: some ranks write nothing


def _tiny_body(rank: int, world: int, root: str) -> dict[str, Any]:
    out: dict[str, Any] = {"staging": []}
    with ac.AsyncCheckpointer(timeout=120.0, start=True) as ck:
        for v in range(3):
            sd = {"a": torch.arange(5.0) + v, "b": torch.arange(3) * v, "step": v}
            ck.save(sd, f"{root}/t{v}").result(120)
            out["staging"].append(ck.staging_bytes)
            got = {"a": torch.zeros(5), "b": torch.zeros(3, dtype=torch.int64), "step": -1}
            ac.load(got, f"{root}/t{v}")
            assert same_bits(got["a"], torch.arange(5.0) + v) and same_bits(got["b"], torch.arange(3) * v)
            assert got["step"] == v
    # verify_replicas: every replica is hashed and compared, so every one is staged.
    with ac.AsyncCheckpointer(timeout=120.0, verify_replicas=True) as ck:
        for v in range(2):
            ck.save({"a": torch.arange(5.0), "b": torch.arange(3)}, f"{root}/vr{v}").result(120)
        out["verify_staging"] = ck.staging_bytes
    return out


def test_tiny_state_four_ranks_some_stage_nothing(tmp_path: Path) -> None:
    results = run_ranks(4, _tiny_body, str(tmp_path), timeout=240.0, pg_timeout=120.0)
    later = [r["staging"][1:] for r in results]
    assert all(r["staging"][0] > 0 for r in results)
    assert sum(1 for s in later if s == [0, 0]) == 2, later  # two items, four ranks
    assert all(r["verify_staging"] >= 64 + 64 for r in results), results


# ------------- state dicts changing differently: one failed save, then recovery


def _diverge_body(rank: int, world: int, root: str, budget: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"staged": []}
    a, b = torch.arange(4096.0), torch.arange(4096.0) * 2
    with ac.AsyncCheckpointer(staging_budget=budget, timeout=60.0, start=True) as ck:
        for v in range(2):
            md = ck.save({"a": a, "b": b}, f"{root}/s{v}").result(120)
        owner_b = next(md.files[c.file].rank for c in md.tensors["b"].chunks)
        # The owner of "b" drops it; the other rank's layout is unchanged, so it stages only "a".
        sd = {"a": a} if rank == owner_b else {"a": a, "b": b}
        try:
            ck.save(sd, f"{root}/bad").result(120)
            out["error"] = None
        except ac.CheckpointError as exc:
            out["error"] = str(exc)
        for name in ("good", "good2"):  # everything staged again: it works
            md = ck.save(sd, f"{root}/{name}").result(120)
            assert md.stats is not None
            out["staged"].append(md.stats.bytes_staged)
        out["full"] = sum(t.numel() * t.element_size() for t in sd.values())
    return out


@pytest.mark.parametrize("budget", [None, 8 << 10], ids=["unbudgeted", "budget"])
def test_state_dicts_changing_differently_fail_once_naming_the_key(
    tmp_path: Path, budget: int | None
) -> None:
    results = run_ranks(2, _diverge_body, str(tmp_path), budget, timeout=240.0, pg_timeout=60.0)
    for r in results:
        assert r["error"] is not None and "'b'" in r["error"], r
        assert r["staged"][0] == r["full"], r  # the save after a failure stages everything
    assert not (tmp_path / "bad").exists()
    for name in ("good", "good2"):
        got = {"a": torch.zeros(4096), "b": torch.zeros(4096)}
        ac.load(got, tmp_path / name)
        assert same_bits(got["a"], torch.arange(4096.0)) and same_bits(got["b"], torch.arange(4096.0) * 2)
