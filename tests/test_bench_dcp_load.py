"""Smoke test of ``benchmarks/bench_dcp_load.py`` at a tiny size: it runs and reports every figure.

Timings at this size measure nothing, so nothing is asserted about them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(660)
def test_bench_dcp_load_runs_and_reports_ours_against_dcp_load(tmp_path: Path) -> None:
    out = tmp_path / "dcp_load.json"
    # This checkout's package, as benchmarks/run.py gives its parts: not whatever copy is installed.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath)
    cmd = [
        sys.executable,
        "benchmarks/bench_dcp_load.py",
        "--gib",
        "0.01",
        "--tensors",
        "40",
        "--repeats",
        "1",
    ]
    cmd += ["--warmup", "0", "--dir", str(tmp_path), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"dcp.load cold", "ac.load cold", "ac.load_state_dict cold"}
    ratio = res["ratios"]["ac_load_over_dcp_load"]
    assert ratio["of_medians"] > 0 and len(ratio["paired"]) == 1
    assert "ac.load / dcp.load" in proc.stdout
    assert list(tmp_path.iterdir()) == [out]  # the checkpoint was removed
