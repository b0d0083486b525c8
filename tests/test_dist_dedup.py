"""Replicas are written once, and values that differ per rank are kept per rank.

* Plain tensors held identically by every rank, and DTensors with
  ``Replicate()``, appear in the checkpoint as exactly one chunk each; the
  shard files hold about the unique bytes; the writing is spread evenly.
* A non-tensor value that differs between ranks is saved per rank and comes
  back per rank; loading it with another world size raises. Equal values are
  one value that loads anywhere.
* Plain tensors that differ per rank: with ``verify_replicas=True`` the
  library hashes them, notices, and keeps each rank's copy. Without it the
  library trusts that equal keys are replicas and keeps ONE copy (whichever
  rank the dedup picks), so every rank loads that same copy back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks

import async_ckpt as ac

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

TIMEOUT = 180.0  # generous: the 2-core machine is often shared

# Equal-ish sizes (float32 elements), so a balanced dedup gives each of 4 ranks ~2.
PLAIN_SIZES = {"p0": 66_000, "p1": 65_000, "p2": 64_500, "p3": 64_000, "p4": 63_000, "p5": 62_000}
REPL_SIZES = {"r0": 65_500, "r1": 62_500}


def _tensor(name: str, numel: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    return torch.randn(numel, generator=gen)


def _unique_bytes() -> int:
    return 4 * (sum(PLAIN_SIZES.values()) + sum(REPL_SIZES.values()))


def _save_replicas(rank: int, world: int, path: str) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    sd: dict[str, Any] = {"model": {n: _tensor(n, k) for n, k in PLAIN_SIZES.items()}}
    sd["model"].update(
        {n: distribute_tensor(_tensor(n, k), mesh, [Replicate()]) for n, k in REPL_SIZES.items()}
    )
    sd["epoch"] = 5
    md = ac.save(sd, path)
    assert md.stats is not None

    # And it loads back on the same ranks.
    target: dict[str, Any] = {"model": {n: torch.zeros(k) for n, k in PLAIN_SIZES.items()}}
    target["model"].update(
        {n: distribute_tensor(torch.zeros(k), mesh, [Replicate()]) for n, k in REPL_SIZES.items()}
    )
    ac.load(target, path)
    for n, k in PLAIN_SIZES.items():
        assert torch.equal(target["model"][n], _tensor(n, k)), n
    for n, k in REPL_SIZES.items():
        assert isinstance(target["model"][n], DTensor)
        assert torch.equal(target["model"][n].to_local(), _tensor(n, k)), n
    return md.stats.bytes_written


def test_replicas_written_once_and_balanced(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    written = run_ranks(4, _save_replicas, str(path), timeout=TIMEOUT)

    md = ac.read_metadata(path)
    for n, k in {**PLAIN_SIZES, **REPL_SIZES}.items():
        rec = md.tensors[f"model.{n}"]
        assert rec.shape == (k,)
        assert len(rec.chunks) == 1, (n, rec.chunks)
        assert rec.chunks[0].sizes == (k,) and not rec.per_rank
    assert md.values["epoch"].per_rank is None

    shard_bytes = sum(os.path.getsize(path / f) for f in os.listdir(path) if f != "metadata.json")
    unique = _unique_bytes()
    assert unique <= shard_bytes <= unique * 1.01 + 8 * 1024, (shard_bytes, unique)
    assert sum(written) == shard_bytes, (written, shard_bytes)

    mean = sum(written) / len(written)
    assert max(written) / mean <= 1.3, written
    assert min(written) > 0, written

    # A single process reads the replicas back too.
    target = {"model": {n: torch.zeros(k) for n, k in {**PLAIN_SIZES, **REPL_SIZES}.items()}}
    ac.load(target, path)
    for n, k in {**PLAIN_SIZES, **REPL_SIZES}.items():
        assert torch.equal(target["model"][n], _tensor(n, k)), n


# ------------------------------------------------------------ per-rank values


COMMON = {"epoch": 3, "name": "run-1", "lr": 0.5, "flags": [True, None], "blob": b"\x00xy"}


def _blank_common() -> dict[str, Any]:
    # load fills the keys the target has (plain dicts are not grown), so list them all.
    return {"epoch": 0, "name": "", "lr": 0.0, "flags": [None, None], "blob": b""}


def _per_rank(rank: int, world: int, vals: str, verified: str, trusted: str) -> dict[str, Any]:
    assert world == 2
    same = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    ac.save({"loader": {"pos": rank * 100}, "common": dict(COMMON), "w": same.clone()}, vals)
    mine = torch.full((5,), float(rank + 1))
    ac.save({"t": mine.clone(), "same": same.clone()}, verified, verify_replicas=True)
    ac.save({"t": mine.clone(), "same": same.clone()}, trusted)

    sd: dict[str, Any] = {"loader": {"pos": None}, "common": _blank_common(), "w": torch.zeros(3, 4)}
    ac.load(sd, vals)
    assert sd["loader"]["pos"] == rank * 100
    assert sd["common"] == COMMON, sd["common"]
    assert torch.equal(sd["w"], same)

    sd = {"t": torch.zeros(5), "same": torch.zeros(3, 4)}
    ac.load(sd, verified)
    assert torch.equal(sd["t"], mine), sd["t"]
    assert torch.equal(sd["same"], same)

    sd = {"t": torch.zeros(5)}
    ac.load(sd, trusted)
    return {"trusted_t": sd["t"].tolist()}


@pytest.fixture(scope="module")
def per_rank_ckpts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str, list[Any]]:
    root = tmp_path_factory.mktemp("per_rank")
    vals, verified, trusted = (str(root / n) for n in ("vals", "verified", "trusted"))
    results = run_ranks(2, _per_rank, vals, verified, trusted, timeout=TIMEOUT)
    return vals, verified, trusted, results


def test_values_that_differ_per_rank(per_rank_ckpts: tuple[str, str, str, list[Any]]) -> None:
    vals, verified, trusted, results = per_rank_ckpts

    # Non-tensor values: per rank where they differ, one value where they agree.
    md = ac.read_metadata(vals)
    assert md.values["loader.pos"].per_rank is not None
    assert md.values["common.epoch"].per_rank is None
    assert md.values["common.flags"].per_rank is None  # a plain list is one value (format 2)

    with pytest.raises(ac.CheckpointError, match=r"loader\.pos"):
        ac.load({"loader": {"pos": None}}, vals)
    # Equal values (and replicated tensors) load with any world size.
    sd: dict[str, Any] = {"common": _blank_common(), "w": torch.zeros(3, 4)}
    ac.load(sd, vals)
    assert sd["common"] == COMMON
    assert torch.equal(sd["w"], torch.arange(12, dtype=torch.float32).reshape(3, 4))

    # verify_replicas=True: the differing plain tensor is saved once per rank.
    md = ac.read_metadata(verified)
    assert md.tensors["t"].per_rank
    assert sorted(c.rank for c in md.tensors["t"].chunks) == [0, 1]
    assert len(md.tensors["same"].chunks) == 1 and not md.tensors["same"].per_rank
    with pytest.raises(ac.CheckpointError, match=r"'t'"):
        ac.load({"t": torch.zeros(5)}, verified)
    sd = {"same": torch.zeros(3, 4)}
    ac.load(sd, verified)
    assert torch.equal(sd["same"], torch.arange(12, dtype=torch.float32).reshape(3, 4))

    # Without verify_replicas: documented behaviour is ONE copy, read by everyone.
    md = ac.read_metadata(trusted)
    assert not md.tensors["t"].per_rank and len(md.tensors["t"].chunks) == 1
    got = [r["trusted_t"] for r in results]
    assert got[0] == got[1], got
    assert got[0] in ([1.0] * 5, [2.0] * 5), got
    sd = {"t": torch.zeros(5)}
    ac.load(sd, trusted)
    assert sd["t"].tolist() == got[0]


def test_strict_false_leaves_per_rank_value_as_the_error_suggests(
    per_rank_ckpts: tuple[str, str, str, list[Any]],
) -> None:
    vals = per_rank_ckpts[0]
    sd: dict[str, Any] = {"loader": {"pos": None}, "common": _blank_common()}
    ac.load(sd, vals, strict=False)
    assert sd["loader"]["pos"] is None
    assert sd["common"] == COMMON
