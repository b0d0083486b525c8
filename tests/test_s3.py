"""``s3://`` end to end, against a real S3-compatible server on loopback (moto's server mode).

* blocking save/load, async save through the worker process, 2 ranks saving
  DTensors, overwrite, multipart uploads with concurrent parts;
* the marker commit: a prefix without ``metadata.json`` is no checkpoint; an
  interrupted save (failing commit, killed worker, shards written by hand) is
  not readable and ``remove_uncommitted`` removes it; nothing non-checkpoint
  is ever overwritten;
* a byte changed in a stored object is a ``CorruptCheckpointError``.

The server and its bucket are shared by the session; every test writes under
its own prefix. The server's endpoint reaches worker and rank processes
through ``AWS_ENDPOINT_URL``, so nothing here can talk to a non-loopback host.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import pickle
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from harness import run_ranks
from s3_server import S3Server, s3_server
from torch import nn

import async_ckpt as ac
from async_ckpt.storage import FsspecStorage, detect_storage
from async_ckpt.testing import same_bits

BUCKET = "ckpt"
KILL_ENV = "ASYNC_CKPT_KILL_AT"
MB = 1 << 20


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server() as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.endpoint_url)
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def root(s3: S3Server, request: pytest.FixtureRequest) -> str:
    """A fresh prefix for this test: s3://ckpt/<test name>."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)
    return f"s3://{BUCKET}/{name}"


# ------------------------------------------------------------------ helpers


def _keys(s3: S3Server, prefix: str) -> dict[str, int]:
    """Object key -> size under ``s3://ckpt/<prefix>``, straight from the server."""
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _key(url: str) -> str:
    return url.removeprefix(f"s3://{BUCKET}/")


def _state(seed: int, mb: float = 1.0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n = int(mb * MB) // 4
    return {
        "w": torch.randn(n, generator=g),
        "h": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "i": torch.randint(-(2**40), 2**40, (129,), generator=g),
        "flags": torch.rand(17, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
        "step": seed,
        "meta": {"name": f"run-{seed}", "lr": 0.5, "tags": ["a", None, True], "blob": b"\x00\xff"},
    }


def _blank(x: Any) -> Any:
    """Same structure, tensors zeroed, plain values None: a target to load into."""
    if isinstance(x, torch.Tensor):
        return torch.zeros_like(x)
    if isinstance(x, dict):
        return {k: _blank(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_blank(v) for v in x]
    return None


def _assert_loaded(got: dict[str, Any], want: dict[str, Any]) -> None:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert same_bits(got[k], v), k
        else:
            assert got[k] == v, k


def _load_back(url: str, want: dict[str, Any]) -> None:
    got = _blank(want)
    ac.load(got, url)
    _assert_loaded(got, want)


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _train(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(8, 16, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


# ------------------------------------------------------------------- saving


def test_blocking_round_trip_bit_exact(s3: S3Server, root: str) -> None:
    url = f"{root}/c0"
    sd = _state(1, mb=3)
    md = ac.save(sd, url)
    assert md.tensors["w"].shape == sd["w"].shape
    keys = _keys(s3, _key(url) + "/")
    assert f"{_key(url)}/metadata.json" in keys
    assert not any("/.async_ckpt-" in k for k in keys), keys  # the marker is gone after the commit
    assert ac.read_metadata(url).tensors["h"].dtype == torch.bfloat16
    _load_back(url, sd)
    _load_back(url + "/", sd)  # a trailing slash names the same checkpoint


def test_module_and_optimizer_round_trip(root: str) -> None:
    torch.manual_seed(0)
    model = _MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for s in range(3):
        _train(model, opt, s)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    ac.save({"model": model, "optim": opt, "epoch": 3}, f"{root}/c")

    torch.manual_seed(1)
    fresh = _MLP()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    target = {"model": fresh, "optim": fresh_opt, "epoch": 0}
    ac.load(target, f"{root}/c")
    assert target["epoch"] == 3 and target["model"] is fresh
    for k, v in saved_model.items():
        assert same_bits(fresh.state_dict()[k], v), k
    for pid, state in saved_opt["state"].items():
        for name, t in state.items():
            assert same_bits(fresh_opt.state_dict()["state"][pid][name], t), (pid, name)
    _train(model, opt, 9)
    _train(fresh, fresh_opt, 9)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert same_bits(a, b), k


def test_detected_storage_pickles_and_works_after_unpickling(root: str) -> None:
    storage, location = detect_storage(f"{root}/p")
    assert isinstance(storage, FsspecStorage) and location == f"{root}/p"
    ac.save({"x": torch.arange(10)}, location, storage=storage)  # builds its file system
    clone = pickle.loads(pickle.dumps(storage))
    assert clone.part_size == storage.part_size
    assert clone.read_threads == storage.read_threads == 8
    got = {"x": torch.zeros(10, dtype=torch.int64)}
    ac.load(got, location, storage=clone)
    assert torch.equal(got["x"], torch.arange(10))


@pytest.fixture(scope="module")
def ck(s3: S3Server) -> Iterator[ac.AsyncCheckpointer]:
    """One background worker for the module (starting one costs seconds); it inherits the endpoint."""
    with ac.AsyncCheckpointer(timeout=60) as c:
        yield c


@pytest.mark.slow
@pytest.mark.asyncio
async def test_async_save_through_the_worker(ck: ac.AsyncCheckpointer, root: str) -> None:
    sd0, sd1 = _state(10, mb=6), _state(11, mb=6)
    want0, want1 = copy.deepcopy(sd0), copy.deepcopy(sd1)
    pending = await ck.async_save(sd0, f"{root}/a")
    sd0["w"].zero_()  # staged: the caller may change its tensors at once
    md = await pending
    assert isinstance(md, ac.Metadata)
    _load_back(f"{root}/a", want0)

    # Same layout, same prefix: the cached plan (every worker calls begin_save), and an overwrite.
    md = await asyncio.to_thread(ck.save(sd1, f"{root}/a").result, 60)
    assert md.stats is not None and md.stats.plan_cached
    _load_back(f"{root}/a", want1)


@pytest.mark.slow
def test_explicit_endpoint_reaches_the_worker_and_a_killed_save_leaves_no_checkpoint(
    s3: S3Server, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage options are pickled into the worker: the environment's endpoint is a dead loopback
    port here, so only ``endpoint_url=`` can reach the server. The worker's second save is killed
    once its shards are written (the worker inherits the environment when it starts)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv(KILL_ENV, "write:1")
    storage = FsspecStorage(endpoint_url=s3.endpoint_url)
    sd = _state(12, mb=6)
    want = copy.deepcopy(sd)
    with ac.AsyncCheckpointer(timeout=60, storage=storage) as c:
        assert isinstance(c.save(sd, f"{root}/a").result(60), ac.Metadata)
        failed = c.save(sd, f"{root}/b")
        with pytest.raises(ac.CheckpointError):
            failed.result(60)
    got = _blank(want)
    ac.load(got, f"{root}/a", storage=storage)
    _assert_loaded(got, want)

    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(f"{root}/b", storage=storage)
    left = _keys(s3, _key(root) + "/b/")
    assert any("shard-" in k for k in left) and any("/.async_ckpt-writing-" in k for k in left), left
    assert storage.list_children(root) == [f"{root}/a", f"{root}/b"]
    assert storage.remove_uncommitted(root) == [f"{root}/b"]
    assert _keys(s3, _key(root) + "/b/") == {}
    ac.read_metadata(f"{root}/a", storage=storage)


def _save_dtensor_rank(rank: int, world: int, url: str) -> int:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(10 * 6, dtype=torch.float32).reshape(10, 6)
    sd = {
        "rows": distribute_tensor(full, mesh, [Shard(0)]),
        "cols": distribute_tensor(full * 2, mesh, [Shard(1)]),
        "plain": torch.ones(3),
        "step": 7,
    }
    ac.save(sd, url)
    return rank


@pytest.mark.slow
def test_two_ranks_save_dtensors_loaded_in_parent(s3: S3Server, root: str) -> None:
    url = f"{root}/dist"
    assert run_ranks(2, _save_dtensor_rank, url, timeout=120) == [0, 1]
    names = [k.rsplit("/", 1)[-1] for k in _keys(s3, _key(url) + "/")]
    assert any(n.startswith("shard-r00001-") for n in names), names  # rank 1 wrote its own shards
    full = torch.arange(10 * 6, dtype=torch.float32).reshape(10, 6)
    got: dict[str, Any] = {
        "rows": torch.zeros(10, 6),
        "cols": torch.zeros(10, 6),
        "plain": torch.zeros(3),
        "step": 0,
    }
    ac.load(got, url)
    assert torch.equal(got["rows"], full) and torch.equal(got["cols"], full * 2)
    assert torch.equal(got["plain"], torch.ones(3)) and got["step"] == 7


# ----------------------------------------------------------- commit protocol


def test_prefix_without_metadata_is_not_a_checkpoint(s3: S3Server, root: str) -> None:
    url = f"{root}/half"
    s3.client().put_object(Bucket=BUCKET, Key=f"{_key(url)}/shard-r00000-00.safetensors", Body=b"x" * 100)
    with pytest.raises(ac.CheckpointError, match=r"metadata\.json"):
        ac.read_metadata(url)
    with pytest.raises(ac.CheckpointError):
        ac.load({"x": torch.zeros(1)}, url)
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(f"{root}/nothing-here")


class _FailingCommit(FsspecStorage):
    def commit(self, location: str, token: str, metadata: bytes) -> None:
        raise OSError("injected commit failure")


def test_failed_commit_leaves_nothing_readable(s3: S3Server, root: str) -> None:
    url = f"{root}/c"
    sd = _state(2)
    ac.save(sd, url)
    with pytest.raises(Exception, match="injected commit failure"):
        ac.save(_state(3), url, storage=_FailingCommit())
    # No rename on S3: the old checkpoint was un-committed when the overwrite began.
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(url)
    assert _keys(s3, _key(url) + "/") == {}  # abort_save removed the shards and the marker


def test_interrupted_save_is_removed_by_remove_uncommitted(s3: S3Server, root: str) -> None:
    storage = FsspecStorage()
    ac.save(_state(4), f"{root}/done")
    s3.client().put_object(Bucket=BUCKET, Key=f"{_key(root)}/notes/readme.txt", Body=b"not ours")

    # A save that died after writing its shards: begin, write, never commit.
    url = f"{root}/crashed"
    storage.begin_save(url, "deadbeef")

    async def write() -> None:
        sink = await storage.open_shard(url, "deadbeef", "shard-r00000-00.safetensors")
        await sink.write(memoryview(b"y" * 1000))
        await sink.finish()

    asyncio.run(write())
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(url)
    assert storage.list_children(root) == [f"{root}/crashed", f"{root}/done", f"{root}/notes"]

    assert storage.remove_uncommitted(root) == [f"{root}/crashed"]
    assert _keys(s3, _key(url) + "/") == {}
    assert storage.remove_uncommitted(root) == []
    ac.read_metadata(f"{root}/done")  # committed checkpoints and other data are left alone
    assert _keys(s3, f"{_key(root)}/notes/") != {}

    storage.delete(f"{root}/done")
    assert _keys(s3, f"{_key(root)}/done/") == {}
    assert storage.list_children(root) == [f"{root}/notes"]


def test_overwrite_replaces_and_removes_stale_shards(s3: S3Server, root: str) -> None:
    url = f"{root}/c"
    many = {f"t{i}": torch.full((17 * MB // 4,), float(i)) for i in range(4)}  # several shard files
    ac.save(many, url)
    before = {k for k in _keys(s3, _key(url) + "/") if "shard-" in k}
    assert len(before) > 1
    small = _state(5)
    ac.save(small, url)
    after = {k for k in _keys(s3, _key(url) + "/") if "shard-" in k}
    assert len(after) == 1, after  # the earlier checkpoint's extra shards are gone
    assert set(ac.read_metadata(url).tensors) == {"w", "h", "i", "flags", "empty"}
    _load_back(url, small)


def test_refuses_to_write_into_a_prefix_that_is_not_a_checkpoint(s3: S3Server, root: str) -> None:
    s3.client().put_object(Bucket=BUCKET, Key=f"{_key(root)}/data/train.csv", Body=b"a,b\n")
    with pytest.raises(ac.CheckpointError, match="not a checkpoint"):
        ac.save({"x": torch.ones(2)}, f"{root}/data")
    assert _keys(s3, f"{_key(root)}/data/") == {f"{_key(root)}/data/train.csv": 4}
    s3.client().put_object(Bucket=BUCKET, Key=f"{_key(root)}/notes.txt", Body=b"hi")
    with pytest.raises(ac.CheckpointError, match="is a file"):
        ac.save({"x": torch.ones(2)}, f"{root}/notes.txt")
    assert FsspecStorage().list_children(root) == [f"{root}/data", f"{root}/notes.txt"]


# --------------------------------------------------------------- multipart


def test_large_shard_uploads_in_concurrent_parts(
    s3: S3Server, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aiobotocore.client

    calls = {"active": 0, "peak": 0, "parts": 0}
    original = aiobotocore.client.AioBaseClient._make_api_call

    async def counting(self: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation != "UploadPart":
            return await original(self, operation, params)
        calls["active"] += 1
        calls["parts"] += 1
        calls["peak"] = max(calls["peak"], calls["active"])
        try:
            await asyncio.sleep(0.05)  # a slow network, so parts overlap visibly
            return await original(self, operation, params)
        finally:
            calls["active"] -= 1

    monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", counting)
    storage = FsspecStorage(part_size=5 * MB, upload_concurrency=4)
    url = f"{root}/big"
    sd = {"big": torch.randn(10 * MB, generator=torch.Generator().manual_seed(3))}  # 40 MiB
    md = ac.save(sd, url, storage=storage)
    (name,) = md.files
    size = md.files[name].size
    assert calls["parts"] == -(-size // (5 * MB)) == 9
    assert 2 <= calls["peak"] <= 4, calls
    head = s3.client().head_object(Bucket=BUCKET, Key=f"{_key(url)}/{name}")
    assert head["ContentLength"] == size and head["ETag"].strip('"').endswith("-9")  # one object, 9 parts
    got = {"big": torch.empty(10 * MB)}
    ac.load(got, url)  # read back in concurrent ranged GETs
    assert same_bits(got["big"], sd["big"])
    assert s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", []) == []


def test_aborted_shard_leaves_no_multipart_upload(s3: S3Server, root: str) -> None:
    storage = FsspecStorage(part_size=5 * MB)
    url = f"{root}/c"
    storage.begin_save(url, "0123abcd")

    async def write_then_abort() -> None:
        sink = await storage.open_shard(url, "0123abcd", "shard-r00000-00.safetensors")
        await sink.write(memoryview(bytes(12 * MB)))  # two parts started
        await sink.abort()

    asyncio.run(write_then_abort())
    uploads = s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix=_key(url)).get("Uploads", [])
    assert uploads == []
    assert not any("shard-" in k for k in _keys(s3, _key(url) + "/"))
    storage.abort_save(url, "0123abcd")
    assert _keys(s3, _key(url) + "/") == {}


def test_retried_uploads_resend_the_whole_body(
    s3: S3Server, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3fs retries a throttled request with the same arguments: each attempt needs the full body."""
    import aiobotocore.client
    from botocore.exceptions import ClientError

    failures = {"left": 3}
    original = aiobotocore.client.AioBaseClient._make_api_call

    async def throttled(self: Any, operation: str, params: dict[str, Any]) -> Any:
        if operation in ("UploadPart", "PutObject") and failures["left"]:
            failures["left"] -= 1
            params["Body"].read()  # consumed, as a connection dropped mid-send leaves it
            raise ClientError(
                {"Error": {"Code": "SlowDown", "Message": "reduce your request rate"}}, operation
            )
        return await original(self, operation, params)

    monkeypatch.setattr(aiobotocore.client.AioBaseClient, "_make_api_call", throttled)
    storage = FsspecStorage(part_size=5 * MB)
    sd = {"x": torch.randn(3 * MB, generator=torch.Generator().manual_seed(5)), "y": torch.arange(7)}
    ac.save(sd, f"{root}/c", storage=storage)  # a 12 MiB shard in 3 parts, and metadata.json
    assert failures["left"] == 0
    _load_back(f"{root}/c", sd)


def test_part_size_below_the_s3_minimum_is_refused() -> None:
    with pytest.raises(ValueError, match="5 MiB"):
        FsspecStorage(part_size=MB)


def test_storage_module_names_the_same_metadata_file() -> None:
    from async_ckpt.format.metadata import METADATA_FILE
    from async_ckpt.storage import fsspec_backend

    assert fsspec_backend.METADATA_FILE == METADATA_FILE  # kept apart so storage needs no torch


# --------------------------------------------------------------- corruption


def test_changed_byte_is_corrupt(s3: S3Server, root: str) -> None:
    url = f"{root}/c"
    sd = _state(6, mb=2)
    md = ac.save(sd, url)
    chunk = md.tensors["w"].chunks[0]
    key = f"{_key(url)}/{chunk.file}"
    client = s3.client()
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[chunk.byte_offset + 12345] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(ac.CorruptCheckpointError, match="checksum mismatch"):
        ac.load(_blank(sd), url)

    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data[:-100]))  # truncated
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load(_blank(sd), url)

    client.delete_object(Bucket=BUCKET, Key=key)  # missing
    with pytest.raises(ac.CorruptCheckpointError, match="missing"):
        ac.load(_blank(sd), url)


def test_changed_metadata_byte_is_corrupt(s3: S3Server, root: str) -> None:
    url = f"{root}/c"
    ac.save(_state(7), url)
    key = f"{_key(url)}/metadata.json"
    client = s3.client()
    data = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with pytest.raises(ac.CorruptCheckpointError):
        ac.read_metadata(url)


# ---------------------------------------------------------- other backends


def test_memory_filesystem_uses_the_plain_writer() -> None:
    url = "memory://async_ckpt_test/c"
    sd = _state(8)
    ac.save(sd, url)
    _load_back(url, sd)
    storage, _ = detect_storage(url)
    storage.delete(url)
    with pytest.raises(ac.CheckpointError):
        ac.read_metadata(url)


# ------------------------------------------------------- manager and CLI

_HAVE_MANAGER = importlib.util.find_spec("async_ckpt.manager") is not None
_HAVE_CLI = importlib.util.find_spec("async_ckpt.cli") is not None


@pytest.mark.skipif(not _HAVE_MANAGER, reason="async_ckpt.manager is not written yet")
def test_manager_on_s3(s3: S3Server, ck: ac.AsyncCheckpointer, root: str) -> None:
    from async_ckpt.manager import CheckpointManager, remove_uncommitted, step_name

    run = f"{root}/run"
    sd1, sd2 = _state(20), _state(21)
    want2 = copy.deepcopy(sd2)
    with CheckpointManager(run, keep_last=1, checkpointer=ck) as manager:
        manager.save(1, sd1).result(60)
        manager.save(2, sd2).result(60)
        manager.wait(60)
        assert manager.latest() == 2
        assert manager.steps() == [2]  # retention deleted step 1 from S3
        assert _keys(s3, f"{_key(run)}/{step_name(1)}/") == {}
        got = _blank(want2)
        assert manager.restore(got) == 2
        _assert_loaded(got, want2)

    # A save of step 3 that never committed: not the latest, and gc removes it.
    storage = FsspecStorage()
    storage.begin_save(f"{run}/{step_name(3)}", "feedf00d")
    assert CheckpointManager(run).latest() == 2
    assert remove_uncommitted(storage, run) == [f"{run}/{step_name(3)}"]


@pytest.mark.skipif(not _HAVE_CLI, reason="async_ckpt.cli is not written yet")
def test_cli_ls_and_verify_on_s3(s3: S3Server, root: str, capsys: pytest.CaptureFixture[str]) -> None:
    from async_ckpt.cli import main

    url = f"{root}/step-00000005"
    md = ac.save(_state(13), url)
    assert main(["ls", root]) == 0
    out = capsys.readouterr().out
    assert "step-00000005" in out and "yes" in out
    assert main(["verify", url]) == 0
    assert "ok" in capsys.readouterr().out

    chunk = md.tensors["w"].chunks[0]
    key = f"{_key(url)}/{chunk.file}"
    data = bytearray(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[chunk.byte_offset] ^= 0x80
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    assert main(["verify", url]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("replacements", [1, 2], ids=["once", "every-attempt"])
@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
def test_save_committed_during_a_load_is_never_mixed_in_nor_called_damage(
    s3: S3Server, root: str, verify: bool, replacements: int
) -> None:
    """Shards are overwritten in place on S3: a load proves afterwards that metadata.json,
    unique per save, did not change while it read them (issue 11 item 2)."""
    from async_ckpt._faults import set_hook
    from async_ckpt.errors import CheckpointReplacedError

    url = f"{root}/latest"

    def state(i: int) -> dict[str, Any]:
        return {"w": torch.full((MB // 4,), float(i)), "b": torch.full((1000,), float(i)), "step": i}

    ac.save(state(1), url)
    committed: list[int] = []

    def save_next() -> None:  # right after the load read metadata.json, before any shard
        if len(committed) < replacements:
            committed.append(len(committed) + 2)
            ac.save(state(committed[-1]), url)

    target = {"w": torch.zeros(MB // 4), "b": torch.zeros(1000), "step": -1}
    set_hook("load_metadata_read", save_next)
    try:
        if replacements == 1:
            ac.load(target, url, verify=verify)  # the retry reads the new checkpoint, whole
            assert target["step"] == 2
            assert bool((target["w"] == 2).all()) and bool((target["b"] == 2).all())
        else:
            with pytest.raises(CheckpointReplacedError, match=f"{re.escape(url)} was replaced"):
                ac.load(target, url, verify=verify)
            assert target["step"] == -1
    finally:
        set_hook("load_metadata_read", None)
    assert committed == [2, 3][:replacements]
