"""Optional storage and comm features are declared (storage/base.py, dist.py), never probed by name."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import torch

import async_ckpt as ac
from async_ckpt import dist
from async_ckpt.storage import FsspecStorage, LocalStorage
from async_ckpt.storage.base import (
    CheckpointOpener,
    FilesPerRankHint,
    ReadThreadsHint,
    ReservingSink,
    ShardReader,
    ShardSink,
    Storage,
    VectoredReader,
    VectoredSink,
)
from async_ckpt.storage.direct_io import DirectSink
from async_ckpt.storage.local_read import FileReader
from async_ckpt.worker.comm import StoreComm

PACKAGE = Path(ac.__file__).parent
OPTIONAL = {
    "files_per_rank",
    "read_threads",
    "readinto_many",
    "reserve",
    "write_many",
    "open_checkpoint",
    "alignment",
    "direct_min",
    "copied",
}
COMM_OPTIONAL = {"step", "begin"}


def test_no_module_probes_an_optional_feature_by_name() -> None:
    probes = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in OPTIONAL | COMM_OPTIONAL
            ):
                probes.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.args[1].value}")
    assert not probes, f"optional features probed with getattr/hasattr: {probes}"


def test_the_built_in_backends_declare_what_they_offer(tmp_path: Path) -> None:
    local = LocalStorage()
    assert isinstance(local, Storage)
    assert isinstance(local, CheckpointOpener)
    assert isinstance(local, ReadThreadsHint) and isinstance(local, FilesPerRankHint)
    fs = FsspecStorage()
    assert isinstance(fs, Storage) and isinstance(fs, ReadThreadsHint)
    assert not isinstance(fs, CheckpointOpener) and not isinstance(fs, FilesPerRankHint)

    import os

    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o644)
    sink = DirectSink(fd, tmp_path / "f")
    try:
        assert isinstance(sink, ReservingSink) and isinstance(sink, VectoredSink)
    finally:
        os.close(fd)
    (tmp_path / "g").write_bytes(b"abc")
    reader = FileReader.at(tmp_path / "g")
    try:
        assert isinstance(reader, VectoredReader)
    finally:
        reader.close()


def test_every_comm_declares_step_and_begin() -> None:
    assert isinstance(dist.LocalComm(), dist.Comm)
    for cls in (dist.LocalComm, dist.ProcessGroupComm, StoreComm):
        assert callable(getattr(cls, "begin", None)), cls
    local = dist.LocalComm()
    local.begin("save7")
    local.step = "commit"
    assert local.step == "commit"


class _Sink:
    """Only what ShardSink requires: no reserve, no write_many."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def write(self, data: memoryview) -> None:
        await self._inner.write(data)

    async def finish(self) -> None:
        await self._inner.finish()

    async def abort(self) -> None:
        await self._inner.abort()


class _Reader:
    """Only what ShardReader requires: no readinto_many."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def size(self) -> int:
        return int(self._inner.size())

    def readinto(self, offset: int, buf: memoryview) -> None:
        self._inner.readinto(offset, buf)

    def close(self) -> None:
        self._inner.close()


class _MinimalStorage:
    """A third-party backend with the required members only (by delegation, no inheritance)."""

    def __init__(self) -> None:
        self._local = LocalStorage(direct_io=True)

    def resolve(self, checkpoint_id: object) -> str:
        return self._local.resolve(checkpoint_id)

    def begin_save(self, location: str, token: str) -> None:
        self._local.begin_save(location, token)

    async def open_shard(self, location: str, token: str, name: str) -> ShardSink:
        return _Sink(await self._local.open_shard(location, token, name))

    def commit(self, location: str, token: str, metadata: bytes) -> None:
        self._local.commit(location, token, metadata)

    def abort_save(self, location: str, token: str) -> None:
        self._local.abort_save(location, token)

    def read_metadata(self, location: str) -> bytes:
        return self._local.read_metadata(location)

    def open_reader(self, location: str, name: str) -> ShardReader:
        return _Reader(self._local.open_reader(location, name))

    def list_children(self, root: str) -> list[str]:
        return self._local.list_children(root)

    def delete(self, location: str) -> None:
        self._local.delete(location)

    def remove_uncommitted(self, root: str) -> list[str]:
        return self._local.remove_uncommitted(root)


def test_a_backend_with_only_the_required_members_saves_and_loads(tmp_path: Path) -> None:
    storage = _MinimalStorage()
    assert isinstance(storage, Storage)
    for capability in (CheckpointOpener, ReadThreadsHint, FilesPerRankHint):
        assert not isinstance(storage, capability)
    # Many small tensors: the writer would batch them (write_many) and the load read them
    # in runs (readinto_many) if the sink and reader offered it.
    state = {f"t{i}": torch.arange(i * 10, i * 10 + 7, dtype=torch.float32) for i in range(40)}
    state["big"] = torch.randn(300, 300)
    ac.save(state, tmp_path / "c", storage=storage)
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    ac.load(out, tmp_path / "c", storage=storage)
    for k, v in state.items():
        assert torch.equal(out[k], v), k
