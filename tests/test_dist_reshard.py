"""Resharding across world sizes and placements: 4 -> 4, 4 -> 2, 4 -> 1, 2 -> 4, 2 -> 1.

Every rank rebuilds each full tensor deterministically (seeded by its key), so
a loaded shard is checked bit for bit against the same slice of the full
tensor that ``distribute_tensor`` would give it. Shapes are chosen to be
uneven over the mesh, including ranks whose shard is empty.

Spawning ranks is the expensive part (~2 s each on two cores), so each
``run_ranks`` call does several saves and loads; two module-scoped fixtures
build the 4-rank and the 2-rank checkpoints once.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.testing import assert_bits_equal

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

# name -> (global shape, dtype); all uneven over 4 ranks somewhere.
SPECS: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "a": ((10, 7), torch.float32),  # dim 10 over 4: 3,3,3,1 ; dim 7 over 4: 2,2,2,1
    "b": ((7,), torch.int64),  # 2,2,2,1
    "c": ((3, 5), torch.bfloat16),  # dim 3 over 4: 1,1,1,0 (empty shard on rank 3)
    "d": ((6, 10), torch.float64),  # saved Shard(0) (2,2,2,0), loaded Shard(1)
    "e": ((7, 5), torch.float32),  # 2-D mesh (dp=2, tp=2)
    "f": ((5, 3), torch.float32),  # 1x4 mesh, Shard(1): 1,1,1,0
    "g": ((4, 4), torch.int32),  # plain tensor, identical on every rank
    "h": ((1, 9), torch.float16),  # dim 1 over 2: 1,0 ; dim 9 over 4: 3,3,3,0
    "i": ((7, 3), torch.float32),  # [Shard(0), Shard(0)] on (2, 2): rows 2,2 | 2,1
}

TIMEOUT = 180.0  # generous: the 2-core machine is often shared


def full(name: str) -> torch.Tensor:
    shape, dtype = SPECS[name]
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=gen, dtype=torch.int64).to(dtype)


def garbage_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full(t.shape, 99, dtype=t.dtype)


# ----------------------------------------------------------------- in ranks


def _meshes(world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {"1d": init_device_mesh("cpu", (world,))}
    if world == 4:
        meshes["2d"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        meshes["1x4"] = init_device_mesh("cpu", (1, 4), mesh_dim_names=("x", "y"))
    return meshes


def _build(
    layout: dict[str, tuple[str, tuple[Any, ...]] | None], meshes: dict[str, Any], fill: bool
) -> dict[str, Any]:
    """A state dict holding each key as described: (mesh, placements) or None (plain tensor)."""
    from torch.distributed.tensor import distribute_tensor

    sd: dict[str, Any] = {}
    for name, where in layout.items():
        src = full(name) if fill else garbage_like(full(name))
        if where is None:
            sd[name] = src
        else:
            mesh_name, placements = where
            sd[name] = distribute_tensor(src, meshes[mesh_name], list(placements))
    return sd


def _check_loaded(
    sd: dict[str, Any],
    layout: dict[str, tuple[str, tuple[Any, ...]] | None],
    meshes: dict[str, Any],
    before: dict[str, Any],
    rank: int,
) -> None:
    """Same objects, filled in place, each local shard bit-equal to its slice of the full tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, where in layout.items():
        got = sd[name]
        assert got is before[name][0], f"rank {rank}: key {name!r} was replaced instead of filled in place"
        if where is None:
            assert_bits_equal(got, full(name), f"rank {rank} key {name!r}")
            continue
        mesh_name, placements = where
        assert isinstance(got, DTensor)
        assert tuple(got.placements) == tuple(placements)
        want = distribute_tensor(full(name), meshes[mesh_name], list(placements)).to_local()
        local = got.to_local()
        if local.numel():
            assert local.data_ptr() == before[name][1], f"rank {rank}: key {name!r} local storage replaced"
        assert_bits_equal(local, want, f"rank {rank} key {name!r} {placements}")


def _snapshot(sd: dict[str, Any]) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in sd.items():
        local = v.to_local() if isinstance(v, DTensor) else v
        out[k] = (v, local.data_ptr() if local.numel() else None)
    return out


def _load_and_check(
    layout: dict[str, Any], meshes: dict[str, Any], path: str, rank: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    sd = _build(layout, meshes, fill=False)
    sd.update(extra or {})
    before = _snapshot({k: sd[k] for k in layout})
    ac.load(sd, path)
    _check_loaded(sd, layout, meshes, before, rank)
    return sd


def _save_on_4(rank: int, world: int, path4: str) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard

    assert world == 4
    meshes = _meshes(world)
    saved = {
        "a": ("1d", (Shard(0),)),
        "b": ("1d", (Shard(0),)),
        "c": ("1d", (Shard(0),)),
        "d": ("1d", (Shard(0),)),
        "e": ("2d", (Replicate(), Shard(0))),
        "f": ("1x4", (Replicate(), Shard(1))),
        "g": None,
        "h": ("1d", (Shard(1),)),
        "i": ("2d", (Shard(0), Shard(0))),
    }
    sd = _build(saved, meshes, fill=True)
    sd["step"] = 7
    shards = {k: tuple(v.to_local().shape) for k, v in sd.items() if k in saved and saved[k] is not None}
    # The layout really is uneven, with empty shards where the test says so.
    assert shards["c"] == ((1, 5) if rank < 3 else (0, 5))
    assert shards["f"] == ((5, 1) if rank < 3 else (5, 0))
    assert shards["h"] == ((1, 3) if rank < 3 else (1, 0))
    md = ac.save(sd, path4)
    assert set(md.tensors) == set(SPECS)

    # Same-world resharding: every key into another layout (f round trips as saved).
    reloaded = {
        "a": ("1d", (Shard(1),)),
        "b": ("1d", (Shard(0),)),
        "c": ("1d", (Shard(1),)),
        "d": ("1d", (Shard(1),)),
        "e": ("2d", (Shard(0), Shard(1))),
        "f": ("1x4", (Replicate(), Shard(1))),
        "g": ("1d", (Shard(0),)),
        "h": ("1d", (Shard(0),)),
        "i": ("2d", (Shard(1), Shard(0))),
    }
    out = _load_and_check(reloaded, meshes, path4, rank, extra={"step": -1})
    assert out["step"] == 7
    # And the saved layout itself round trips.
    _load_and_check(saved, meshes, path4, rank)
    return {"bytes": md.stats.bytes_written if md.stats else None}


def _load4_save2(rank: int, world: int, path4: str, path2: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    assert world == 2
    meshes = _meshes(world)
    # 4 -> 2: Shard(0) saved, Shard(1) loaded where the tensor has a second dim.
    into = {
        "a": ("1d", (Shard(1),)),  # 7 over 2: 4,3
        "b": ("1d", (Shard(0),)),
        "c": ("1d", (Shard(1),)),  # 5 over 2: 3,2
        "d": ("1d", (Shard(1),)),
        "e": ("1d", (Shard(1),)),  # saved on the 2-D mesh
        "f": ("1d", (Shard(0),)),
        "g": None,
        "h": ("1d", (Shard(0),)),  # 1 over 2: 1,0
        "i": ("1d", (Shard(0),)),
    }
    sd = _load_and_check(into, meshes, path4, rank, extra={"step": 0})
    assert sd["step"] == 7

    saved2 = {
        "a": ("1d", (Shard(1),)),
        "b": ("1d", (Shard(0),)),
        "c": ("1d", (Shard(0),)),  # 3 over 2: 2,1
        "d": ("1d", (Shard(0),)),
        "e": ("1d", (Replicate(),)),
        "f": ("1d", (Shard(1),)),  # 3 over 2: 2,1
        "g": None,
        "h": ("1d", (Shard(0),)),  # 1 over 2: 1,0 (rank 1 empty)
        "i": ("1d", (Shard(1),)),  # 3 over 2: 2,1
    }
    sd2 = _build(saved2, meshes, fill=True)
    sd2["step"] = 8
    ac.save(sd2, path2)


def _load2_on_4(rank: int, world: int, path2: str) -> None:
    from torch.distributed.tensor import Replicate, Shard

    assert world == 4
    meshes = _meshes(world)
    into = {
        "a": ("1d", (Shard(0),)),
        "b": ("1d", (Shard(0),)),
        "c": ("1d", (Shard(1),)),
        "d": ("2d", (Shard(0), Shard(1))),
        "e": ("2d", (Replicate(), Shard(1))),
        "f": ("1x4", (Replicate(), Shard(1))),
        "g": ("2d", (Shard(1), Replicate())),
        "h": ("1d", (Shard(1),)),  # 9 over 4: 3,3,3,0
        "i": ("2d", (Shard(0), Shard(0))),
    }
    sd = _load_and_check(into, meshes, path2, rank, extra={"step": 0})
    assert sd["step"] == 8


# ----------------------------------------------------------------- tests


def _check_metadata_tiles(path: Path) -> ac.Metadata:
    md = ac.read_metadata(path)
    for name, (shape, dtype) in SPECS.items():
        rec = md.tensors[name]
        assert rec.shape == shape and rec.dtype == dtype, name
        assert not rec.per_rank, name
        # Replicas were written once: the chunks tile the tensor exactly.
        assert sum(math.prod(c.sizes) for c in rec.chunks) == math.prod(shape), (name, rec.chunks)
    return md


def _load_full_in_parent(path: Path, step: int) -> None:
    assert not (dist.is_available() and dist.is_initialized())
    sd: dict[str, Any] = {name: garbage_like(full(name)) for name in SPECS}
    # Two keys as meta tensors: replaced, inside the same dict, by loaded tensors.
    sd["c"] = torch.empty(SPECS["c"][0], dtype=SPECS["c"][1], device="meta")
    sd["e"] = torch.empty(SPECS["e"][0], dtype=SPECS["e"][1], device="meta")
    # A non-contiguous target (a transposed view) is filled in place too.
    sd["a"] = torch.full(SPECS["a"][0][::-1], 99, dtype=SPECS["a"][1]).t()
    assert not sd["a"].is_contiguous()
    sd["step"] = None
    originals = dict(sd)
    ac.load(sd, path)
    for name in SPECS:
        if name not in ("c", "e"):
            assert sd[name] is originals[name], name
        assert not sd[name].is_meta, name
        assert_bits_equal(sd[name], full(name), f"1-process load of {name!r}")
    assert sd["step"] == step


@pytest.fixture(scope="module")
def saved4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved on 4 ranks (and reloaded there in two layouts, checked inside the ranks)."""
    path = tmp_path_factory.mktemp("reshard") / "ckpt4"
    results = run_ranks(4, _save_on_4, str(path), timeout=TIMEOUT)
    assert all(r["bytes"] is not None for r in results)
    return path


@pytest.fixture(scope="module")
def saved2(saved4: Path) -> Path:
    """Loads the 4-rank checkpoint on 2 ranks (checked there), then saves on 2 ranks."""
    path = saved4.parent / "ckpt2"
    run_ranks(2, _load4_save2, str(saved4), str(path), timeout=TIMEOUT)
    return path


def test_4_to_4_reshard_and_metadata(saved4: Path) -> None:
    md = _check_metadata_tiles(saved4)
    assert md.world_size == 4
    # Shard(0) of (10, 7) over 4 ranks: rows 3,3,3,1.
    a_chunks = sorted((c.offsets, c.sizes) for c in md.tensors["a"].chunks)
    assert a_chunks == [((0, 0), (3, 7)), ((3, 0), (3, 7)), ((6, 0), (3, 7)), ((9, 0), (1, 7))]
    # [Replicate(), Shard(0)] on the (2, 2) mesh: two distinct chunks, each written once.
    e_chunks = sorted((c.offsets, c.sizes) for c in md.tensors["e"].chunks if math.prod(c.sizes))
    assert e_chunks == [((0, 0), (4, 5)), ((4, 0), (3, 5))]
    g_chunks = md.tensors["g"].chunks
    assert len(g_chunks) == 1 and g_chunks[0].sizes == (4, 4)


def test_4_to_1_full_tensors_in_parent(saved4: Path) -> None:
    _load_full_in_parent(saved4, step=7)


def test_4_to_2_then_2_to_1(saved2: Path) -> None:
    md = _check_metadata_tiles(saved2)
    assert md.world_size == 2
    _load_full_in_parent(saved2, step=8)


def test_2_to_4(saved2: Path) -> None:
    run_ranks(4, _load2_on_4, str(saved2), timeout=TIMEOUT)
