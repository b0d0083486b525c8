"""The ``async-ckpt`` command line, run in-process through ``main([...])`` on real checkpoints.

One checkpoint is saved from a single process (every kind of leaf), one from
two ranks with unevenly sharded DTensors and a per-rank tensor; ``convert`` is
checked bit for bit against the original full tensors with safetensors' own
loader. One test runs the installed console script as a subprocess.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import run_ranks
from safetensors import safe_open
from safetensors.torch import load_file

import async_ckpt as ac
from async_ckpt import convert
from async_ckpt.cli import main
from async_ckpt.testing import same_bits


@pytest.fixture(autouse=True)
def _captured_width(monkeypatch: pytest.MonkeyPatch) -> None:
    # A COLUMNS inherited from the shell (or set by pytest-xdist's workers) would fold the
    # tables these tests read; captured output gets the CLI's own width for pipes.
    monkeypatch.delenv("COLUMNS", raising=False)


def _single_state() -> dict[Any, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {
            "w": torch.randn(40, 30, generator=g),
            "b": torch.randn(30, generator=g).to(torch.bfloat16),
            "ids": torch.arange(12, dtype=torch.int64).reshape(3, 4),
            "scalar": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.zeros(0, 3),
        },
        "optim": [{"mask": torch.rand(5, generator=g) > 0.5}, (1, 2.5)],
        "step": 7,
        "name": "run[1]",
        "blob": b"\x00\x01",
        3: "int key",
    }


def _full_two_ranks() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "emb": torch.randn(7, 5, generator=g),
        "proj": torch.randn(3, 9, generator=g),
        "bias": torch.randn(4, generator=g),
    }


def _save_two_ranks(rank: int, world: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = _full_two_ranks()
    state = {
        "model": {
            "emb": distribute_tensor(full["emb"], mesh, [Shard(0)]),  # rows 4 + 3
            "proj": distribute_tensor(full["proj"], mesh, [Shard(1)]),  # columns 5 + 4
            "bias": distribute_tensor(full["bias"], mesh, [Replicate()]),
        },
        "local": torch.full((2,), float(rank)),  # differs per rank: saved per rank
        "step": 5,
        "rank": rank,
    }
    ac.save(state, path, verify_replicas=True)


def _rows(out: str) -> dict[str, str]:
    """Table rows by their first cell (rich draws cells apart with │)."""
    return {line.split("│")[0].strip(): line for line in out.splitlines() if "│" in line}


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("single")
    ac.save(_single_state(), root / "step-00000007")
    return root / "step-00000007"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("two") / "ckpt"
    run_ranks(2, _save_two_ranks, str(path))
    return path


# ----------------------------------------------------------------------- ls


def test_ls(tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(single, tmp_path / "step-00000007")
    shutil.copytree(single, tmp_path / "step-12")
    (tmp_path / "step-00000013").mkdir()
    (tmp_path / "step-00000013" / "shard-r00000-00.safetensors").write_bytes(b"x" * 10)
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = _rows(out)
    assert "yes" in lines["step-00000007"] and " 7 " in lines["step-00000007"]
    assert "yes" in lines["step-12"] and " 12 " in lines["step-12"]
    assert "no" in lines["step-00000013"] and "10 B" in lines["step-00000013"]
    assert "KiB" in lines["step-00000007"] and "ago" in lines["step-00000007"]

    (tmp_path / "empty").mkdir()
    assert main(["ls", str(tmp_path / "empty")]) == 0
    assert "nothing under" in capsys.readouterr().out


def test_ls_shows_the_steps_of_a_manager_root_under_root(
    tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"  # a CheckpointManager root one level down
    run.mkdir()
    shutil.copytree(single, run / "step-00000001")
    shutil.copytree(single, run / "step-00000002")
    (tmp_path / "notes.txt").write_text("x")
    assert main(["ls", str(tmp_path)]) == 0
    lines = _rows(capsys.readouterr().out)
    assert "run" not in lines, "a manager root is not one uncommitted checkpoint"
    assert "yes" in lines["run/step-00000001"] and " 1 " in lines["run/step-00000001"]
    assert "yes" in lines["run/step-00000002"] and " 2 " in lines["run/step-00000002"]
    assert "not a checkpoint" in lines["notes.txt"]


def test_ls_missing_path_says_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["ls", str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing} does not exist"
    (tmp_path / "file").write_text("x")
    assert main(["ls", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'file'} is not a directory"


def test_ls_counts_hidden_leftovers_and_names_gc(
    tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(single, tmp_path / "step-00000007")
    (tmp_path / ".step-00000009.tmp-0123456789abcdef").mkdir()
    (tmp_path / ".step-00000010.tmp-fedcba9876543210").mkdir()
    (tmp_path / ".cache").mkdir()  # hidden, but no save's leftover
    assert main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "yes" in _rows(out)["step-00000007"]
    assert f"2 hidden leftover(s) of interrupted saves; `async-ckpt gc {tmp_path}` removes them" in out

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".step-00000001.tmp-0123456789abcdef").mkdir()
    assert main(["ls", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert "nothing under" in out and "1 hidden leftover(s)" in out

    assert main(["ls", str(tmp_path / "step-00000007")]) == 0
    assert "hidden leftover" not in capsys.readouterr().out


# ------------------------------------------------------------------ inspect


def test_inspect(tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(single)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert "float32" in rows["model.w"] and "(40, 30)" in rows["model.w"]
    assert "4.7 KiB" in rows["model.w"] and "shard-r00000-00.safetensors" in rows["model.w"]
    assert "bfloat16" in rows["model.b"] and "(30,)" in rows["model.b"]
    assert "float64" in rows["model.scalar"] and "()" in rows["model.scalar"]
    assert "'run[1]'" in rows["name"] and "7" in rows["step"] and "b'\\x00\\x01'" in rows["blob"]
    assert "'int key'" in rows["3"]

    ac.save({"t": torch.ones(2), "obj": range(3)}, tmp_path / "p", allow_pickle=True)
    assert main(["inspect", str(tmp_path / "p")]) == 0
    assert "<pickled>" in capsys.readouterr().out


@pytest.mark.slow
def test_inspect_two_ranks(two_ranks: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(two_ranks)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert "(7, 5)" in rows["model.emb"] and "(+1)" in rows["model.emb"]
    assert "per rank" in rows["local"] and "per rank: 0, 1" in rows["rank"]
    assert "saved by 2 rank(s)" in out


# ------------------------------------------------------------------- verify


def test_verify_clean_then_corrupt(tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "c"
    shutil.copytree(single, copy)
    assert main(["verify", str(copy)]) == 0
    assert "ok:" in capsys.readouterr().out

    md = ac.read_metadata(copy)
    chunk = md.tensors["model.w"].chunks[0]
    shard = copy / chunk.file
    data = bytearray(shard.read_bytes())
    data[chunk.byte_offset + 100] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and chunk.file in out and "model.w" in out and "checksum mismatch" in out


# ------------------------------------------------------------------ convert


def test_convert_safetensors(tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "model.safetensors"
    assert main(["convert", str(single), "--to", "safetensors", str(out_file)]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "non-tensor value(s) skipped" in captured.err
    loaded = load_file(out_file)
    want = _single_state()
    flat = {f"model.{k}": v for k, v in want["model"].items()} | {"optim.0.mask": want["optim"][0]["mask"]}
    assert loaded.keys() == flat.keys()
    for key, tensor in flat.items():
        assert same_bits(loaded[key], tensor), key
    with safe_open(str(out_file), framework="pt") as f:  # the Hugging Face loading path
        assert f.metadata() == {"format": "pt"}
        assert same_bits(f.get_tensor("model.w"), want["model"]["w"])
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file was left behind"


@pytest.mark.slow
def test_convert_safetensors_two_ranks_in_slabs(
    tmp_path: Path, two_ranks: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    budget_mb = 48 / (1 << 20)  # 48 bytes: several slabs per tensor, some of a part of a row
    boxes: list[tuple[str, int]] = []
    real = convert.read_region

    def counting(storage: Any, location: str, md: Any, fqn: str, offsets: Any, out: torch.Tensor) -> None:
        boxes.append((fqn, out.numel() * out.element_size()))
        real(storage, location, md, fqn, offsets, out)

    monkeypatch.setattr(convert, "read_region", counting)
    out_file = tmp_path / "two.safetensors"
    assert (
        main(["convert", str(two_ranks), "--to", "safetensors", str(out_file), "--slab-mb", str(budget_mb)])
        == 0
    )
    err = capsys.readouterr().err
    assert "skipped 'local'" in err and "--rank" in err
    full = _full_two_ranks()
    loaded = load_file(out_file)
    assert loaded.keys() == {"model.emb", "model.proj", "model.bias"}
    for name, tensor in full.items():
        assert same_bits(loaded[f"model.{name}"], tensor), name
    assert sum(1 for fqn, _ in boxes if fqn == "model.emb") >= 3
    assert max(n for _, n in boxes) <= 48

    monkeypatch.setattr(convert, "read_region", real)
    assert main(["convert", str(two_ranks), "--to", "safetensors", str(out_file), "--rank", "1"]) == 0
    assert same_bits(load_file(out_file)["local"], torch.full((2,), 1.0))


def test_slabs_tile_in_row_major_order() -> None:
    for shape, itemsize, budget in [
        ((7, 5), 4, 48),
        ((3, 4, 5), 2, 16),
        ((10,), 8, 24),
        ((2, 3), 4, 1 << 20),
    ]:
        expected = 0
        for offsets, sizes in convert._slabs(shape, itemsize, budget):
            assert math.prod(sizes) * itemsize <= max(budget, itemsize)
            # Row-major position of the box's first element follows the previous box.
            strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
            assert sum(o * s for o, s in zip(offsets, strides, strict=True)) == expected
            expected += math.prod(sizes)
        assert expected == math.prod(shape)
    assert list(convert._slabs((), 4, 16)) == [((), ())]
    assert list(convert._slabs((0, 3), 4, 16)) == []


@pytest.mark.slow
def test_convert_torch(
    tmp_path: Path, single: Path, two_ranks: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "state.pt"
    assert main(["convert", str(single), "--to", "torch", str(out_file)]) == 0
    got = torch.load(out_file, weights_only=True)
    want = _single_state()
    assert set(got) == set(want)
    for key, tensor in want["model"].items():
        assert same_bits(got["model"][key], tensor), key
    assert isinstance(got["optim"], list) and got["optim"][1] == (1, 2.5)
    assert same_bits(got["optim"][0]["mask"], want["optim"][0]["mask"])
    assert (got["step"], got["name"], got["blob"], got[3]) == (7, "run[1]", b"\x00\x01", "int key")

    assert main(["convert", str(two_ranks), "--to", "torch", str(out_file), "--rank", "0"]) == 0
    got = torch.load(out_file, weights_only=True)
    assert same_bits(got["model"]["proj"], _full_two_ranks()["proj"])
    assert same_bits(got["local"], torch.zeros(2)) and got["step"] == 5 and got["rank"] == 0
    capsys.readouterr()


# ----------------------------------------------------------------------- gc


def test_gc(tmp_path: Path, single: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(single, tmp_path / "step-00000007")
    leftover = tmp_path / ".step-00000009.tmp-0123456789abcdef"
    leftover.mkdir()
    (tmp_path / "step-00000010").mkdir()
    assert main(["gc", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(leftover) in out and "step-00000010" in out and "2 leftover(s) removed" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000007"]
    assert main(["gc", str(tmp_path)]) == 0
    assert "nothing to remove" in capsys.readouterr().out


# ------------------------------------------------------------------- errors


def test_errors_one_line_or_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope")
    assert main(["inspect", missing]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"error: no committed checkpoint at {missing} ({'metadata.json'} not found)"
    ]
    assert main(["--debug", "inspect", missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "CheckpointNotFoundError" in err
    assert main(["verify", missing, "--debug"]) == 1  # a missing checkpoint fails verification
    assert main(["ls", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bogus"]) == 2
    assert main(["convert", missing, "--to", "safetensors", str(tmp_path / "o"), "--slab-mb", "0"]) == 2
    assert "--slab-mb must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script(single: Path) -> None:
    exe = shutil.which("async-ckpt")
    assert exe is not None, "pip install -e . installs the async-ckpt console script"
    done = subprocess.run([exe, "inspect", str(single)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "model.w" in done.stdout and "float32" in done.stdout


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"async-ckpt {ac.__version__}"
