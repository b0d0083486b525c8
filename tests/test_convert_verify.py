"""``convert``, ``verify`` and ``inspect`` on real checkpoints: output paths, work done, odd values."""

from __future__ import annotations

import argparse
import datetime
import decimal
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import async_ckpt as ac
from async_ckpt import verify
from async_ckpt.cli import main
from async_ckpt.format.metadata import Metadata

MiB = 1 << 20


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "ckpt"
    ac.save({"w": torch.arange(6.0).reshape(2, 3), "step": 3}, path)
    return path


# ------------------------------------------------------------------ convert


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_convert_creates_the_missing_parent_directory(
    tmp_path: Path, small: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "nodir" / "deeper" / "m.out"
    assert main(["convert", str(small), "--to", fmt, str(out)]) == 0, capsys.readouterr().err
    got = load_file(out) if fmt == "safetensors" else torch.load(out, weights_only=True)
    assert torch.equal(got["w"], torch.arange(6.0).reshape(2, 3))
    assert [p.name for p in out.parent.iterdir()] == ["m.out"]  # no temporary left behind


def test_convert_to_a_path_under_a_file_names_the_file(
    tmp_path: Path, small: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "plain"
    blocker.write_text("x")
    assert main(["convert", str(small), "--to", "torch", str(blocker / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "not a directory" in err


def test_convert_torch_output_loads_with_weights_only_whatever_the_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Kinds torch's weights_only unpickler refuses are skipped with a warning naming the key."""
    ck = tmp_path / "c"
    values = {
        "when": datetime.date(2024, 1, 2),
        "lr": decimal.Decimal("0.1"),
        "dir": PurePosixPath("runs/a"),
        "ns": argparse.Namespace(lr=0.1),
        "np": np.float32(1.5),
        "ids": {1, 2},
        "dtype": torch.bfloat16,
        "dev": torch.device("cpu"),
        "step": 5,
    }
    ac.save({"w": torch.ones(2), "v": values}, ck)
    out = tmp_path / "state.pt"
    assert main(["convert", str(ck), "--to", "torch", str(out)]) == 0
    err = capsys.readouterr().err
    got = torch.load(out, weights_only=True)
    kept = {"ids", "dtype", "dev", "step"}
    assert got["v"] == {k: values[k] for k in kept}
    for skipped in set(values) - kept:
        assert f"'v.{skipped}'" in err and "weights_only" in err


# ------------------------------------------------------------------ verify


class _CountingChunks(tuple):  # type: ignore[type-arg]
    """A tensor's chunk records that count how many records each walk over them visits."""

    visited = 0

    def __iter__(self) -> Any:
        _CountingChunks.visited += len(self)
        return super().__iter__()


def test_verify_visits_each_chunk_record_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Linear in chunks: not every tensor's records again for every file."""
    monkeypatch.setattr("async_ckpt.save_flow._MIN_FILE_BYTES", 1024)
    ck = tmp_path / "c"
    ac.save({f"t{i}": torch.full((64 + i,), float(i)) for i in range(48)}, ck)
    real = verify.read_checkpoint_metadata

    def counting(*args: Any, **kwargs: Any) -> Metadata:
        md = real(*args, **kwargs)
        tensors = {fqn: _replace_chunks(rec) for fqn, rec in md.tensors.items()}
        return Metadata(tensors, md.values, md.files, md.tree, md.world_size, md.block_size, md.pickled)

    monkeypatch.setattr(verify, "read_checkpoint_metadata", counting)
    _CountingChunks.visited = 0
    report = verify.verify_checkpoint(ck)
    assert report.ok and report.files_checked >= 4
    assert _CountingChunks.visited == 48
    assert main(["verify", str(ck)]) == 0  # the command goes through the same walk
    assert _CountingChunks.visited == 96
    capsys.readouterr()


def _replace_chunks(rec: Any) -> Any:
    return type(rec)(rec.dtype, rec.shape, _CountingChunks(rec.chunks), rec.per_rank)


# ------------------------------------------------------------------ inspect


def test_inspect_shows_a_huge_int(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "c"
    ac.save({"n": 10**5000, "t": torch.ones(1)}, ck)
    assert main(["inspect", str(ck)]) == 0, capsys.readouterr().err
    assert "5001 digits" in capsys.readouterr().out
