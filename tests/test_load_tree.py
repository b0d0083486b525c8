"""``ac.load_state_dict``: a checkpoint read back as a new nested state dict, with no target.

Ours and DCP's; whole tensors from sharded saves; ``keys=`` reads only the
bytes of what it selects (counted through a storage wrapper).
"""

from __future__ import annotations

import collections
import datetime
import decimal
import math
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from harness import run_ranks

import async_ckpt as ac
from async_ckpt.format.values import PickleRefusedError
from async_ckpt.storage import LocalStorage
from async_ckpt.storage.base import CheckpointSource, ShardReader

TIMEOUT = 300.0

Point = collections.namedtuple("Point", ["x", "y"])


class _CountingReader:
    def __init__(self, inner: ShardReader, name: str, counts: dict[str, int], lock: threading.Lock) -> None:
        self._inner, self._name, self._counts, self._lock = inner, name, counts, lock

    def size(self) -> int:
        return self._inner.size()

    def readinto(self, offset: int, buf: memoryview) -> None:
        with self._lock:
            self._counts[self._name] = self._counts.get(self._name, 0) + len(buf)
        self._inner.readinto(offset, buf)

    def close(self) -> None:
        self._inner.close()


class _CountingSource:
    def __init__(self, inner: CheckpointSource, counts: dict[str, int], lock: threading.Lock) -> None:
        self._inner, self._counts, self._lock = inner, counts, lock
        self.pinned = inner.pinned

    def metadata(self) -> bytes:
        return self._inner.metadata()

    def open_reader(self, name: str) -> ShardReader:
        return _CountingReader(self._inner.open_reader(name), name, self._counts, self._lock)

    def replaced(self) -> bool:
        return self._inner.replaced()

    def close(self) -> None:
        self._inner.close()


class CountingStorage(LocalStorage):
    """Local storage that counts the bytes read from each file (shards, DCP data files)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def open_checkpoint(self, location: str) -> CheckpointSource:
        return _CountingSource(super().open_checkpoint(location), self.counts, self._lock)

    def open_reader(self, location: str, name: str) -> ShardReader:
        return _CountingReader(super().open_reader(location, name), name, self.counts, self._lock)


def _bits(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.dtype, tuple(t.shape), t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _same(a: Any, b: Any) -> bool:
    """Equal, types included, tensors bit for bit, NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return _bits(a) == _bits(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


def _rich_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16)},
        "optim": {
            "state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.randn(5, 3, generator=g)}, 1: {}},
            "param_groups": [{"lr": 0.1, "params": [0, 1], "betas": (0.9, 0.99)}],
        },
        "layers": [{"k": torch.arange(4, dtype=torch.int32)}, {"k": torch.zeros(0, 2)}],
        "pair": (torch.ones(2, dtype=torch.float64), "tag"),
        "hist": [1.5, 2.5, math.nan],
        "values": {
            "step": 7,
            "flag": True,
            "none": None,
            "name": "run",
            "blob": b"\x00\xff",
            "when": datetime.datetime(2026, 1, 2, 3, 4, 5),
            "money": decimal.Decimal("1.25"),
            "path": PurePosixPath("/a/b"),
            "size": torch.Size([2, 3]),
            "dtype": torch.float16,
            "big": 2**100,
            "inf": -math.inf,
            "tags": {"a", "b"},
        },
        "scalar": torch.tensor(4.5),
    }


def test_load_state_dict_returns_the_saved_tree(tmp_path: Path) -> None:
    sd = _rich_state()
    ac.save(sd, tmp_path / "c")
    got = ac.load_state_dict(tmp_path / "c")
    assert _same(got, sd)
    assert list(got["optim"]["state"]) == [0, 1]  # int keys stay ints


def test_load_state_dict_gives_namedtuples_back_with_their_fields(tmp_path: Path) -> None:
    sd = {"p": Point(torch.ones(2), 3), "nested": {"q": [Point(x=torch.zeros(1), y="s")]}}
    ac.save(sd, tmp_path / "c")
    got = ac.load_state_dict(tmp_path / "c")
    assert got["p"]._fields == ("x", "y") and got["p"].y == 3
    assert _bits(got["p"].x) == _bits(sd["p"].x)
    q = got["nested"]["q"][0]
    assert q._fields == ("x", "y") and q.y == "s" and _bits(q.x) == _bits(torch.zeros(1))
    assert tuple(got["p"]) == (got["p"].x, 3)


def test_keys_select_by_key_and_prefix_and_read_only_their_bytes(tmp_path: Path) -> None:
    big = torch.randn(256, 1024)  # 1 MiB that a selection leaving it out must not read
    sd = {"model": {"a": torch.arange(6.0), "big": big}, "optim": {"lr": 0.5, "m": torch.ones(3)}, "step": 2}
    ac.save(sd, tmp_path / "c")
    storage = CountingStorage()
    got = ac.load_state_dict(tmp_path / "c", keys=["model.a", "optim"], storage=storage)
    assert _same(got, {"model": {"a": sd["model"]["a"]}, "optim": sd["optim"]})
    assert 0 < sum(storage.counts.values()) < big.nbytes // 8

    storage = CountingStorage()
    got = ac.load_state_dict(tmp_path / "c", keys=["step"], storage=storage)
    assert got == {"step": 2}
    assert sum(storage.counts.values()) == 0  # a value lives in metadata.json: no shard is read


def test_keys_keep_list_positions_of_what_they_leave_out(tmp_path: Path) -> None:
    sd = {"layers": [{"w": torch.ones(1)}, {"w": torch.zeros(2)}]}
    ac.save(sd, tmp_path / "c")
    got = ac.load_state_dict(tmp_path / "c", keys=["layers.1"])
    assert got["layers"][0] is None and _bits(got["layers"][1]["w"]) == _bits(torch.zeros(2))


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    ac.save({"a": torch.ones(1)}, tmp_path / "c")
    with pytest.raises(ac.CheckpointError, match=r"'nope'"):
        ac.load_state_dict(tmp_path / "c", keys=["nope"])
    with pytest.raises(ac.CheckpointError, match=r"'a\.b'"):
        ac.load_state_dict(tmp_path / "c", keys=["a.b"])


class Opaque:
    def __init__(self, v: int) -> None:
        self.v = v


def test_pickled_value_needs_allow_pickle_only_when_selected(tmp_path: Path) -> None:
    ac.save({"a": torch.ones(1), "o": Opaque(3)}, tmp_path / "c", allow_pickle=True)
    with pytest.raises(PickleRefusedError, match="'o'"):
        ac.load_state_dict(tmp_path / "c")
    assert _same(ac.load_state_dict(tmp_path / "c", keys=["a"]), {"a": torch.ones(1)})
    assert ac.load_state_dict(tmp_path / "c", allow_pickle=True)["o"].v == 3


def test_corrupted_shard_fails_its_checksum(tmp_path: Path) -> None:
    ac.save({"a": torch.randn(64)}, tmp_path / "c")
    shard = next(p for p in (tmp_path / "c").iterdir() if p.name != "metadata.json")
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(ac.CorruptCheckpointError, match="checksum"):
        ac.load_state_dict(tmp_path / "c")


def test_map_location_moves_tensors(tmp_path: Path) -> None:
    ac.save({"a": torch.ones(2)}, tmp_path / "c")
    got = ac.load_state_dict(tmp_path / "c", map_location="meta")
    assert got["a"].device.type == "meta" and got["a"].shape == (2,)


# ------------------------------------------------------------ sharded saves

SHAPE = (9, 5)


def _full() -> torch.Tensor:
    return torch.arange(math.prod(SHAPE), dtype=torch.float32).reshape(SHAPE)


def _save_sharded(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    sd = {
        "rows": distribute_tensor(_full(), mesh, [Shard(0)]),
        "cols": distribute_tensor(_full() * 2, mesh, [Shard(1)]),
        "rep": distribute_tensor(torch.ones(3), mesh, [Replicate()]),
        "other": torch.full((1000,), 5.0),
        "step": 11,
    }
    ac.save(sd, path)


def _load_tree_on_ranks(rank: int, world: int, path: str) -> list[Any]:
    got = ac.load_state_dict(path)
    return [_bits(got["rows"]), _bits(got["cols"]), got["step"], type(got["rows"]) is torch.Tensor]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "c"
    run_ranks(2, _save_sharded, str(path), timeout=TIMEOUT)
    return path


@pytest.mark.slow
def test_dtensors_saved_on_2_ranks_come_back_as_whole_plain_tensors(sharded: Path) -> None:
    got = ac.load_state_dict(sharded)
    assert type(got["rows"]) is torch.Tensor and _bits(got["rows"]) == _bits(_full())
    assert _bits(got["cols"]) == _bits(_full() * 2)
    assert _bits(got["rep"]) == _bits(torch.ones(3)) and got["step"] == 11
    md = ac.read_metadata(sharded)
    assert len(md.tensors["rows"].chunks) == 2


@pytest.mark.slow
def test_every_rank_of_a_group_gets_the_whole_tree(sharded: Path) -> None:
    results = run_ranks(2, _load_tree_on_ranks, str(sharded), timeout=TIMEOUT)
    expected = [_bits(_full()), _bits(_full() * 2), 11, True]
    assert results == [expected, expected]


def test_keys_open_only_the_files_holding_the_selection(sharded: Path) -> None:
    md = ac.read_metadata(sharded)
    files = {c.file for rec in md.tensors.values() for c in rec.chunks}
    assert len(files) >= 2
    want = {c.file for c in md.tensors["other"].chunks}
    assert want < files
    storage = CountingStorage()
    got = ac.load_state_dict(sharded, keys=["other"], storage=storage)
    assert _bits(got["other"]) == _bits(torch.full((1000,), 5.0))
    assert set(storage.counts) == want


# ------------------------------------------------------------------- DCP


def _dcp_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(9)
    return {
        "model": {"w": torch.randn(4, 6, generator=g), "big": torch.randn(128, 1024, generator=g)},
        "optim": {"state": {"0": {"exp_avg": torch.randn(4, 6, generator=g)}}, "lr": 0.25},
        "step": 5,
        "hist": [1.0, 2.0],
    }


def test_dcp_checkpoint_loads_without_a_target(tmp_path: Path) -> None:
    sd = _dcp_state()
    dcp.save(sd, checkpoint_id=str(tmp_path / "d"))
    got = ac.load_state_dict(tmp_path / "d")
    assert _bits(got["model"]["w"]) == _bits(sd["model"]["w"])
    assert _bits(got["model"]["big"]) == _bits(sd["model"]["big"])
    assert _bits(got["optim"]["state"][0]["exp_avg"]) == _bits(sd["optim"]["state"]["0"]["exp_avg"])
    assert got["optim"]["lr"] == 0.25 and got["step"] == 5 and got["hist"] == [1.0, 2.0]


def test_dcp_keys_read_only_the_selected_chunks(tmp_path: Path) -> None:
    sd = _dcp_state()
    dcp.save(sd, checkpoint_id=str(tmp_path / "d"))
    storage = CountingStorage()
    got = ac.load_state_dict(tmp_path / "d", keys=["model.w"], storage=storage)
    assert _bits(got["model"]["w"]) == _bits(sd["model"]["w"]) and list(got) == ["model"]
    data = sum(n for name, n in storage.counts.items() if name != ".metadata")
    assert 0 < data < sd["model"]["big"].nbytes // 8


def _save_and_load_per_rank(rank: int, world: int, path: str) -> Any:
    ac.save({"rank": rank, "w": torch.ones(2)}, path)
    got = ac.load_state_dict(path)
    return [got["rank"], _bits(got["w"])]


@pytest.mark.slow
def test_per_rank_values_come_back_as_each_rank_s_own_and_need_the_saved_world(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    results = run_ranks(2, _save_and_load_per_rank, path, timeout=TIMEOUT)
    assert results == [[0, _bits(torch.ones(2))], [1, _bits(torch.ones(2))]]
    with pytest.raises(ac.CheckpointError, match=r"'rank'.*2 ranks"):
        ac.load_state_dict(path)
    assert _same(ac.load_state_dict(path, keys=["w"]), {"w": torch.ones(2)})
