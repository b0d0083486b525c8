"""Measuring one save: wall and CPU time, run-queue wait, page faults, peak tree memory.

What ``bench_async.py`` measures with, apart from the save methods themselves
(``async_modes.py``) and the tables (``async_report.py``): the hardware limits
(``Memcpy``, ``time_write``), a stand-in training step (``Trainer``), a memory
sampler in a separate process (``TreeMemory``), CPU accounting of the process tree
(``TreeCPU``) and ``timed_save`` / ``slowdown_run`` / ``memory_save``.
"""

from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import glob
import io
import json
import math
import os
import pstats
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from _common import (
    iter_tensors,
    median,
    preallocated_like,
    quiesce,
    raw_write,
    release_free_memory,
    rm,
    tensor_views,
    write_batches,
)
from async_modes import Mode

__all__ = [
    "CPU_FIELDS",
    "Memcpy",
    "Trainer",
    "TreeCPU",
    "TreeMemory",
    "library_revision",
    "machine_load",
    "memory_save",
    "profile_save",
    "slowdown_run",
    "stats_dict",
    "time_write",
    "timed_save",
]

MEM_INTERVAL = 0.1
CPU_FIELDS = (
    "total_cpu",
    "trainer_cpu",
    "helpers_cpu",
    "trainer_runq",
    "helpers_runq",
    "trainer_minflt",
    "helpers_minflt",
)


def library_revision() -> dict[str, Any]:
    """The async_ckpt source benchmarked: git commit, and whether its files had local edits."""
    root = Path(__file__).resolve().parent.parent
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "async_ckpt"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split("\n")
        out["modified"] = [line[3:] for line in dirty if line.strip()]
    return out


def machine_load() -> dict[str, Any]:
    out: dict[str, Any] = {"loadavg_1m": os.getloadavg()[0]}
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/pressure/cpu") as fh:
            some = fh.readline().split()
        out["cpu_pressure_some_avg10"] = float(some[1].split("=")[1])
    return out


# --------------------------------------------------------------------------- memory sampler

_SAMPLER = r"""
import json, select, sys, psutil
root = psutil.Process(int(sys.argv[1]))
me = psutil.Process().pid

def read(procs, pss):
    rss = ps = n = 0
    for p in procs:
        try:
            if pss:
                m = p.memory_full_info()
                ps += m.pss
            else:
                m = p.memory_info()
            rss += m.rss
            n += 1
        except psutil.Error:
            pass
    return rss, ps, n

def sample(pss):
    try:
        kids = [c for c in root.children(recursive=True) if c.pid != me]
    except psutil.Error:
        kids = []
    # Reading PSS walks page tables (~25 ms per GiB mapped) while a worker keeps mapping
    # the shared staging pages, which moves PSS between it and the trainer: read the
    # helpers before and after the trainer and average, so the skew cancels.
    r1, p1, n = read(kids, pss)
    r0, p0, _ = read([root], pss)
    r2, p2, _ = read(kids, pss) if pss else (r1, p1, n)
    return r0 + (r1 + r2) / 2, p0 + (p1 + p2) / 2, n + 1

while True:
    line = sys.stdin.readline()
    if not line or line.startswith("quit"):
        break
    _, interval, pss = line.split()
    interval, pss = float(interval), pss == "1"
    rss0, pss0, n0 = sample(pss)
    out = {"rss_base": rss0, "pss_base": pss0, "rss_peak": rss0, "pss_peak": pss0,
           "procs_max": n0, "samples": 1}
    print("ok", flush=True)
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        rss, ps, n = sample(pss)
        out["rss_peak"] = max(out["rss_peak"], rss)
        out["pss_peak"] = max(out["pss_peak"], ps)
        out["procs_max"] = max(out["procs_max"], n)
        out["samples"] += 1
        if ready:
            sys.stdin.readline()
            break
    print(json.dumps(out), flush=True)
"""


class TreeMemory:
    """Peak sum of RSS and of PSS over this process and its descendants, sampled by a
    separate process (so sampling costs the measured process no GIL time)."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SAMPLER, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    @property
    def pid(self) -> int:
        return self._proc.pid

    @contextlib.contextmanager
    def measure(self, interval: float = MEM_INTERVAL, pss: bool = True) -> Iterator[dict[str, Any]]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        result: dict[str, Any] = {}
        self._proc.stdin.write(f"start {interval} {int(pss)}\n")
        ok = self._proc.stdout.readline().strip()
        if ok != "ok":
            raise RuntimeError(f"memory sampler: unexpected reply {ok!r}")
        try:
            yield result
        finally:
            self._proc.stdin.write("stop\n")
            result.update(json.loads(self._proc.stdout.readline()))

    def close(self) -> None:
        if self._proc.poll() is None:
            assert self._proc.stdin is not None
            with contextlib.suppress(OSError):
                self._proc.stdin.write("quit\n")
                self._proc.stdin.close()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


# --------------------------------------------------------------------------- CPU accounting


def _runq_wait(pid: int) -> float:
    """Seconds the live threads of ``pid`` have spent runnable but waiting for a CPU."""
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f) as fh:
                total += int(fh.read().split()[1])
    return total / 1e9


def _minor_faults(pid: int) -> int:
    """Minor page faults of the whole process ``pid`` (live and exited threads)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[7])
    except (OSError, ValueError, IndexError):
        return 0


class TreeCPU:
    """CPU seconds, run-queue wait and minor page faults of this process (the trainer)
    and of its descendants (worker / helper processes), the memory sampler excluded."""

    def __init__(self, exclude: int) -> None:
        self._me = psutil.Process()
        self._exclude = exclude
        self._names: dict[int, str] = {}

    def snapshot(self) -> dict[int, tuple[float, float, int]]:
        out: dict[int, tuple[float, float, int]] = {}
        try:
            kids = [c for c in self._me.children(recursive=True) if c.pid != self._exclude]
        except psutil.Error:
            kids = []
        for p in [self._me, *kids]:
            try:
                t = p.cpu_times()
                out[p.pid] = (t.user + t.system, _runq_wait(p.pid), _minor_faults(p.pid))
                if p.pid not in self._names:
                    self._names[p.pid] = " ".join(p.cmdline())[-60:]
            except psutil.Error:
                pass
        return out

    def delta(
        self, before: dict[int, tuple[float, float, int]], after: dict[int, tuple[float, float, int]]
    ) -> dict[str, Any]:
        me = self._me.pid
        res: dict[str, Any] = {"per_pid": {}}
        for who in ("trainer", "helpers"):
            res.update({f"{who}_cpu": 0.0, f"{who}_runq": 0.0, f"{who}_minflt": 0})
        for pid, (cpu, rq, flt) in after.items():
            cpu0, rq0, flt0 = before.get(pid, (0.0, 0.0, 0))
            who = "trainer" if pid == me else "helpers"
            res[f"{who}_cpu"] += max(0.0, cpu - cpu0)
            res[f"{who}_runq"] += max(0.0, rq - rq0)
            res[f"{who}_minflt"] += max(0, flt - flt0)
            res["per_pid"][pid] = {
                "cmd": self._names.get(pid, "?"),
                "cpu": round(cpu - cpu0, 3),
                "runq": round(rq - rq0, 3),
                "minflt": flt - flt0,
            }
        res["total_cpu"] = res["trainer_cpu"] + res["helpers_cpu"]
        return res


# --------------------------------------------------------------------------- training step


class Trainer:
    """A stand-in training step: one 1024x1024 float32 matmul (all intra-op threads)."""

    def __init__(self, n: int = 1024) -> None:
        g = torch.Generator().manual_seed(1)
        self.a = torch.randn(n, n, generator=g)
        self.b = torch.randn(n, n, generator=g)
        self.c = torch.empty(n, n)
        for _ in range(3):
            self.step()

    def step(self) -> float:
        t = time.perf_counter()
        torch.mm(self.a, self.b, out=self.c)
        return time.perf_counter() - t

    def baseline(self, seconds: float = 1.0, min_steps: int = 10) -> list[float]:
        out: list[float] = []
        end = time.perf_counter() + seconds
        while len(out) < min_steps or time.perf_counter() < end:
            out.append(self.step())
        return out


# --------------------------------------------------------------------------- hardware


class Memcpy:
    """``copy_`` of every tensor into preallocated (already touched) tensors, which are
    kept only while an instance lives; timed on demand, in wall and CPU seconds."""

    def __init__(self, sd: dict[str, Any], warmup: int = 0) -> None:
        self.src = list(iter_tensors(sd))
        self.pre = preallocated_like(sd)
        self.dst = list(iter_tensors(self.pre))
        for _ in range(warmup):
            self.time()

    def time(self) -> dict[str, float]:
        with torch.no_grad():
            c = time.process_time()
            t = time.perf_counter()
            for d, s in zip(self.dst, self.src, strict=True):
                d.copy_(s)
            return {"wall": time.perf_counter() - t, "cpu": time.process_time() - c}

    def close(self) -> None:
        self.dst.clear()
        self.pre = None
        release_free_memory()


def time_write(sd: dict[str, Any], path: str) -> dict[str, float]:
    batches = write_batches(tensor_views(list(iter_tensors(sd))))
    rm(path)
    quiesce()
    c = time.process_time()
    t = time.perf_counter()
    raw_write(path, batches)
    out = {"wall": time.perf_counter() - t, "cpu": time.process_time() - c}
    rm(path)
    return out


# --------------------------------------------------------------------------- timed saves


def stats_dict(md: Any) -> dict[str, Any] | None:
    s = getattr(md, "stats", None)
    return dataclasses.asdict(s) if s is not None and dataclasses.is_dataclass(s) else None


def timed_save(
    mode: Mode, path: str, *, trainer: Trainer | None = None, cpu: TreeCPU | None = None
) -> dict[str, Any]:
    """One save: stall (issue + staged), durable (until the result); step times when training."""
    rm(path)
    quiesce()
    before = cpu.snapshot() if cpu is not None else None
    c0 = time.process_time()
    t0 = time.perf_counter()
    h = mode.issue(path)
    t_ret = time.perf_counter()
    mode.staged(h)
    t1 = time.perf_counter()
    c1 = time.process_time()
    steps: list[float] = []
    if trainer is not None:
        while not mode.done(h):
            steps.append(trainer.step())
    res = mode.wait(h)
    t2 = time.perf_counter()
    out: dict[str, Any] = {
        "returned": t_ret - t0,
        "stall": t1 - t0,
        "durable": t2 - t0,
        "stall_cpu": c1 - c0,
    }
    if cpu is not None and before is not None:
        out["cpu"] = cpu.delta(before, cpu.snapshot())
    st = stats_dict(res)
    if st is not None:
        out["stats"] = st
    if trainer is not None:
        out["steps"] = len(steps)
        out["steps_sum"] = sum(steps)
        out["step_median"] = median(steps) if steps else math.nan
    del h, res
    rm(path)
    release_free_memory()
    return out


def slowdown_run(mode: Mode, trainer: Trainer, path: str) -> dict[str, Any]:
    """Baseline steps (before and after, so load drift cancels), then steps during a save.

    ``lost_s`` is the training time the save cost: the stall plus the extra time of
    the steps taken while it was in flight (sum of step - baseline)."""
    before = trainer.baseline()
    r = timed_save(mode, path, trainer=trainer)
    after = trainer.baseline()
    base = median(before + after)
    r["baseline_step"] = base
    r["baseline_drift"] = median(after) / median(before)
    r["ratio"] = r["step_median"] / base if r["steps"] else math.nan
    r["lost_s"] = r["stall"] + r["steps_sum"] - r["steps"] * base
    return r


def memory_save(mode: Mode, mem: TreeMemory, path: str) -> dict[str, Any]:
    with mem.measure() as m:
        r = timed_save(mode, path)
    return {**m, "durable": r["durable"]}


def profile_save(ck: Any, sd: dict[str, Any], path: str, top: int) -> str:
    rm(path)
    quiesce()
    prof = cProfile.Profile()
    prof.enable()
    p = ck.save(sd, path)
    prof.disable()
    p.result()
    rm(path)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()
