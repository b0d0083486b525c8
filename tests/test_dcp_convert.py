"""``async-ckpt convert DCP_DIR --to async_ckpt|safetensors|torch OUT`` on real ``dcp.save`` checkpoints.

The result of ``--to async_ckpt`` is checksummed (``verify`` passes) and loads
bit for bit what ``dcp.load`` gives; the conversion streams chunk by chunk in
slabs, so its memory stays within the slab size, not the checkpoint's.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from harness import run_ranks
from safetensors.torch import load_file
from test_dcp_interop import Tagged, _snapshot
from test_dcp_interop import _state as _state1
from test_dcp_interop_dist import TIMEOUT, _save_on_4
from test_dcp_interop_dist import _snapshot as _snapshot4
from test_dcp_interop_dist import _state as _state4

import async_ckpt as ac
from async_ckpt.cli import main

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dcp1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcp1") / "ckpt"
    dcp.save(_state1(0), checkpoint_id=str(path))
    return path


@pytest.fixture(scope="module")
def dcp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dcp4") / "ckpt"
    run_ranks(4, _save_on_4, str(path), timeout=TIMEOUT)
    return path


def _convert(src: Path, to: str, out: Path, *extra: str) -> None:
    assert main(["convert", str(src), "--to", to, str(out), *extra]) == 0


def test_dcp_converted_to_async_ckpt_verifies_and_loads_like_dcp_load(dcp1: Path, tmp_path: Path) -> None:
    out = tmp_path / "ours"
    _convert(dcp1, "async_ckpt", out)
    assert main(["verify", str(out)]) == 0
    md = ac.read_metadata(out)
    assert md.token is not None and all(c.checksums for r in md.tensors.values() for c in r.chunks)
    ours, theirs = _state1(1), _state1(1)
    ac.load(ours, out)
    dcp.load(theirs, checkpoint_id=str(dcp1))
    assert _snapshot(ours) == _snapshot(theirs)
    assert _snapshot(ac.load_state_dict(out)) == _snapshot(ac.load_state_dict(dcp1))


def test_dcp_from_4_ranks_converted_to_async_ckpt_verifies_and_loads_like_dcp_load(
    dcp4: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ours"
    _convert(dcp4, "async_ckpt", out, "--slab-mb", str(64 / (1 << 20)))  # 64-byte slabs: many chunks
    assert main(["verify", str(out)]) == 0
    md = ac.read_metadata(out)
    assert max(c.byte_length for r in md.tensors.values() for c in r.chunks) <= 64
    ours, theirs = _state4(None, {}, "y"), _state4(None, {}, "y")
    ac.load(ours, out)
    dcp.load(theirs, checkpoint_id=str(dcp4))
    assert _snapshot4(ours) == _snapshot4(theirs)
    assert ours["step"] == 7 and ours["note"] == "saved"
    for src in (dcp4, out):  # and without a target: whole plain tensors, from DCP or converted
        tree = ac.load_state_dict(src)
        for name, p in theirs["model"].items():
            assert type(tree["model"][name]) is torch.Tensor
            assert torch.equal(tree["model"][name], p.detach()), (src, name)
        assert torch.equal(
            tree["optim"]["state"][0]["exp_avg"], theirs["optim"].state_dict()["state"][0]["exp_avg"]
        )


def test_damage_after_conversion_is_caught_by_verify(dcp1: Path, tmp_path: Path) -> None:
    out = tmp_path / "ours"
    _convert(dcp1, "async_ckpt", out)
    shard = next(p for p in out.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x10
    shard.write_bytes(bytes(raw))
    assert main(["verify", str(out)]) == 1
    with pytest.raises(ac.CorruptCheckpointError, match="checksum"):
        ac.load_state_dict(out)


def test_dcp_to_safetensors_and_torch_hold_the_full_tensors(dcp4: Path, tmp_path: Path) -> None:
    theirs = _state4(None, {}, "y")
    dcp.load(theirs, checkpoint_id=str(dcp4))
    _convert(dcp4, "safetensors", tmp_path / "m.safetensors", "--slab-mb", str(40 / (1 << 20)))
    flat = load_file(tmp_path / "m.safetensors")
    for name, p in theirs["model"].items():
        assert torch.equal(flat[f"model.{name}"], p.detach()), name
    _convert(dcp4, "torch", tmp_path / "m.pt")
    got = torch.load(tmp_path / "m.pt", weights_only=True)
    for name, p in theirs["model"].items():
        assert torch.equal(got["model"][name], p.detach()), name
    assert got["step"] == 7 and got["note"] == "saved"
    assert len(got["optim"]["state"]) == 3


def test_value_needing_pickle_is_skipped_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dcp.save({"w": torch.ones(3), "odd": Tagged("t"), "n": 1}, checkpoint_id=str(tmp_path / "d"))
    _convert(tmp_path / "d", "async_ckpt", tmp_path / "ours")
    assert "odd" in capsys.readouterr().err
    got = ac.load_state_dict(tmp_path / "ours")
    assert got["n"] == 1 and got["odd"] is None and torch.equal(got["w"], torch.ones(3))


def test_converting_our_own_checkpoint_to_async_ckpt_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ac.save({"w": torch.ones(2)}, tmp_path / "c")
    assert main(["convert", str(tmp_path / "c"), "--to", "async_ckpt", str(tmp_path / "o")]) == 2
    assert "already an async_ckpt checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


_CHILD = """
import json, resource, sys
import torch
from async_ckpt.cli import main
torch.empty(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
status = main(["convert", sys.argv[1], "--to", sys.argv[2], sys.argv[3], "--slab-mb", "4"])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps([status, before, after]))
"""


@pytest.mark.parametrize("to", ["async_ckpt", "safetensors"])
def test_conversion_memory_stays_within_the_slab_not_the_checkpoint(tmp_path: Path, to: str) -> None:
    # 256 MiB in one chunk: far above the fixed cost of a conversion (imports, the writer's
    # batch and direct-I/O buffers: 40-70 MiB), so reading it whole could not pass.
    big = torch.randn(256, 1 << 18)
    dcp.save({"big": big, "small": torch.ones(4)}, checkpoint_id=str(tmp_path / "d"))
    del big
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "d"), to, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    status, before, after = json.loads(run.stdout.strip().splitlines()[-1])
    assert status == 0
    grew_mib = (after - before) / 1024  # ru_maxrss is in KiB on Linux
    assert grew_mib < 128, f"peak memory grew by {grew_mib:.0f} MiB converting a 256 MiB tensor"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
    if to == "async_ckpt":
        md = ac.read_metadata(tmp_path / "out")
        assert len(md.tensors["big"].chunks) >= 64 and math.prod(md.tensors["big"].shape) == 256 << 18
