"""The on-disk format seen from outside: safetensors shards, metadata, key naming,
integrity checks against damaged files, and overwriting a checkpoint.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import async_ckpt as ac
from async_ckpt.storage import LocalStorage
from async_ckpt.testing import assert_bits_equal

MiB = 1 << 20

_DTYPE_NAMES = [
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "complex64",
    "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
]  # fmt: skip
DTYPES = [getattr(torch, n) for n in _DTYPE_NAMES if hasattr(torch, n)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (numel,), generator=g).bool().reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    data = torch.randint(0, 256, (numel * itemsize,), dtype=torch.uint8, generator=g)
    return data.view(dtype).reshape(shape).clone()


def shard_files(ck: Path) -> list[Path]:
    files = sorted(p for p in ck.iterdir() if p.name != "metadata.json")
    assert files, f"no shard files in {ck}"
    return files


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def shard_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(data section start, JSON header) of a safetensors file."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def chunk_location(ck: Path, fqn: str) -> tuple[Path, int, int]:
    """(file, absolute byte offset, byte length) of a whole tensor's entry, found via the
    safetensors headers (the public, documented layout of the shard files)."""
    found = []
    for path in shard_files(ck):
        data_start, header = shard_header(path)
        if fqn in header:
            lo, hi = header[fqn]["data_offsets"]
            found.append((path, data_start + lo, hi - lo))
    assert len(found) == 1, f"{fqn} found in {len(found)} shard files"
    return found[0]


# ---------------------------------------------------------------- safetensors compatibility


def test_every_shard_opens_with_safetensors(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    src: dict[str, Any] = {
        f"t_{str(d).removeprefix('torch.')}": random_tensor(d, (3, 5), i) for i, d in enumerate(DTYPES)
    }
    src["scalar"] = torch.tensor(2.5)
    src["empty"] = torch.empty(0, 3)
    src["nested"] = {"layers": [{"w": torch.randn(4, 4)}]}
    src["value"] = 42
    ac.save(src, ck)
    expected = {k: v for k, v in src.items() if isinstance(v, torch.Tensor)}
    expected["nested.layers.0.w"] = src["nested"]["layers"][0]["w"]

    seen: dict[str, torch.Tensor] = {}
    for path in shard_files(ck):
        assert path.suffix == ".safetensors"
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                seen[name] = f.get_tensor(name)
        loaded = load_file(str(path))
        assert set(loaded) <= set(seen)
        for name, t in loaded.items():
            assert_bits_equal(t, seen[name], name)
    assert set(seen) == set(expected)
    for name, t in expected.items():
        assert_bits_equal(seen[name], t, name)


def test_large_shard_opens_with_safetensors(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    big = random_tensor(torch.float32, (10 * MiB // 4,), seed=3)
    ac.save({"big": big, "small": torch.arange(3)}, ck)
    merged: dict[str, torch.Tensor] = {}
    for path in shard_files(ck):
        merged.update(load_file(str(path)))
    assert_bits_equal(merged["big"], big)
    assert torch.equal(merged["small"], torch.arange(3))


# ---------------------------------------------------------------- metadata


def test_read_metadata_describes_tensors(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    sd = {
        "model": {"layers": [{"w": torch.randn(3, 4)}, {"w": torch.randn(2, dtype=torch.float16)}]},
        "opt": ({"m": torch.zeros(5, dtype=torch.int64)},),
        "scalar": torch.tensor(True),
        "empty": torch.empty(0, 7),
        "epoch": 4,
    }
    md = ac.save(sd, ck)
    read = ac.read_metadata(ck)
    assert isinstance(read, ac.Metadata)
    assert set(read.tensors) == {"model.layers.0.w", "model.layers.1.w", "opt.0.m", "scalar", "empty"}
    expected = {
        "model.layers.0.w": (torch.float32, (3, 4)),
        "model.layers.1.w": (torch.float16, (2,)),
        "opt.0.m": (torch.int64, (5,)),
        "scalar": (torch.bool, ()),
        "empty": (torch.float32, (0, 7)),
    }
    for fqn, (dtype, shape) in expected.items():
        for m in (md, read):
            rec = m.tensors[fqn]
            assert isinstance(rec.dtype, torch.dtype) and rec.dtype == dtype, fqn
            assert isinstance(rec.shape, tuple) and rec.shape == shape, fqn
            assert len(rec.chunks) >= 1
            covered = 0
            for c in rec.chunks:
                assert isinstance(c.offsets, tuple) and isinstance(c.sizes, tuple)
                assert len(c.offsets) == len(shape) == len(c.sizes)
                covered += math.prod(c.sizes)
            assert covered == math.prod(shape)
            # Single process: every tensor is one whole chunk.
            assert rec.chunks[0].offsets == (0,) * len(shape)
            assert rec.chunks[0].sizes == shape
    assert "epoch" not in read.tensors
    assert read == md  # what save returned is what was committed


def test_metadata_json_is_valid_json_with_a_version(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"a": torch.ones(2), "v": "x"}, ck)
    doc = json.loads((ck / "metadata.json").read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    version = doc.get("version", doc.get("body", {}).get("version"))
    assert isinstance(version, int) and version >= 1


def test_flattened_key_naming(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    t = torch.randn(2)
    sd = {
        "model": {"layers": [{"w": t}]},
        "state": {0: {"exp_avg": torch.zeros(1)}},
        "tup": (torch.ones(1), [torch.ones(1)]),
        "vals": {"lr": [0.1]},
    }
    md = ac.save(sd, ck)
    assert set(md.tensors) == {"model.layers.0.w", "state.0.exp_avg", "tup.0", "tup.1.0"}
    # The safetensors entry of a whole tensor is its flattened key.
    names: set[str] = set()
    for path in shard_files(ck):
        with safe_open(str(path), "pt") as f:
            names.update(f.keys())
    assert names == set(md.tensors)


def test_module_keys_flatten_under_their_entry(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    md = ac.save({"model": model}, tmp_path / "c")
    assert {f"model.{k}" for k in model.state_dict()} == set(md.tensors)


@pytest.mark.parametrize(
    "sd",
    [
        {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}},
        {"a": {"b": torch.zeros(1)}, "a.b": 3},
        {"x": [torch.ones(1)], "x.0": torch.zeros(1)},
        {1: torch.ones(1), "1": torch.zeros(1)},
    ],
    ids=["dotted-vs-nested", "nested-vs-value", "list-index", "int-vs-str-key"],
)
def test_colliding_keys_raise_clear_error(tmp_path: Path, sd: dict[Any, Any]) -> None:
    ck = tmp_path / "c"
    with pytest.raises((ValueError, TypeError, ac.CheckpointError)) as info:
        ac.save(sd, ck)
    msg = str(info.value)
    assert "same key" in msg or "collide" in msg or "duplicate" in msg.lower()
    assert any(f"'{k}'" in msg for k in ("a.b", "x.0", "1"))
    assert not ck.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- integrity


def _saved(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    ck = tmp_path / "c"
    torch.manual_seed(0)
    src = {
        "first": torch.randn(100),
        "victim": torch.randn(64, 64),
        "big": random_tensor(torch.float32, (10 * MiB // 4,), seed=5),
        "last": torch.arange(10),
    }
    ac.save(src, ck)
    return ck, src


def _targets(src: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in src.items()}


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_flipped_data_byte_is_detected(tmp_path: Path, where: str) -> None:
    ck, src = _saved(tmp_path)
    path, start, length = chunk_location(ck, "victim")
    pos = {"start": start, "middle": start + length // 2, "end": start + length - 1}[where]
    flip_byte(path, pos)
    with pytest.raises(ac.CorruptCheckpointError) as info:
        ac.load(_targets(src), ck)
    msg = str(info.value)
    assert path.name in msg
    assert "victim" in msg


@pytest.mark.parametrize("block", [0, 1, 2])
def test_flipped_byte_in_each_checksum_block_is_detected(tmp_path: Path, block: int) -> None:
    ck, src = _saved(tmp_path)
    path, start, length = chunk_location(ck, "big")
    pos = min(start + block * 4 * MiB + 1234, start + length - 1)
    flip_byte(path, pos)
    with pytest.raises(ac.CorruptCheckpointError, match="big"):
        ac.load(_targets(src), ck)
    # Also when the target is laid out differently (the copy goes through a scratch buffer).
    target = {"big": torch.zeros(2 * src["big"].numel())[::2]}
    with pytest.raises(ac.CorruptCheckpointError, match="big"):
        ac.load(target, ck, strict=False)


def test_flipped_byte_detected_with_noncontiguous_target(tmp_path: Path) -> None:
    ck, _ = _saved(tmp_path)
    path, start, length = chunk_location(ck, "victim")
    flip_byte(path, start + length - 5)
    target = {"victim": torch.zeros(64, 64).t()}
    with pytest.raises(ac.CorruptCheckpointError, match="victim"):
        ac.load(target, ck, strict=False)


@pytest.mark.parametrize("threads", [1, 4])
def test_read_threads_load_exactly_and_detect_damage(tmp_path: Path, threads: int) -> None:
    # One thread reads inline in file order; several go through the pool. Both
    # must place every byte and report damage with the file and key.
    ck, src = _saved(tmp_path)
    storage = LocalStorage(read_threads=threads)
    target = _targets(src)
    ac.load(target, ck, storage=storage)
    for k in src:
        assert_bits_equal(target[k], src[k], k)
    path, start, length = chunk_location(ck, "big")
    flip_byte(path, start + length // 2)
    with pytest.raises(ac.CorruptCheckpointError) as info:
        ac.load(_targets(src), ck, storage=storage)
    assert path.name in str(info.value) and "big" in str(info.value)


def test_read_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="read_threads"):
        LocalStorage(read_threads=0)
    with pytest.raises(ValueError, match="files_per_rank"):
        LocalStorage(files_per_rank=0)
    assert 1 <= LocalStorage().read_threads <= 4 and LocalStorage().files_per_rank == 4


@pytest.mark.parametrize("files", [1, 3, 4])
def test_files_per_rank_bounds_the_shard_files(
    tmp_path: Path, files: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files are at least 64 MiB each in real saves; 1 MiB here keeps the test small.
    monkeypatch.setattr("async_ckpt.save_flow._MIN_FILE_BYTES", 1 * MiB)
    src = {f"t{i}": torch.full((MiB // 4,), float(i)) for i in range(6)}  # 6 MiB
    ck = tmp_path / "c"
    ac.save(src, ck, storage=LocalStorage(files_per_rank=files))
    assert len(shard_files(ck)) == files
    for path in shard_files(ck):
        load_file(path)  # each one a valid safetensors file
    target = {k: torch.zeros_like(v) for k, v in src.items()}
    ac.load(target, ck)
    for k in src:
        assert_bits_equal(target[k], src[k], k)


def test_verify_false_skips_checksums(tmp_path: Path) -> None:
    ck, src = _saved(tmp_path)
    path, start, _ = chunk_location(ck, "victim")
    flip_byte(path, start + 8)  # a byte of element 2
    target = _targets(src)
    ac.load(target, ck, verify=False)
    expected = src["victim"].clone()
    raw = expected.view(-1).view(torch.uint8)
    raw[8] ^= 0x01
    assert_bits_equal(target["victim"], expected)
    for k in ("first", "big", "last"):
        assert_bits_equal(target[k], src[k], k)
    # With verification on, the same checkpoint is refused.
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load(_targets(src), ck)


def test_flipped_shard_header_byte_is_detected(tmp_path: Path) -> None:
    ck, src = _saved(tmp_path)
    path = shard_files(ck)[0]
    n = int.from_bytes(path.read_bytes()[:8], "little")
    data = bytearray(path.read_bytes())
    # Change a digit inside the JSON header (keeps it valid JSON and same length).
    header = data[8 : 8 + n]
    i = header.index(b'"shape":[') + len(b'"shape":[')
    header[i] = ord("9") if header[i] != ord("9") else ord("8")
    data[8 : 8 + n] = header
    path.write_bytes(bytes(data))
    with pytest.raises(ac.CorruptCheckpointError, match=re.escape(path.name)):
        ac.load(_targets(src), ck)


@pytest.mark.parametrize("where", ["first", "checksum", "middle", "version", "last"])
def test_flipped_metadata_byte_is_detected(tmp_path: Path, where: str) -> None:
    ck, src = _saved(tmp_path)
    meta = ck / "metadata.json"
    raw = meta.read_bytes()
    pos = {
        "first": 0,
        "checksum": raw.index(b"xxh3_64:") + len(b"xxh3_64:") + 3 if b"xxh3_64:" in raw else 30,
        "middle": len(raw) // 2,
        "version": raw.index(b'"version"') + len(b'"version":'),
        "last": len(raw) - 1,
    }[where]
    flip_byte(meta, pos)
    with pytest.raises(ac.CorruptCheckpointError, match=r"metadata\.json"):
        ac.read_metadata(ck)
    target = _targets(src)
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load(target, ck)
    assert all(torch.count_nonzero(t) == 0 for t in target.values())


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1])
def test_truncated_metadata_is_detected(tmp_path: Path, keep: float) -> None:
    ck, _ = _saved(tmp_path)
    meta = ck / "metadata.json"
    raw = meta.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(raw) + keep)
    meta.write_bytes(raw[:n])
    with pytest.raises(ac.CorruptCheckpointError):
        ac.read_metadata(ck)


@pytest.mark.parametrize("cut", ["last_byte", "half", "header_only", "empty"])
def test_truncated_shard_is_detected(tmp_path: Path, cut: str) -> None:
    ck, src = _saved(tmp_path)
    path = shard_files(ck)[0]
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    keep = {"last_byte": len(raw) - 1, "half": len(raw) // 2, "header_only": 8 + n, "empty": 0}[cut]
    path.write_bytes(raw[:keep])
    with pytest.raises(ac.CorruptCheckpointError, match=re.escape(path.name)):
        ac.load(_targets(src), ck)
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load(_targets(src), ck, verify=False)


def test_missing_shard_is_detected(tmp_path: Path) -> None:
    ck, src = _saved(tmp_path)
    path = shard_files(ck)[0]
    path.unlink()
    with pytest.raises(ac.CorruptCheckpointError, match=re.escape(path.name)):
        ac.load(_targets(src), ck)


def test_extended_shard_is_detected(tmp_path: Path) -> None:
    ck, src = _saved(tmp_path)
    path = shard_files(ck)[0]
    with path.open("ab") as f:
        f.write(b"\x00" * 16)
    with pytest.raises(ac.CorruptCheckpointError, match=re.escape(path.name)):
        ac.load(_targets(src), ck)


def test_damage_outside_requested_keys_is_not_an_error(tmp_path: Path) -> None:
    """Only what is read is verified: a damaged key the target does not ask for is skipped."""
    ck, src = _saved(tmp_path)
    path, start, _ = chunk_location(ck, "victim")
    flip_byte(path, start)
    target = {"first": torch.zeros(100)}
    ac.load(target, ck)
    assert_bits_equal(target["first"], src["first"])


# ---------------------------------------------------------------- overwrite


def test_overwrite_leaves_second_checkpoint_and_no_leftovers(tmp_path: Path) -> None:
    parent = tmp_path / "runs"
    ck = parent / "step"
    ac.save({"a": torch.ones(4), "old_only": torch.ones(2), "v": 1}, ck)
    second = {"a": torch.full((4,), 2.0), "new_only": torch.arange(3), "v": 2}
    ac.save(second, ck)

    assert sorted(p.name for p in parent.iterdir()) == ["step"]
    assert not any(p.name.startswith(".") for p in parent.iterdir())
    md = ac.read_metadata(ck)
    assert set(md.tensors) == {"a", "new_only"}
    target: dict[str, Any] = {"a": torch.zeros(4), "new_only": torch.zeros(3, dtype=torch.int64), "v": 0}
    ac.load(target, ck)
    assert torch.equal(target["a"], second["a"])
    assert torch.equal(target["new_only"], second["new_only"])
    assert target["v"] == 2
    with pytest.raises(ac.CheckpointError, match="old_only"):
        ac.load({"old_only": torch.zeros(2)}, ck)
    # Every file in the directory belongs to the new checkpoint.
    listed = set(md.files) if hasattr(md, "files") else set()
    on_disk = {p.name for p in ck.iterdir()} - {"metadata.json"}
    if listed:
        assert on_disk == listed


def test_overwrite_many_times(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    for i in range(4):
        ac.save({"i": torch.tensor(i), "n": i}, ck)
    target: dict[str, Any] = {"i": torch.tensor(-1), "n": -1}
    ac.load(target, ck)
    assert target["i"].item() == 3 and target["n"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_failed_save_leaves_existing_checkpoint_intact(tmp_path: Path) -> None:
    ck = tmp_path / "c"
    ac.save({"a": torch.ones(2)}, ck)
    with pytest.raises(TypeError):
        ac.save({"a": object()}, ck)
    out = {"a": torch.zeros(2)}
    ac.load(out, ck)
    assert torch.equal(out["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_save_creates_missing_parent_directories(tmp_path: Path) -> None:
    ck = tmp_path / "a" / "b" / "c"
    ac.save({"t": torch.ones(1)}, ck)
    assert (ck / "metadata.json").is_file()
