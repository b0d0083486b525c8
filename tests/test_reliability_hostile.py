"""Hostile input: hand-made malformed checkpoints give a clear CheckpointError, nothing worse.

Each case starts from a real checkpoint, edits ``metadata.json``'s body and
re-frames it with a correct checksum (so the damage is not caught by the
checksum and reaches the parser and the loader), or crafts shard files.
Every attempt runs ``read_metadata``, ``load`` and ``verify_checkpoint``
under two watchers:

* a ``sys.addaudithook`` hook records every file opened while it runs; a
  sentinel file sits beside the checkpoint, and opening anything outside the
  checkpoint directory fails the case;
* a sampling thread records the process RSS; more than +200 MB fails it.

Only ``CheckpointError`` (or its subclass ``CorruptCheckpointError``) may come
out; no other exception, no hang (the FIFO case runs on a thread with a
deadline). The parsers are also fuzzed with hypothesis (1,000+ cases each).
Pickle: refused unless ``allow_pickle=True``, and the payload provably never
runs when refused.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from _counts import count
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import async_ckpt as ac
from async_ckpt.format import checksum
from async_ckpt.format.metadata import decode_metadata
from async_ckpt.format.shard import parse_header
from async_ckpt.load_flow import read_checkpoint_metadata
from async_ckpt.verify import verify_checkpoint

MB = 1 << 20
RSS_LIMIT = 200 * MB
PREFIX = b'{"format":"async_ckpt","checksum":"xxh3_64:'
MIDDLE = b'","body":'
SHARD = "shard-r00000-00.safetensors"
FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)


def _count(name: str, n: int = 1) -> None:
    # Printed in the terminal summary (tests/conftest.py).
    count("hostile", name, n)


# ------------------------------------------------------------------ watchers


class _OpenWatch:
    """Records files opened (any thread) while armed; outside ``allowed`` is a violation."""

    def __init__(self) -> None:
        self.allowed: str | None = None
        self.watched: str | None = None
        self.violations: list[str] = []

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event != "open" or self.allowed is None or not args:
            return
        raw = args[0]
        if not isinstance(raw, (str, bytes, os.PathLike)):
            return
        try:
            path = os.path.abspath(os.fsdecode(raw))
        except (TypeError, ValueError):
            self.violations.append(repr(raw))
            return
        # Only the area around the checkpoint is watched (imports, /proc and libraries are not).
        # The checkpoint's own directory may be opened too: a load holds it (storage/local_read.py).
        inside = path.startswith(self.allowed) or path == self.allowed.rstrip(os.sep)
        if self.watched and path.startswith(self.watched) and not inside:
            self.violations.append(path)


WATCH = _OpenWatch()
sys.addaudithook(WATCH.hook)


class _RssWatch:
    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> _RssWatch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


# ------------------------------------------------------------------ fixtures


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g), "step": 5, "tag": "x"}


def _target() -> dict[str, Any]:
    return {"w": torch.zeros(4, 3), "b": torch.zeros(3), "step": 0, "tag": ""}


def frame(body: bytes) -> bytes:
    """A metadata file around ``body`` with a correct checksum."""
    return PREFIX + checksum.digest(body).encode() + MIDDLE + body + b"}"


def unframe(raw: bytes) -> bytes:
    return raw[len(PREFIX) + 16 + len(MIDDLE) : -1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    path = root / "pristine"
    ac.save(_state(), path)
    raw = (path / "metadata.json").read_bytes()
    return {"path": path, "raw": raw, "body": unframe(raw), "doc": json.loads(unframe(raw))}


@pytest.fixture
def area(tmp_path: Path, pristine: dict[str, Any]) -> Iterator[Callable[..., Path]]:
    """``make(body_or_doc)`` -> a checkpoint dir in ``tmp_path/zone`` beside a sentinel file."""
    zone = tmp_path / "zone"
    zone.mkdir()
    sentinel = zone / "sentinel"
    sentinel.write_text("outside the checkpoint")
    made = iter(range(10**6))

    def make(meta: Any = None, *, raw: bytes | None = None) -> Path:
        d = zone / f"ck{next(made)}"
        shutil.copytree(pristine["path"], d)
        if raw is None and meta is not None:
            body = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
            raw = frame(body)
        if raw is not None:
            (d / "metadata.json").write_bytes(raw)
        return d

    make.sentinel = sentinel  # type: ignore[attr-defined]
    make.zone = zone  # type: ignore[attr-defined]
    yield make
    assert sentinel.read_text() == "outside the checkpoint"


def attempt(path: Path, *, target: dict[str, Any] | None = None, **load_kw: Any) -> dict[str, Any]:
    """read_metadata, load and verify under the watchers; only CheckpointError may escape."""
    WATCH.allowed = str(path) + os.sep
    WATCH.watched = str(path.parent)
    WATCH.violations = []
    out: dict[str, Any] = {}
    try:
        with _RssWatch() as rss:
            for name, fn in [
                ("read", lambda: ac.read_metadata(path)),
                ("load", lambda: ac.load(target if target is not None else _target(), path, **load_kw)),
                ("verify", lambda: verify_checkpoint(path)),
            ]:
                try:
                    result = fn()
                except ac.CheckpointError as exc:
                    out[name] = exc
                else:
                    out[name] = result
    finally:
        WATCH.allowed = None
    assert not WATCH.violations, f"opened files outside the checkpoint: {WATCH.violations}"
    assert rss.peak - rss.base < RSS_LIMIT, f"RSS grew by {(rss.peak - rss.base) / MB:.0f} MB"
    out["rss_mb"] = (rss.peak - rss.base) / MB
    _count("hostile checkpoints tried")
    return out


def assert_refused(out: dict[str, Any], *words: str) -> None:
    """Parsing refused it: read and load raise CheckpointError, verify reports it."""
    for step in ("read", "load"):
        exc = out[step]
        assert isinstance(exc, ac.CheckpointError), f"{step} accepted a malformed checkpoint: {exc!r}"
        for w in words:
            assert w in str(exc), f"{step}: {w!r} not in {exc}"
    assert not out["verify"].ok
    _count("refused with a clear error")


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


def _del(doc: Any, path: tuple[Any, ...]) -> Any:
    doc = copy.deepcopy(doc)
    node = doc
    for p in path[:-1]:
        node = node[p]
    del node[path[-1]]
    return doc


# -------------------------------------------------------- wrong JSON types


def _typed_fields(doc: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every schema field under the body (not the free-form tree and values)."""
    if path in (("tree",),) or (len(path) == 2 and path[0] == "values"):
        yield path, doc
        return
    if path:
        yield path, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _typed_fields(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _typed_fields(v, (*path, i))


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    return type(v).__name__


WRONG = [None, True, 0, -1, 2**64, 1.5, "s", "", [], [1], {}, {"k": 1}]
# Fields where another JSON type is legitimate: a chunk's rank is an int or null.
OPTIONAL_NULL = {"rank"}


def test_wrong_json_type_in_every_field(pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    doc = pristine["doc"]
    fields = [(p, v) for p, v in _typed_fields(doc) if p[0] != "tree"]
    assert len(fields) > 40, fields
    refused = 0
    accepted: list[str] = []

    def check(what: str, meta: Any) -> None:
        nonlocal refused
        out = attempt(area(meta))
        if not isinstance(out["read"], ac.CheckpointError):
            accepted.append(what)
            return
        assert_refused(out)
        if not what.startswith("version"):
            assert isinstance(out["read"], ac.CorruptCheckpointError), (what, out["read"])
        refused += 1

    for path, original in fields:
        for bad in WRONG:
            if _json_type(bad) == _json_type(original):
                continue
            if path[-1] in OPTIONAL_NULL and bad in (None, 0):
                continue  # a chunk's rank may be null or a rank of the world
            if path == ("version",) and bad is True:
                continue  # see test_version_must_be_the_integer_1
            check(f"{'.'.join(map(str, path))} = {bad!r}", _set(doc, path, bad))
        # Optional keys, and whole entries (a checkpoint without key 'w' is valid; load then
        # reports the key missing) are not schema violations.
        optional = path[-1] in ("per_rank", "rank", "save_token")
        if not optional and not (len(path) == 2 and path[0] in ("tensors", "values")):
            check(f"{'.'.join(map(str, path))} deleted", _del(doc, path))
    assert not accepted, f"{len(accepted)} malformed field(s) accepted: {accepted}"
    _count("wrong-type / missing-field cases", refused)


def test_wrong_types_in_values_and_tree_are_harmless(
    pristine: dict[str, Any], area: Callable[..., Path]
) -> None:
    """The free-form parts: a wrong value type is loaded as data or refused, never a crash."""
    doc = pristine["doc"]
    for path in [("values", "step"), ("values", "tag"), ("values", "step", "value"), ("tree",)]:
        for bad in [*WRONG, {"$pickle": "gASVBQAAAAAAAACMAXiULg=="}, {"$bytes": "!!"}, {"$float": "x"}]:
            out = attempt(area(_set(doc, path, bad)))
            for step in ("read", "load"):
                assert not isinstance(out[step], BaseException) or isinstance(out[step], ac.CheckpointError)
            _count("free-form value/tree cases")


# ------------------------------------------------------------ sizes, offsets


def _w_chunk(doc: Any) -> dict[str, Any]:
    return doc["tensors"]["w"]["chunks"][0]


@pytest.mark.parametrize(
    "shape",
    [[2**40, 2**40], [2**62], [2**31, 2**31, 2**31], [1] * 65, [2**63], [10**30]],
    ids=["2^40x2^40", "2^62", "2^93", "65-dims", "2^63", "10^30"],
)
def test_enormous_shapes(shape: list[int], pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    doc = copy.deepcopy(pristine["doc"])
    doc["tensors"]["w"]["shape"] = shape
    _w_chunk(doc)["sizes"] = shape
    _w_chunk(doc)["offsets"] = [0] * len(shape)
    out = attempt(area(doc))
    assert_refused(out, "'w'")
    assert out["rss_mb"] < 50


class Holder:
    """A Stateful whose state dict starts empty: load rebuilds its keys from the checkpoint."""

    def __init__(self) -> None:
        self.sd: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.sd)

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.sd = sd


# The metadata must carry one checksum per 4 MiB, so a claim this large already costs the
# forger a 640 KiB metadata file; beyond the machine's memory, an allocation cannot succeed.
@pytest.mark.parametrize("numel", [2**32, 2**37], ids=["16GiB", "512GiB"])
def test_huge_but_plausible_tensor_is_not_allocated(
    numel: int, pristine: dict[str, Any], area: Callable[..., Path]
) -> None:
    """A float32 tensor of ``numel`` elements in a shard that claims to be big enough.

    The target is a Stateful with an empty state dict, so the shape to
    materialise comes from the checkpoint alone: the shard's real size must be
    checked before anything that large is allocated.
    """
    path = area.zone / "nested"  # type: ignore[attr-defined]
    ac.save({"m": _state()}, path)
    doc = json.loads(unframe((path / "metadata.json").read_bytes()))
    nbytes = 4 * numel
    doc["files"][SHARD]["size"] = 192 + nbytes + 12
    doc["tensors"]["m.w"]["shape"] = [numel]
    c = doc["tensors"]["m.w"]["chunks"][0]
    c.update(offsets=[0], sizes=[numel], byte_length=nbytes, checksums=["0" * 16] * -(-nbytes // (4 * MB)))
    doc["tensors"]["m.b"]["chunks"][0]["byte_offset"] = 192 + nbytes
    (path / "metadata.json").write_bytes(frame(json.dumps(doc).encode()))
    holder = Holder()
    out = attempt(path, target={"m": holder}, strict=False)
    assert isinstance(out["load"], ac.CorruptCheckpointError), repr(out["load"])
    assert "size" in str(out["load"]) and SHARD in str(out["load"])
    assert not out["verify"].ok
    assert holder.sd == {}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("offsets", [-1, 0]),
        ("sizes", [-4, 3]),
        ("byte_offset", -1),
        ("byte_length", -48),
        ("offsets", [1, 0]),  # runs past the shape
        ("byte_offset", 0),  # inside the header
        ("byte_offset", 230),  # runs past the end of the file
        ("byte_length", 12),  # disagrees with sizes x dtype
        ("checksums", []),
        ("checksums", ["0" * 16, "0" * 16]),
        ("checksums", ["ZZZZZZZZZZZZZZZZ"]),
        ("file", "nonexistent.safetensors"),
    ],
)
def test_bad_offsets_and_ranges(
    field: str, value: Any, pristine: dict[str, Any], area: Callable[..., Path]
) -> None:
    doc = copy.deepcopy(pristine["doc"])
    _w_chunk(doc)[field] = value
    assert_refused(attempt(area(doc)), "'w'")


def test_bad_file_records(pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    for field, value in [
        ("size", -1),
        ("size", 7),
        ("header_length", 300),
        ("header_length", 4),
        ("rank", 1),
    ]:
        doc = copy.deepcopy(pristine["doc"])
        doc["files"][SHARD][field] = value
        assert_refused(attempt(area(doc)), SHARD)


def test_overlapping_and_missing_chunks(pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    doc = copy.deepcopy(pristine["doc"])
    whole = _w_chunk(doc)
    # Two chunks covering rows 0-2 and 1-3: row 1 and 2 are claimed twice.
    a = dict(whole, sizes=[3, 3], byte_length=36, checksums=["0" * 16])
    b = dict(whole, offsets=[1, 0], sizes=[3, 3], byte_length=36, checksums=["0" * 16])
    doc["tensors"]["w"]["chunks"] = [a, b]
    assert_refused(attempt(area(doc)), "'w'")
    # Rows 3 never saved.
    doc["tensors"]["w"]["chunks"] = [a]
    assert_refused(attempt(area(doc)), "'w'")
    # No chunks at all for a non-empty tensor.
    doc["tensors"]["w"]["chunks"] = []
    assert_refused(attempt(area(doc)), "'w'")


def test_claimed_file_size_larger_than_the_file(pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    """Metadata self-consistent, the real file shorter: found before reading past its end."""
    doc = copy.deepcopy(pristine["doc"])
    doc["files"][SHARD]["size"] = 252 + 10**12
    out = attempt(area(doc))
    assert isinstance(out["load"], ac.CorruptCheckpointError) and SHARD in str(out["load"])
    assert "size" in str(out["load"])
    assert not out["verify"].ok


# ------------------------------------------------------------- file names


@pytest.mark.parametrize(
    "name",
    [
        "../sentinel",
        "../../sentinel",
        "sub/../../sentinel",
        "{sentinel}",  # the sentinel's absolute path
        "/etc/passwd",
        "shard\x00.safetensors",
        "shard.safetensors\x00../../sentinel",
        "..",
        ".",
        "",
        "metadata.json",
        ".hidden",
        "a" * 300,
        "shard\\..\\..\\sentinel",
    ],
)
def test_file_names_cannot_escape(name: str, pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    name = name.replace("{sentinel}", str(area.sentinel))  # type: ignore[attr-defined]
    doc = copy.deepcopy(pristine["doc"])
    doc["files"] = {name: doc["files"][SHARD]}
    for t in doc["tensors"].values():
        for c in t["chunks"]:
            c["file"] = name
    assert_refused(attempt(area(doc)), "file name")


def test_symlinked_shard_pointing_outside(pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    """A shard that is a symlink to a file outside: followed by the OS, but nothing is trusted."""
    d = area()
    (d / SHARD).unlink()
    os.symlink(area.sentinel, d / SHARD)  # type: ignore[attr-defined]
    out = attempt(d)
    assert isinstance(out["load"], ac.CorruptCheckpointError) and SHARD in str(out["load"])
    assert not out["verify"].ok


def _blocked_on_a_fifo() -> bool:
    """Whether a thread of this process sleeps in the kernel's FIFO-open wait."""
    for task in Path("/proc/self/task").iterdir():
        try:
            if (task / "wchan").read_text().strip() == "wait_for_partner":
                return True
        except OSError:
            pass
    return False


def _blocked_opens_released(fn: Callable[[], Any], fifo: Path, deadline: float) -> tuple[bool, Any]:
    """Run ``fn`` on a thread; if it blocks opening the FIFO, say so and release it.

    Returns ``(blocked, result or exception)``. A blocked ``open`` of a FIFO
    returns once a writer opens it, so the test opens it for writing until
    ``fn`` ends.
    """
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["v"] = fn()
        except BaseException as exc:  # noqa: BLE001 - inspected by the caller
            result["v"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    blocked = False
    end = time.monotonic() + deadline
    while t.is_alive() and time.monotonic() < end and not blocked:
        t.join(0.05)
        blocked = _blocked_on_a_fifo()
    blocked = blocked or t.is_alive()
    for _ in range(1000):
        if not t.is_alive():
            break
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        t.join(0.01)
    assert not t.is_alive(), "could not release the blocked call"
    return blocked, result.get("v")


@pytest.mark.parametrize("which", [SHARD, "metadata.json"])
def test_fifo_in_place_of_a_file_does_not_hang(which: str, area: Callable[..., Path]) -> None:
    """A FIFO (a tarball can carry one) where a checkpoint file should be: an error, not a hang."""
    d = area()
    (d / which).unlink()
    os.mkfifo(d / which)
    hung = {}
    for name, fn in [
        ("read_metadata", lambda: ac.read_metadata(d)),
        ("load", lambda: ac.load(_target(), d)),
        ("verify_checkpoint", lambda: verify_checkpoint(d)),
    ]:
        blocked, value = _blocked_opens_released(fn, d / which, 30.0)
        if blocked:
            hung[name] = True
        elif which == SHARD and name == "read_metadata":
            assert not isinstance(value, BaseException), value  # shards are not read
        elif name == "verify_checkpoint":
            assert not value.ok
        else:
            assert isinstance(value, ac.CheckpointError), (name, value)
    assert not hung, f"{sorted(hung)} blocked forever opening a FIFO planted as {which}"


# ------------------------------------------------------ shard header length


@pytest.mark.parametrize(
    ("n", "sizes"),
    [
        (2**63, (100, 2**40, 2**64)),
        (2**64 - 1, (100, 2**64)),
        (2**28 + 1, (100, 2**40)),
        (10**6, (100, 10**6)),
    ],
)
def test_parse_header_refuses_impossible_lengths(n: int, sizes: tuple[int, ...]) -> None:
    """Longer than the file, or than any header we write (256 MiB): refused before any allocation."""
    with _RssWatch() as rss:
        for size in sizes:
            with pytest.raises(ac.CorruptCheckpointError, match="header length"):
                parse_header(struct.pack("<Q", n) + b"{}", size, where="x.safetensors")
    assert rss.peak - rss.base < RSS_LIMIT


def test_header_length_2_63_on_the_load_and_verify_paths(
    pristine: dict[str, Any], area: Callable[..., Path]
) -> None:
    d = area()
    with open(d / SHARD, "r+b") as f:
        f.write(struct.pack("<Q", 2**63))
    out = attempt(d)
    assert isinstance(out["load"], ac.CorruptCheckpointError) and SHARD in str(out["load"])
    assert not out["verify"].ok and any(SHARD in str(p) for p in out["verify"].problems)
    # A forger who also fixes the metadata's header checksum: the length is still never trusted.
    doc = copy.deepcopy(pristine["doc"])
    header = (d / SHARD).read_bytes()[:192]
    doc["files"][SHARD]["header_checksum"] = checksum.digest(header)
    d2 = area(doc)
    shutil.copyfile(d / SHARD, d2 / SHARD)
    out = attempt(d2)
    assert out["rss_mb"] < 50
    with pytest.raises(ac.CorruptCheckpointError, match="header length"):
        parse_header(header, (d2 / SHARD).stat().st_size, where=SHARD)


# ------------------------------------------------- JSON structure and version


def test_duplicated_json_keys(pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    body = pristine["body"]
    cases = [
        body[:-1] + b',"version":1}',
        body[:-1] + b',"world_size":1}',
        body.replace(b'"tensors":{', b'"tensors":{"b":{},', 1),
        body.replace(b'"values":{', b'"values":{"step":{"value":6},', 1),
        body.replace(b'{"value":5}', b'{"value":5,"value":6}', 1),
    ]
    for b in cases:
        assert b != body
        assert_refused(attempt(area(b)), "duplicated key")


@pytest.mark.parametrize("version", [3, 0, -1, 99, "1", None, [1], {"v": 1}])
def test_unknown_format_version(version: Any, pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    doc = dict(pristine["doc"], version=version)
    out = attempt(area(doc))
    assert_refused(out, "version", "reads versions 1 to 2")
    assert repr(version) in str(out["read"])


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(
    version: Any, pristine: dict[str, Any], area: Callable[..., Path]
) -> None:
    """JSON ``true`` and ``1.0`` are not the format version 1 (Python's ``True == 1.0 == 1``)."""
    assert_refused(attempt(area(dict(pristine["doc"], version=version))), "version")


@pytest.mark.parametrize("depth", [10**3, 10**5, 10**6])
def test_deeply_nested_json(depth: int, pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    body = pristine["body"]
    nested = b"[" * depth + b"]" * depth
    for b in [
        body.replace(b'"tree":', b'"tree":' + b'{"l":[' * depth + b"]}" * depth + b',"x":', 1),
        body.replace(b'"tree":', b'"extra":' + nested + b',"tree":', 1),
        b'{"a":' * depth + b"1" + b"}" * depth,
    ]:
        out = attempt(area(b))
        if depth > 10**3:
            assert_refused(out, "JSON")
        else:  # shallow enough to parse: an unknown key or a deep tree is harmless
            for step in ("read", "load"):
                assert not isinstance(out[step], BaseException) or isinstance(out[step], ac.CheckpointError)
    header = json.dumps({"__metadata__": {}}).encode()[:-1] + b',"x":' + nested + b"}"
    with pytest.raises(ac.CorruptCheckpointError):
        parse_header(struct.pack("<Q", len(header)) + header, 8 + len(header), where="x")


@pytest.mark.parametrize(
    "tree",
    [
        5,
        "x",
        [],
        {},
        {"d": 5},
        {"d": [[1, 2, 3]]},
        {"d": [["w", {"x": 7}]]},
        {"x": 7},
        {"l": {"a": 1}},
        {"d": [["w", {"x": "nonexistent"}]], "l": []},
        {"d": [[{"k": 1}, {"x": "w"}]]},
        {"t": [{"d": "q"}]},
    ],
)
def test_tree_node_of_the_wrong_shape(tree: Any, pristine: dict[str, Any], area: Callable[..., Path]) -> None:
    """The tree only guides rebuilding missing containers: a bad one is refused or ignored."""
    doc = dict(pristine["doc"], tree=tree)
    target = _target()
    out = attempt(area(doc), target=target)
    if isinstance(out["load"], BaseException):
        assert isinstance(out["load"], ac.CheckpointError)
    else:
        want = _state()
        assert torch.equal(target["w"], want["w"]) and target["step"] == 5


def test_tree_of_the_wrong_shape_under_a_stateful(
    pristine: dict[str, Any], area: Callable[..., Path]
) -> None:
    """A module whose state dict lacks saved keys: the tree decides what is rebuilt."""

    base = _state()
    path = area.zone / "stateful"  # type: ignore[attr-defined]
    ac.save({"m": base}, path)
    raw = (path / "metadata.json").read_bytes()
    doc = json.loads(unframe(raw))
    for i, tree in enumerate(
        [
            {"d": [["m", {"d": [["w", {"x": 5}], ["ghost", {"x": "m.ghost"}], ["b", {"l": "z"}]]}]]},
            {"d": [["m", {"d": [["w", {"d": [["deeper", {"x": "m.w"}]]}]]}]]},
            {"d": [["m", {"d": [["nope", {"x": "m.nope"}]]}]]},
        ]
    ):
        d = path.parent / f"stateful-{i}"
        shutil.copytree(path, d)
        (d / "metadata.json").write_bytes(frame(json.dumps(dict(doc, tree=tree)).encode()))
        holder = Holder()
        out = attempt(d, target={"m": holder}, strict=False)
        if isinstance(out["load"], BaseException):
            assert isinstance(out["load"], ac.CheckpointError)
            continue
        leaked = {
            k: type(v).__name__ for k, v in holder.sd.items() if not isinstance(v, (torch.Tensor, int, str))
        }
        assert not leaked, f"load_state_dict received placeholders for keys the checkpoint lacks: {leaked}"


# ------------------------------------------------------------------ pickle


def _touch_marker(path: str) -> str:
    Path(path).write_text("the payload ran")
    return "payload result"


class Payload:
    """Pickles to a call of ``_touch_marker``: unpickling it creates the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (_touch_marker, (self.marker,))


def test_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    path = tmp_path / "pickled"
    with pytest.raises(TypeError, match="obj"):
        ac.save({"w": torch.ones(2), "obj": Payload(str(marker))}, path)
    ac.save({"w": torch.ones(2), "obj": Payload(str(marker))}, path, allow_pickle=True)
    assert not marker.exists()
    md = ac.read_metadata(path)
    assert md.pickled
    assert verify_checkpoint(path).ok
    with pytest.raises(ac.CheckpointError, match="allow_pickle"):
        ac.load({"w": torch.zeros(2), "obj": None}, path)
    assert not marker.exists(), "the refused pickle payload ran"

    # A forged checkpoint that hides the payload behind "pickled": false.
    raw = (path / "metadata.json").read_bytes()
    doc = json.loads(unframe(raw))
    doc["pickled"] = False
    lying = tmp_path / "lying"
    shutil.copytree(path, lying)
    (lying / "metadata.json").write_bytes(frame(json.dumps(doc).encode()))
    with pytest.raises(ac.CheckpointError, match="pickle"):
        ac.load({"w": torch.zeros(2), "obj": None}, lying)
    assert not marker.exists(), "the hidden pickle payload ran"
    # ... or in a per-rank value slot.
    doc["values"]["obj"] = {"per_rank": [doc["values"]["obj"]["value"]]}
    (lying / "metadata.json").write_bytes(frame(json.dumps(doc).encode()))
    with pytest.raises(ac.CheckpointError, match="pickle"):
        ac.load({"w": torch.zeros(2), "obj": None}, lying)
    assert not marker.exists(), "the hidden per-rank pickle payload ran"

    # Opting in runs it: the marker proves the test would have seen it.
    target: dict[str, Any] = {"w": torch.zeros(2), "obj": None}
    ac.load(target, path, allow_pickle=True)
    assert marker.read_text() == "the payload ran"
    assert target["obj"] == "payload result"


# ------------------------------------------------------------------ fuzzing


class _BytesStorage:
    """Just enough of a Storage for read_checkpoint_metadata."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def read_metadata(self, location: str) -> bytes:
        return self.raw


def _only_checkpoint_errors(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except ac.CheckpointError:
        return False
    return True


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_decode_metadata_random_bytes(data: bytes) -> None:
    _only_checkpoint_errors(lambda: decode_metadata(data, where="fuzz"))
    _only_checkpoint_errors(lambda: decode_metadata(frame(data), where="fuzz"))
    _count("fuzz: decode_metadata random bytes", 2)


_PRISTINE_BODY: list[bytes] = []


def _body() -> bytes:
    if not _PRISTINE_BODY:
        with tempfile.TemporaryDirectory() as d:
            ac.save(_state(), Path(d) / "c")
            _PRISTINE_BODY.append(unframe((Path(d) / "c" / "metadata.json").read_bytes()))
    return _PRISTINE_BODY[0]


@st.composite
def _byte_mutations(draw: st.DrawFn) -> bytes:
    body = bytearray(_body())
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(body)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "digit"]))
        if op == "replace" and pos < len(body):
            body[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            body[pos:pos] = draw(
                st.sampled_from([b"-", b"9", b"99999999999999999999", b'"', b"[", b"{}", b"null"])
            )
        elif op == "delete":
            del body[pos : pos + draw(st.integers(1, 8))]
        else:
            digits = [i for i, ch in enumerate(body) if 48 <= ch <= 57]
            i = draw(st.sampled_from(digits))
            body[i] = draw(st.integers(48, 57))
    return bytes(body)


@pytest.mark.slow
@FUZZ
@given(_byte_mutations())
def test_fuzz_decode_metadata_mutated_valid_body(body: bytes) -> None:
    raw = frame(body)
    ok = _only_checkpoint_errors(lambda: read_checkpoint_metadata(_BytesStorage(raw), "fuzz"))  # type: ignore[arg-type]
    _count("fuzz: metadata byte mutations")
    if ok:
        _count("fuzz: metadata byte mutations that still parse")


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)


@st.composite
def _structural_mutations(draw: st.DrawFn) -> Any:
    doc = json.loads(_body())
    paths = [p for p, _ in _typed_fields(doc)]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        try:
            doc = _set(doc, path, draw(_json))
        except (KeyError, IndexError, TypeError):
            pass
    return doc


@pytest.fixture(scope="module")
def fuzz_dir(pristine: dict[str, Any]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ac-fuzz-") as d:
        yield Path(d)


@pytest.mark.slow
def test_fuzz_structural_mutations_through_load(pristine: dict[str, Any], fuzz_dir: Path) -> None:
    """Random JSON in random schema fields; whatever parses is also loaded and verified."""
    ck = fuzz_dir / "ck"
    shutil.copytree(pristine["path"], ck)

    @FUZZ
    @given(_structural_mutations())
    def prop(doc: Any) -> None:
        raw = frame(json.dumps(doc).encode())
        _count("fuzz: metadata structural mutations")
        if not _only_checkpoint_errors(lambda: read_checkpoint_metadata(_BytesStorage(raw), "fuzz")):  # type: ignore[arg-type]
            return
        _count("fuzz: structural mutations loaded")
        (ck / "metadata.json").write_bytes(raw)
        _only_checkpoint_errors(lambda: ac.load(_target(), ck, strict=False))
        _only_checkpoint_errors(lambda: verify_checkpoint(ck))

    prop()


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 2**64))
def test_fuzz_parse_header_random_bytes(data: bytes, size: int) -> None:
    _only_checkpoint_errors(lambda: parse_header(data, size, where="fuzz"))
    body = data[8:]
    _only_checkpoint_errors(
        lambda: parse_header(struct.pack("<Q", len(body)) + body, 8 + len(body) + size % 4096, where="fuzz")
    )
    _count("fuzz: parse_header random", 2)


def _header_json() -> Any:
    return {
        "__metadata__": {"format": "async_ckpt"},
        "w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]},
        "b": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]},
    }


@st.composite
def _header_mutations(draw: st.DrawFn) -> tuple[bytes, int]:
    h = _header_json()
    paths = [p for p, _ in _typed_fields(h)]
    for _ in range(draw(st.integers(1, 3))):
        try:
            h = _set(h, draw(st.sampled_from(paths)), draw(_json))
        except (KeyError, IndexError, TypeError):
            pass
    body = json.dumps(h).encode()
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(body)))
        body = body[:pos] + draw(st.binary(max_size=4)) + body[pos + draw(st.integers(0, 4)) :]
    n = len(body) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
    size = 8 + len(body) + draw(st.integers(0, 200))
    return struct.pack("<Q", n) + body, size


@pytest.mark.slow
@FUZZ
@given(_header_mutations())
def test_fuzz_parse_header_mutated_valid_header(case: tuple[bytes, int]) -> None:
    prefix, size = case
    _only_checkpoint_errors(lambda: parse_header(prefix, size, where="fuzz"))
    _count("fuzz: parse_header mutations")
