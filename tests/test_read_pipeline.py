"""The load's read pipeline: large reads in pieces, each verified while the next is read.

One thread reads in file order and another verifies what it read (``read_ops``):
damage in any piece, including one read ahead of the verifier, must still fail the
load naming the key, the file and the damaged block's byte range; a damaged block
under a resharding (scratch) read must put nothing into the target; and a failed
load leaves no verifying thread behind.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import async_ckpt as ac
from async_ckpt import read_units
from async_ckpt.format.metadata import Metadata
from async_ckpt.load_flow import read_region
from async_ckpt.storage.local import LocalStorage

BLOCK = 4 << 20
# float32 element counts: more than one piece each, the last block of each partial.
BIG_A = 5_000_000  # 19.1 MiB: a 16 MiB piece and a 3.1 MiB one
BIG_B = 9_000_000  # 34.3 MiB: three pieces


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {
        "a": torch.randn(BIG_A, generator=g),
        "small": [torch.randn(7, generator=g) for _ in range(40)],
        "b": torch.randn(BIG_B, generator=g).reshape(3000, 3000),
        "tail": torch.arange(11),
    }


def _blank() -> dict[str, Any]:
    return {
        "a": torch.zeros(BIG_A),
        "small": [torch.zeros(7) for _ in range(40)],
        "b": torch.zeros(3000, 3000),
        "tail": torch.zeros(11, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Metadata]:
    path = tmp_path_factory.mktemp("pipeline") / "ckpt"
    md = ac.save(_state(), path)
    assert md.block_size == BLOCK
    assert read_units._PIECE_BYTES == 4 * BLOCK  # the offsets below assume it
    return path, md


def _damaged_copy(src: Path, dst: Path, file: str, offset: int) -> Path:
    shutil.copytree(src, dst)
    with open(dst / file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))
    return dst


def _assert_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert torch.equal(got["a"], want["a"])
    assert torch.equal(got["b"], want["b"])
    assert torch.equal(got["tail"], want["tail"])
    assert all(torch.equal(x, y) for x, y in zip(got["small"], want["small"], strict=True))


@pytest.mark.parametrize("verify", [True, False])
def test_tensors_read_in_pieces_load_exactly(saved: tuple[Path, Metadata], verify: bool) -> None:
    path, _ = saved
    target = _blank()
    ac.load(target, path, verify=verify)
    _assert_equal(target, _state())


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("a", 0),  # the first piece: damage found while the second is read
        ("a", 3 * BLOCK + 5),  # the first piece's last block
        ("a", 4 * BLOCK + 1),  # the second, partial piece
        ("b", 0),
        ("b", 8 * BLOCK + 100),  # the third piece
        ("b", -1),  # the last byte of the last piece (the pipeline's final drain)
        ("tail", -1),  # a small tensor batched after the large ones
    ],
)
def test_damage_in_any_piece_fails_the_load_naming_key_file_and_block(
    saved: tuple[Path, Metadata], tmp_path: Path, key: str, where: int
) -> None:
    path, md = saved
    (chunk,) = md.tensors[key].chunks
    rel = where % chunk.byte_length
    bad = _damaged_copy(path, tmp_path / "bad", chunk.file, chunk.byte_offset + rel)
    with pytest.raises(ac.CorruptCheckpointError) as info:
        ac.load(_blank(), bad)
    msg = str(info.value)
    lo = chunk.byte_offset + rel // BLOCK * BLOCK
    hi = min(lo + BLOCK, chunk.byte_offset + chunk.byte_length)
    assert f"key '{key}'" in msg and chunk.file in msg, msg
    assert f"file bytes [{lo}, {hi})" in msg, msg


def test_a_failed_verification_leaves_no_thread_behind(saved: tuple[Path, Metadata], tmp_path: Path) -> None:
    path, md = saved
    (chunk,) = md.tensors["a"].chunks
    bad = _damaged_copy(path, tmp_path / "bad", chunk.file, chunk.byte_offset + 10)
    with pytest.raises(ac.CorruptCheckpointError):
        ac.load(_blank(), bad)
    left = [t.name for t in threading.enumerate() if t.name.startswith("async_ckpt-verify")]
    assert not left, left


def test_a_failed_verification_stops_the_reads(saved: tuple[Path, Metadata], tmp_path: Path) -> None:
    """Damage in the first piece: the load gives up a bounded number of reads later, not at the end.

    The one-reader pipeline, named: by default a machine of 8 CPUs or more reads
    with several threads (``default_streams``), which start every batch at once.
    """
    path, md = saved
    # The writer may put either large tensor first (its O_DIRECT layout): damage that one.
    first, second = sorted(["a", "b"], key=lambda k: md.tensors[k].chunks[0].byte_offset)
    (chunk,) = md.tensors[first].chunks
    bad = _damaged_copy(path, tmp_path / "bad", chunk.file, chunk.byte_offset + 10)
    target = _blank()
    with pytest.raises(ac.CorruptCheckpointError, match=f"key '{first}'"):
        ac.load(target, bad, storage=LocalStorage(read_threads=1))
    # The second is read in two or three pieces after the first's: at most _AHEAD units
    # past the damage were read.
    read_of_second = int(torch.count_nonzero(target[second]))
    assert read_of_second < target[second].numel(), f"the whole of '{second}' was read after '{first}' failed"


def test_a_damaged_block_under_a_resharding_read_puts_nothing_in_place(
    saved: tuple[Path, Metadata], tmp_path: Path
) -> None:
    """A region read goes through scratch memory: it is copied out only once its blocks pass."""
    path, md = saved
    (chunk,) = md.tensors["b"].chunks
    row_bytes = 3000 * 4
    rows = (1000, 1200)  # inside the second block of "b"
    bad = _damaged_copy(path, tmp_path / "bad", chunk.file, chunk.byte_offset + 1100 * row_bytes + 8)
    out = torch.full((rows[1] - rows[0], 1000), -1.0)
    storage = LocalStorage()
    with pytest.raises(ac.CorruptCheckpointError) as info:
        read_region(storage, str(bad), md, "b", (rows[0], 500), out)
    assert "key 'b'" in str(info.value)
    assert bool((out == -1.0).all()), "a region from a damaged block reached the output"
    read_region(storage, str(path), md, "b", (rows[0], 500), out)
    assert torch.equal(out, _state()["b"][rows[0] : rows[1], 500:1500])


@pytest.mark.parametrize("threads", [1, 3])
def test_read_threads_agree_on_pieced_reads(saved: tuple[Path, Metadata], threads: int) -> None:
    path, _ = saved
    target = _blank()
    ac.load(target, path, storage=LocalStorage(read_threads=threads))
    _assert_equal(target, _state())


def test_the_damage_message_gives_one_block_range(saved: tuple[Path, Metadata], tmp_path: Path) -> None:
    """The reported range is one block long (or the chunk's partial last block), never a piece."""
    path, md = saved
    (chunk,) = md.tensors["b"].chunks
    bad = _damaged_copy(path, tmp_path / "bad", chunk.file, chunk.byte_offset + 5 * BLOCK + 3)
    with pytest.raises(ac.CorruptCheckpointError) as info:
        ac.load(_blank(), bad)
    lo, hi = map(int, re.search(r"file bytes \[(\d+), (\d+)\)", str(info.value)).groups())  # type: ignore[union-attr]
    assert hi - lo == BLOCK and (lo - chunk.byte_offset) % BLOCK == 0
    assert os.path.getsize(bad / chunk.file) >= hi


def test_chunks_that_are_contiguous_runs_of_the_target_are_read_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row blocks of a target (split chunks, Shard(0) shards) go straight into it: no scratch copy."""
    from async_ckpt import read_units

    scratch: list[str] = []
    real = read_units._scratch_unit

    def counting(r: Any, block: int, verify: bool) -> Any:
        scratch.append(r.fqn)
        return real(r, block, verify)

    monkeypatch.setattr(read_units, "_scratch_unit", counting)
    g = torch.Generator().manual_seed(3)
    sd = {
        "rows": torch.randn(512, 1024, generator=g),  # 2 MiB: row blocks of 512 KiB
        "wide": torch.randn(2, 3, 300_000, generator=g),  # rows of 1.2 MB: split along the last dim
        "small": torch.arange(10.0),
    }
    with ac.AsyncCheckpointer(staging_budget=1 << 20) as ck:
        md = ck.save(sd, tmp_path / "c").result(120)
    assert len(md.tensors["rows"].chunks) > 1 and len(md.tensors["wide"].chunks) > 1
    got = {k: torch.zeros_like(v) for k, v in sd.items()}
    ac.load(got, tmp_path / "c")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert scratch == []
    # A region that is not one run of the target's memory still goes through scratch.
    part = {"rows": torch.zeros(512, 1024)[:, :512]}
    with pytest.raises(ac.CheckpointError, match="shape mismatch"):
        ac.load(part, tmp_path / "c", strict=False)
    cols = torch.zeros(1024, 512).t()  # the right shape, not contiguous
    ac.load({"rows": cols}, tmp_path / "c", strict=False)
    assert torch.equal(cols, sd["rows"]) and scratch
