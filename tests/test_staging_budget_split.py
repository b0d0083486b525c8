"""Tensors larger than a staging budget, saved as several chunks that fit it.

Under ``staging_budget=B`` a tensor (or a DTensor's local shard) larger than
half of ``B`` is planned as chunks of at most that size (``split_boxes``), so
the rounds' buffer never grows past the budget. Checked here: the boxes tile
every shape exactly and each is one contiguous block; on two real ranks a
replicated tensor's chunks are shared out between the ranks (each writes a
part), a sharded tensor's local shard is split too, the pool holds at most the
budget, and the checkpoints load bit-exact on two ranks, on three, and in one
process, where nothing knows of the budget.
"""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.local_plan import split_boxes
from async_ckpt.testing import same_bits

MB = 1 << 20
BUDGET = 1 * MB


# ------------------------------------------------------------ split_boxes


def _check_tiling(sizes: tuple[int, ...], itemsize: int, cap: int) -> int:
    boxes = split_boxes(sizes, itemsize, cap)
    covered = torch.zeros(sizes, dtype=torch.int32)
    flat = torch.arange(math.prod(sizes)).reshape(sizes)
    for offsets, box in boxes:
        region = tuple(slice(o, o + n) for o, n in zip(offsets, box, strict=True))
        covered[region] += 1
        if len(boxes) > 1:
            assert math.prod(box) * itemsize <= cap, (sizes, itemsize, cap, box)
        # One contiguous run of the row-major order.
        idx = flat[region].reshape(-1)
        if idx.numel():
            assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[0]) + idx.numel())), (sizes, box)
    assert bool((covered == 1).all()), (sizes, itemsize, cap)
    return len(boxes)


@pytest.mark.parametrize(
    ("sizes", "itemsize", "cap", "count"),
    [
        ((10,), 4, 40, 1),  # fits exactly: not split
        ((10,), 4, 39, 2),
        ((3, 5), 4, 20, 3),  # whole rows
        ((3, 5), 4, 8, 9),  # rows larger than the cap: split along the last dimension
        ((2, 3, 4), 2, 16, 4),  # two rows of 8 bytes at a time, within each index of the first
        ((0, 7), 4, 4, 1),  # empty
        ((), 8, 4, 1),  # a scalar is never split
    ],
)
def test_split_boxes_cases(sizes: tuple[int, ...], itemsize: int, cap: int, count: int) -> None:
    assert _check_tiling(sizes, itemsize, cap) == count


def test_split_boxes_tile_random_shapes() -> None:
    rng = random.Random(1234)
    for _ in range(300):
        sizes = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 4)))
        itemsize = rng.choice([1, 2, 4, 8])
        cap = rng.randint(itemsize, math.prod(sizes) * itemsize + 8)
        n = _check_tiling(sizes, itemsize, cap)
        # Not wastefully many: each box but the last of a run holds more than half the cap.
        assert n <= 2 * math.ceil(math.prod(sizes) * itemsize / cap) + math.prod(sizes[:-1]), (sizes, cap, n)


# -------------------------------------------------------------- two ranks


def _full(version: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + version)
    return {
        "rep_big": torch.randn(640, 1024, generator=g),  # 2.5 MiB, replicated
        "rep_small": torch.randn(1000, generator=g),
        "sharded": torch.randn(1280, 512, generator=g),  # Shard(0): 1.25 MiB per rank of two
        "wide": torch.randn(2, 3, 300_000, generator=g).to(torch.bfloat16),  # rows of 600 KB
    }


def _state(version: int, mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    f = _full(version)
    model: dict[str, Any] = {k: v.clone() for k, v in f.items() if k != "sharded"}
    model["sharded"] = distribute_tensor(f["sharded"], mesh, [Shard(0)])
    return {"model": model, "step": version}


def _check_on_ranks(path: str, version: int, mesh: Any) -> None:
    got = _state(0, mesh)
    with torch.no_grad():
        for t in got["model"].values():
            (t.to_local() if hasattr(t, "to_local") else t).zero_()
    ac.load(got, path)
    for k, w in _full(version).items():
        g = got["model"][k]
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        assert same_bits(g, w), (path, k)
    assert got["step"] == version


def _save_body(rank: int, world: int, root: str) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    out: dict[str, Any] = {"staging": [], "written": []}
    with ac.AsyncCheckpointer(staging_budget=BUDGET, timeout=120.0, start=True) as ck:
        dist.barrier()
        for version in range(2):
            md = ck.save(_state(version, mesh), f"{root}/v{version}").result(120)
            out["staging"].append(ck.staging_bytes)
            out["written"].append(
                {
                    fqn.removeprefix("model."): sum(
                        c.byte_length for c in rec.chunks if md.files[c.file].rank == rank
                    )
                    for fqn, rec in md.tensors.items()
                }
            )
            out["chunks"] = {fqn.removeprefix("model."): len(rec.chunks) for fqn, rec in md.tensors.items()}
            _check_on_ranks(f"{root}/v{version}", version, mesh)
    return out


def _load_body(rank: int, world: int, root: str) -> bool:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for v in range(2):
        _check_on_ranks(f"{root}/v{v}", v, mesh)
    return True


@pytest.mark.slow
def test_two_ranks_split_replicated_and_sharded_tensors_and_load_anywhere(tmp_path: Path) -> None:
    results = run_ranks(2, _save_body, str(tmp_path), timeout=300.0, pg_timeout=120.0)
    full = _full(0)
    for rank, r in enumerate(results):
        assert all(s <= BUDGET for s in r["staging"]), (rank, r["staging"])
        chunks = r["chunks"]
        # 2.5 MiB in pieces of at most 512 KiB; each rank's 1.25 MiB shard in three.
        assert chunks["rep_big"] >= 5 and chunks["sharded"] >= 6 and chunks["wide"] >= 6, chunks
        assert chunks["rep_small"] == 1, chunks
    for version in range(2):
        by_rank = [r["written"][version] for r in results]
        for fqn in ("rep_big", "wide"):
            # Replicated chunks are written once, by either rank: both take a part.
            nbytes = full[fqn].numel() * full[fqn].element_size()
            assert sum(w[fqn] for w in by_rank) == nbytes, (fqn, by_rank)
            assert all(w[fqn] > 0 for w in by_rank), (fqn, by_rank)
    for v in range(2):
        got = {"model": {k: torch.zeros_like(t) for k, t in _full(v).items()}, "step": -1}
        ac.load(got, tmp_path / f"v{v}")
        for k, w in _full(v).items():
            assert same_bits(got["model"][k], w), (v, k)
        whole = ac.load_state_dict(tmp_path / f"v{v}")
        assert all(same_bits(whole["model"][k], w) for k, w in _full(v).items())
    assert run_ranks(3, _load_body, str(tmp_path), timeout=300.0, pg_timeout=120.0) == [True] * 3


def test_split_boxes_is_row_major_order() -> None:
    # Pieces come in the order of the data, so a split tensor is staged front to back.
    boxes = split_boxes((2, 3, 4), 1, 5)
    starts = [o[0] * 12 + o[1] * 4 + o[2] for o, _ in boxes]
    assert starts == sorted(starts)
    assert list(itertools.accumulate(math.prod(b) for _, b in boxes))[-1] == 24
