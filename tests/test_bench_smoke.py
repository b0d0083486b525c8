"""Smoke test of the benchmark runner: ``benchmarks/run.py --quick`` end to end.

It checks that every part runs, that ``results.json`` has every section and the
PNGs are drawn; it asserts nothing about timings (tiny sizes on a shared CI
machine measure nothing).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PNGS = ("stall_durable.png", "size_sweep.png", "multirank_bytes.png")
# A hang guard, not a speed check: the quick run outlasted the old 260 s at load average 4-8 on
# a 2-core machine, and took 9 minutes (93 CPU seconds) at load average 10-16.
QUICK_RUN_TIMEOUT = 1500
TARGET_KEYS = {
    "stall_over_memcpy",
    "durable_over_memcpy_plus_write",
    "peak_pss_over_state",
    "slowdown_vs_dcp_thread",
    "first_eager_over_steady",
    "save_over_write_fsync",
    "load_over_cold_read",
    "save_over_write_fsync_paired",
    "load_over_cold_read_paired",
    "planning_1024_s",
    "planning_4096_s",
    "dcp_ckpt_load_over_dcp_load",
    "budget_peak_pss_over_limit",
    "budget_durable_over_memcpy_plus_write",
    "overlap_call_ms",
    "overlap_overhead_over_memcpy",
    # issue 14.1, per world size (--quick: 2 ranks) and replicated fraction (1 and 0.5)
    "replica_stall_2ranks_100rep",
    "replica_staged_2ranks_100rep",
    "replica_stall_2ranks_50rep",
    "replica_staged_2ranks_50rep",
    # issue 14.4, bench_worker.py
    "worker_ready_s",
    "worker_idle_rss_mb",
    "worker_first_over_steady_stall",
}


@pytest.mark.timeout(QUICK_RUN_TIMEOUT + 60)
def test_run_quick(tmp_path: Path) -> None:
    out, plots = tmp_path / "out", tmp_path / "plots"
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--out", str(out), "--plots-dir", str(plots)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=QUICK_RUN_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"

    res = json.loads((out / "results.json").read_text())
    assert res["errors"] == {}
    assert res["config"]["quick"] is True
    m = res["machine"]
    for key in ("cpu_count", "cpu_model", "ram_bytes", "disk", "torch", "git_revision", "python"):
        assert key in m, key
    assert m["cpu_count"] >= 1 and m["ram_bytes"] > 0

    assert "ratios" in res["single"] and "results" in res["single"]
    assert "memcpy" in res["single"]["results"] and "ac.save" in res["single"]["results"]
    assert {"ac", "dcp_thread"} <= set(res["async"]["summary"]["saves"])
    assert "ratios" in res["async"]

    assert [p["gib"] for p in res["sweep"]] == [0.03, 0.06]
    for p in res["sweep"]:
        assert "ratios" in p["single"]  # --quick also runs bench_single in the sweep
        assert "torch.load cold" not in p["single"]["results"]  # with --skip-torch
        assert {"ac", "dcp_thread"} <= set(p["async"]["summary"]["saves"])
        assert p["async"]["config"]["light"] is True

    import torch

    if torch.cuda.is_available():
        assert {"ac", "ac_overlap", "dcp_pinned", "d2h", "ratios"} <= set(res["gpu"])
    else:
        assert "skipped" in res["gpu"] and "skipped" in res["summary"]["gpu"]

    worlds = res["multirank"]["results"]
    assert [(w["world"], w["replicated_fraction"]) for w in worlds] == [(2, 1.0), (2, 0.5)]
    for w in worlds:
        assert {"ac", "ac_all", "dcp_save", "dcp_thread"} <= set(w["methods"])
        for meth in w["methods"].values():
            assert len(meth["bytes_per_rank"]) == w["world"]
            assert all(b > 0 for b in meth["bytes_per_rank"])
            assert meth["bytes_on_disk"] > 0

    assert [r["ranks"] for r in res["planning"]["results"]] == [64]
    assert {"dcp.load cold", "ac.load cold", "ac.load_state_dict cold"} <= set(res["dcp_load"]["results"])
    assert {"budgeted", "unbudgeted"} <= set(res["budget"]["medians"])
    assert {"ac_blocking", "ac_overlap", "dcp_thread"} <= set(res["overhead"]["summary"]["modes"])
    assert {"after_build", "at_once"} <= set(res["worker"]["summary"]["first"])

    s = res["summary"]
    assert set(s["targets"]) == TARGET_KEYS
    for t in s["targets"].values():
        assert {"value", "target", "met", "description"} <= set(t)
    assert "vs_dcp" in s and len(s["sweep"]) == 2
    assert [r["replicated"] for r in s["replica_staging"]] == [1.0, 0.5]
    assert s["budget"]["stall_budgeted_over_unbudgeted"] is not None
    assert {"ac_blocking", "ac_overlap"} <= set(s["overhead"])
    assert s["worker"]["ready_s"] is not None and s["worker"]["idle_rss_before"] > 0

    md = (out / "summary.md").read_text()
    assert "## Machine" in md and "## Results" in md and "GPU mode:" in md
    assert "async stall / memcpy" in proc.stdout  # the merged table was printed
    assert "ac staged bytes / (1.05 x state/N + 64 MiB)" in proc.stdout
    assert "stall s, budgeted / unbudgeted" in md
    assert "idle worker RSS without staging MB" in md
    for name in PNGS:
        png = plots / name
        assert png.is_file() and png.stat().st_size > 1000, name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(600)
def test_first_save_breakdown_runs(tmp_path: Path) -> None:
    """``bench_first_save.py`` (not a part of run.py): every step of the stall is reported."""
    out = tmp_path / "first.json"
    cmd = [sys.executable, "benchmarks/bench_first_save.py", "--gib", "0.0625", "--repeats", "1"]
    proc = subprocess.run(
        [*cmd, "--steady", "1", "--dir", str(tmp_path), "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(out.read_text())["summary"]
    first = summary["first"]
    assert first["back"] > 0 and first["copy"] > 0 and first["layout"] > 0  # a first save backs and registers
    assert summary["steady"]["back"] == 0  # a steady save allocates nothing


@pytest.mark.timeout(600)
def test_save_call_timing_runs(tmp_path: Path) -> None:
    """``time_save_call.py`` (not a part of run.py): the overlap call and each of its parts."""
    script = "benchmarks/time_save_call.py"
    cmd = [sys.executable, script, "--gib", "0.02", "--tensors", "300", "--calls", "3"]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for part in ("whole call", "flatten", "layout cache (all)", "signature", "optimizers_to_guard"):
        assert re.search(rf"{re.escape(part)}: median +\d+\.\d+ ms", proc.stdout), (part, proc.stdout)
