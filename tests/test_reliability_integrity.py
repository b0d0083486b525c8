"""Integrity: any flipped bit or truncation of a checkpoint file is detected on load.

A checkpoint is ``metadata.json`` (framed with an xxh3-64 of its body) plus
safetensors shards whose header is checksummed in the metadata and whose
data is checksummed per 4 MiB block of each chunk; the metadata also records
each file's exact size. So every byte of every file is covered, and ``load``
(which verifies by default) must raise ``CorruptCheckpointError`` naming the
file, and the key when the damage is in a tensor's bytes. ``verify=False`` is
the explicit way to skip the data checksums.

The hypothesis properties damage a fresh copy of the checkpoint per example
(the damaged file is copied, the others hard-linked, so the pristine copy is
never touched).
"""

from __future__ import annotations

import inspect
import itertools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from _counts import count, get
from _crash_trainer import assert_tree_equal, blank_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import async_ckpt as ac
from async_ckpt.format.metadata import decode_metadata
from async_ckpt.verify import verify_checkpoint

BLOCK = 4 << 20
BIG_NUMEL = 2_200_000  # float32: three checksum blocks, the last one partial


def _count(name: str, n: int = 1) -> None:
    # Printed in the terminal summary (tests/conftest.py).
    count("integrity", name, n)


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(11)
    return {
        "big": torch.randn(BIG_NUMEL, generator=g),
        "model": {
            "w": torch.randn(16, 8, generator=g),
            "b": torch.randn(8, generator=g).to(torch.bfloat16),
            "ids": torch.randint(0, 2**60, (9,), generator=g),
            "mask": torch.rand(13, generator=g) > 0.5,
        },
        "step": 1234,
        "name": "run-7",
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The pristine checkpoint, and where each tensor's bytes are in which file."""
    root = tmp_path_factory.mktemp("integrity")
    path = root / "ckpt"
    md = ac.save(_state(), path)
    regions: dict[str, list[tuple[int, int, str | None]]] = {"metadata.json": [(0, 0, None)]}
    for name, rec in md.files.items():
        regions[name] = [(0, rec.header_length, None)]  # the header: no key
    for fqn, t in md.tensors.items():
        for c in t.chunks:
            if c.byte_length:
                regions[c.file].append((c.byte_offset, c.byte_length, fqn))
    sizes = {f.name: f.stat().st_size for f in path.iterdir()}
    regions["metadata.json"] = [(0, sizes["metadata.json"], None)]
    assert set(regions) == set(sizes), (regions, sizes)
    return {"path": path, "md": md, "regions": regions, "sizes": sizes, "files": sorted(sizes)}


def _copy_with(src: Path, dst: Path, damaged: str) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.name == damaged:
            shutil.copyfile(f, dst / f.name)
        else:
            os.link(f, dst / f.name)
    return dst / damaged


def _flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _expect_corrupt(path: Path, file: str, key: str | None) -> str:
    with pytest.raises(ac.CorruptCheckpointError) as info:
        ac.load(blank_like(_state()), path)
    msg = str(info.value)
    assert file in msg, f"error does not name the damaged file {file}: {msg}"
    if key is not None:
        assert f"'{key}'" in msg, f"error does not name the damaged entry {key}: {msg}"
    return msg


def _region_of(regions: list[tuple[int, int, str | None]], offset: int) -> tuple[int, int, str | None]:
    hits = [r for r in regions if r[0] <= offset < r[0] + r[1]]
    assert len(hits) == 1, (offset, hits)
    return hits[0]


# ------------------------------------------------------------ the baseline


def test_pristine_checkpoint_loads_and_verifies(saved: dict[str, Any]) -> None:
    target = blank_like(_state())
    ac.load(target, saved["path"])
    assert_tree_equal(target, _state())
    report = verify_checkpoint(saved["path"])
    assert report.ok and report.bytes_checked >= BIG_NUMEL * 4, report
    # Every byte of every shard is either header or some chunk's data.
    for name, size in saved["sizes"].items():
        if name == "metadata.json":
            continue
        spans = sorted((o, o + n) for o, n, _ in saved["regions"][name])
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), spans
    assert len(saved["md"].tensors["big"].chunks[0].checksums) == 3  # three 4 MiB blocks


def test_checksums_are_on_by_default() -> None:
    assert inspect.signature(ac.load).parameters["verify"].default is True


# ------------------------------------------------------ property: bit flips


@st.composite
def _bit_positions(draw: st.DrawFn, files: list[str], regions: dict[str, Any]) -> tuple[str, int, int]:
    """A file, then one of its regions (so small headers are hit as often as big tensors), then a bit."""
    name = draw(st.sampled_from(files))
    start, length, _ = draw(st.sampled_from(regions[name]))
    offset = start + draw(st.integers(0, length - 1))
    return name, offset, draw(st.integers(0, 7))


@pytest.fixture(scope="module")
def scratch() -> Any:
    with tempfile.TemporaryDirectory(prefix="ac-integrity-") as d:
        yield Path(d)


_examples = iter(range(10**9))


@pytest.mark.slow
def test_any_single_bit_flip_is_detected(saved: dict[str, Any], scratch: Path) -> None:
    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_bit_positions(saved["files"], saved["regions"]))
    def prop(pos: tuple[str, int, int]) -> None:
        name, offset, bit = pos
        copy = scratch / f"flip-{next(_examples)}"
        _flip(_copy_with(saved["path"], copy, name), offset, bit)
        try:
            _, _, key = _region_of(saved["regions"][name], offset)
            msg = _expect_corrupt(copy, name, key)
            if key is not None:
                # The message gives the damaged block's file byte range; it holds the flip.
                lo, hi = (int(x) for x in msg.split("file bytes [")[1].split(")")[0].split(", "))
                assert lo <= offset < hi and hi - lo <= BLOCK, (offset, msg)
            report = verify_checkpoint(copy)
            assert not report.ok
            assert any(name in str(p) for p in report.problems), report.problems
            if key is not None:
                assert any(p.key == key for p in report.problems), report.problems
            _count("bit flips detected (random, load + verify)")
        finally:
            shutil.rmtree(copy)

    before = get("integrity", "bit flips detected (random, load + verify)")
    prop()
    assert get("integrity", "bit flips detected (random, load + verify)") - before >= 200


def test_every_bit_of_metadata_is_covered(saved: dict[str, Any]) -> None:
    raw = (saved["path"] / "metadata.json").read_bytes()
    decode_metadata(raw, where="m")  # pristine parses
    n = 0
    for i in range(len(raw)):
        for bit in range(8):
            bad = bytearray(raw)
            bad[i] ^= 1 << bit
            try:
                decode_metadata(bytes(bad), where="ckpt/metadata.json")
            except ac.CorruptCheckpointError as exc:
                assert "metadata.json" in str(exc)
            else:
                raise AssertionError(f"flipping bit {bit} of byte {i} went unnoticed")
            n += 1
    _count("bit flips detected (every bit of metadata.json)", n)


@pytest.mark.slow
def test_every_byte_of_shard_headers_is_covered(saved: dict[str, Any], scratch: Path) -> None:
    """A flipped bit in every other byte of each shard header (the bit rotates with the offset)."""
    n = 0
    for name, rec in saved["md"].files.items():
        copy = scratch / f"headers-{name}"
        damaged = _copy_with(saved["path"], copy, name)
        for offset in range(0, rec.header_length, 2):
            _flip(damaged, offset, offset % 8)
            _expect_corrupt(copy, name, None)
            _flip(damaged, offset, offset % 8)  # restore
            n += 1
        ac.load(blank_like(_state()), copy)  # restored copy is fine again
        shutil.rmtree(copy)
    _count("bit flips detected (every shard header byte)", n)


def test_block_edges_are_covered_and_named(saved: dict[str, Any], scratch: Path) -> None:
    """First and last byte of every 4 MiB block of the multi-block tensor."""
    chunk = saved["md"].tensors["big"].chunks[0]
    edges = []
    for lo in range(0, chunk.byte_length, BLOCK):
        hi = min(lo + BLOCK, chunk.byte_length)
        edges += [lo, hi - 1]
    copy = scratch / "edges"
    damaged = _copy_with(saved["path"], copy, chunk.file)
    for rel in edges:
        off = chunk.byte_offset + rel
        _flip(damaged, off, 7)
        msg = _expect_corrupt(copy, chunk.file, "big")
        block_lo = chunk.byte_offset + rel // BLOCK * BLOCK
        assert f"file bytes [{block_lo}, " in msg, msg
        _flip(damaged, off, 7)
    shutil.rmtree(copy)
    _count("bit flips detected (block edges)", len(edges))


def test_verify_false_is_the_explicit_opt_out(saved: dict[str, Any], scratch: Path) -> None:
    chunk = saved["md"].tensors["big"].chunks[0]
    copy = scratch / "optout"
    damaged = _copy_with(saved["path"], copy, chunk.file)
    _flip(damaged, chunk.byte_offset + 5 * BLOCK // 4, 3)
    _expect_corrupt(copy, chunk.file, "big")  # the default verifies
    target = blank_like(_state())
    ac.load(target, copy, verify=False)  # the caller asked not to
    diff = target["big"].view(torch.int32) ^ _state()["big"].view(torch.int32)
    assert int((diff != 0).sum()) == 1 and int(diff[diff != 0][0]) == 1 << 3
    shutil.rmtree(copy)


# ------------------------------------------------------ property: truncation


@pytest.mark.slow
def test_any_truncation_is_detected(saved: dict[str, Any], scratch: Path) -> None:
    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(saved["files"]), st.data())
    def prop(name: str, data: st.DataObject) -> None:
        size = saved["sizes"][name]
        length = data.draw(st.one_of(st.integers(0, size - 1), st.sampled_from([0, 1, 7, 8, size - 1])))
        copy = scratch / f"trunc-{next(_examples)}"
        damaged = _copy_with(saved["path"], copy, name)
        os.truncate(damaged, length)
        try:
            _expect_corrupt(copy, name, None)
            assert not verify_checkpoint(copy).ok
            _count("truncations detected")
        finally:
            shutil.rmtree(copy)

    prop()


def test_missing_shard_file_is_reported(saved: dict[str, Any], scratch: Path) -> None:
    name = next(n for n in saved["files"] if n != "metadata.json")
    copy = scratch / "missing"
    _copy_with(saved["path"], copy, name)
    (copy / name).unlink()
    _expect_corrupt(copy, name, None)
