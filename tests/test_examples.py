"""Smoke tests: every example runs end to end at a tiny size, as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import async_ckpt as ac

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# Generous: a hang guard that a busy 2-core machine (load average 8) must never reach.
RUN_TIMEOUT = 600


def _run(args: list[str], timeout: float = RUN_TIMEOUT) -> str:
    # This checkout's package, not whatever copy is installed (an editable install may point elsewhere).
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=pythonpath)
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_train_sync_main_job(tmp_path: Path) -> None:
    out = _run([str(EXAMPLES / "train_sync.py"), "--out", str(tmp_path), "--steps", "20", "--every", "10"])
    assert "parameters match the live model: True" in out
    assert ac.read_metadata(tmp_path / "step-20").values["step"].value == 20


def test_train_async_overlap(tmp_path: Path) -> None:
    out = _run([str(EXAMPLES / "train_async.py"), "--out", str(tmp_path), "--steps", "20", "--every", "10"])
    assert "loaded step 20" in out


@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_torchrun_tensor_parallel_then_resume_on_two_ranks(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "tp")
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    out = _run([*run, "4", str(EXAMPLES / "torchrun_tp.py"), "--out", ckpt])
    assert "saved step 5 from 4 ranks" in out
    out = _run([*run, "2", str(EXAMPLES / "torchrun_tp.py"), "--out", ckpt, "--resume"])
    assert "resumed step 5 on 2 ranks; every parameter matches" in out


def _checksum(out: str, prefix: str) -> str:
    match = re.search(rf"^{prefix}: state checksum ([0-9a-f]{{16}})$", out, re.MULTILINE)
    assert match, f"no line '{prefix}: state checksum ...' in:\n{out}"
    return match.group(1)


@pytest.mark.timeout(2 * RUN_TIMEOUT + 60)
def test_fsdp2_torchrun_saves_on_four_ranks_and_resumes_bit_exact_on_two(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "fsdp2")
    run = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    example = str(EXAMPLES / "fsdp2_torchrun.py")
    out = _run([*run, "4", example, "--out", ckpt, "--steps", "8"])
    saved = _checksum(out, "saving step 8 from 4 ranks")
    assert _checksum(out, "saving step 4 from 4 ranks") != saved  # training moved the state
    out = _run([*run, "2", example, "--out", ckpt, "--steps", "12", "--resume"])
    assert _checksum(out, "resumed step 8 on 2 ranks") == saved
    assert "saving step 12 from 2 ranks" in out
    assert ac.read_metadata(Path(ckpt) / "step-00000008").world_size == 4
    assert ac.read_metadata(Path(ckpt) / "step-00000012").world_size == 2
