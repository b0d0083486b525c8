"""Background checkpointing: async_ckpt's AsyncCheckpointer against the hardware and torch DCP.

One run measures, side by side on the same synthetic model + Adam state dict
(``_common.make_state_dict``), min / median / max over ``--repeats`` rounds:

1. hardware limits: ``memcpy`` (``copy_`` of every tensor into preallocated, already
   touched tensors; timed right before and right after the async_ckpt save it is
   compared with, and averaged) and ``write+fsync`` (the same bytes to one file with
   large ``writev`` calls, then fsync);
2. async_ckpt: one ``AsyncCheckpointer(start=True)`` for every round (its construction,
   i.e. the worker start, timed on its own); its first save and the steady-state
   saves: *stall* (how long ``ck.save`` blocks) and *durable* (from the call until
   ``p.result()`` returns); ``overlap=True`` saves (stall = until ``p.staged``);
   blocking ``ac.save``; and the first save of a fresh checkpointer whose worker
   starts lazily (construction + save + durable);
3. torch DCP on the same state dict: blocking ``dcp.save``; ``dcp.async_save`` in
   THREAD mode (DCP's default stager: a fresh CPU copy per save) and in PROCESS mode
   (a persistent ``DefaultStager`` staging into shared memory, which PROCESS mode
   needs to hand tensors to its helper process cheaply; ``--process-repeats``, default
   2 rounds, because its saves are the slowest). PROCESS mode requires a
   process group, so a 1-rank gloo group (TCPStore on port 0) is initialised first
   (a 1-rank group: async_ckpt then runs exactly as without one); every DCP call
   runs under it;
4. for every asynchronous method: *training-step slowdown*: a 1024x1024 float32
   matmul "training step", timed with no save (baseline: 1 s right before and 1 s
   right after each run, so load drift cancels), then while a save is in flight
   (issue the save, step until it is done); the figure is median step time during
   the save / baseline median. Also *training lost*: the stall plus the extra time
   of the steps taken during the save (sum of step - baseline), the training time
   one save costs;
5. for every method: *peak memory of the process tree* (trainer + worker / helper
   processes) during one extra steady-state save, with nothing of the other methods
   alive (DCP PROCESS is measured first, before the async_ckpt checkpointer exists;
   the others after the rounds), sampled every 0.1 s by a separate sampler process
   (not counted); the trainer alone (no checkpointer yet) is sampled too: both the
   sum of RSS and the sum of PSS. Staging buffers in shared memory are mapped by
   the trainer and by the worker, so the RSS sum counts them twice; **PSS is the
   honest figure** (each shared page divided among the processes mapping it).
   Memory has runs of its own because reading PSS (``smaps_rollup``) of a
   multi-GiB process costs ~50 ms of CPU, which would perturb the timed runs;
6. cold loads (page cache evicted first) into a preallocated target: ``ac.load``
   (with and without checksum verification) and ``dcp.load``.

Every timed save also records the CPU seconds of the trainer and of its helper
processes (``/proc``), and their run-queue wait (``/proc/<pid>/task/*/schedstat``):
time spent runnable but not running. On a shared, oversubscribed machine the wall
times stretch with the load, and a niced worker stretches most; CPU seconds and
run-queue wait show where the time went. Each round runs every method once, back
to back, so methods are compared under the same load; the system load average and
CPU pressure are recorded per round, and ratios are computed per round (paired)
before taking the median.

Before every timed step the disk is quiesced (``os.sync``); checkpoint directories
are removed after every save. Targets:

- async_ckpt stall / memcpy                                  <= 1.3
- async_ckpt time-to-durable / (memcpy + write+fsync)         <= 1.3
- async_ckpt peak tree PSS / state-dict bytes                 <= 2.3
- async_ckpt step slowdown (ratio - 1) <= half of DCP thread mode's
- async_ckpt first save (worker started eagerly) / steady     <= 2  (time to durable)

    python benchmarks/bench_async.py --gib 2.0 --tensors 2872 --repeats 3 --json out.json

``--light`` is a size-sweep point: the rounds only, measuring stall and time to
durable of async_ckpt, blocking ``dcp.save`` and DCP THREAD mode beside memcpy and
write+fsync (no DCP PROCESS, whose helper spawn alone costs ~12 s per size, no
step slowdown, memory, extra first saves or loads).

``--profile N`` also profiles one steady-state ``ck.save`` on the trainer side with
cProfile and prints the top N functions by cumulative time. ``--worker-nice N``
re-nices the async_ckpt worker after it starts (an experiment: the library starts it
at nice 5).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import cProfile
import dataclasses
import glob
import inspect
import io
import json
import math
import os
import platform
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    cold_step,
    fmt_bytes,
    iter_tensors,
    make_state_dict,
    median,
    preallocated_like,
    print_table,
    raw_write,
    release_free_memory,
    resident_bytes,
    state_dict_bytes,
    summarize,
    tensor_views,
    write_batches,
)

TARGETS = {
    "stall_over_memcpy": 1.3,
    "durable_over_memcpy_plus_write": 1.3,
    "peak_pss_over_state": 2.3,
    "slowdown_vs_dcp_thread": 0.5,
    "first_eager_over_steady": 2.0,
}
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
ASYNC_KEYS = ("ac", "dcp_thread", "dcp_process")
LABELS = {
    "ac": "async_ckpt AsyncCheckpointer.save",
    "ac_overlap": "async_ckpt save(overlap=True)",
    "ac_blocking": "async_ckpt ac.save (blocking)",
    "dcp_save": "DCP save (blocking)",
    "dcp_thread": "DCP async_save THREAD",
    "dcp_process": "DCP async_save PROCESS",
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _quiesce() -> None:
    os.sync()


def _rm(path: str | Path) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
    for sib in p.parent.glob(f".{p.name}.*"):  # leftovers of an interrupted async_ckpt save
        shutil.rmtree(sib, ignore_errors=True)


def _library_revision() -> dict[str, Any]:
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


def _machine_load() -> dict[str, Any]:
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
    _rm(path)
    _quiesce()
    c = time.process_time()
    t = time.perf_counter()
    raw_write(path, batches)
    out = {"wall": time.perf_counter() - t, "cpu": time.process_time() - c}
    _rm(path)
    return out


# --------------------------------------------------------------------------- save modes


@dataclass
class Mode:
    """How to issue one save, wait until it is staged / durable, and ask whether it is done."""

    name: str
    issue: Callable[[str], Any]
    staged: Callable[[Any], None]
    done: Callable[[Any], bool]
    wait: Callable[[Any], Any]


def _stats_dict(md: Any) -> dict[str, Any] | None:
    s = getattr(md, "stats", None)
    return dataclasses.asdict(s) if s is not None and dataclasses.is_dataclass(s) else None


def timed_save(
    mode: Mode, path: str, *, trainer: Trainer | None = None, cpu: TreeCPU | None = None
) -> dict[str, Any]:
    """One save: stall (issue + staged), durable (until the result); step times when training."""
    _rm(path)
    _quiesce()
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
    st = _stats_dict(res)
    if st is not None:
        out["stats"] = st
    if trainer is not None:
        out["steps"] = len(steps)
        out["steps_sum"] = sum(steps)
        out["step_median"] = median(steps) if steps else math.nan
    del h, res
    _rm(path)
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


# --------------------------------------------------------------------------- async_ckpt


def _renice_tree(pid: int, nice: int) -> None:
    for task in glob.glob(f"/proc/{pid}/task/*"):
        with contextlib.suppress(OSError, ValueError):
            os.setpriority(os.PRIO_PROCESS, int(os.path.basename(task)), nice)


def ac_modes(ac: Any, ck: Any, sd: dict[str, Any]) -> dict[str, Mode]:
    return {
        "ac": Mode(
            "ac", lambda path: ck.save(sd, path), lambda p: None, lambda p: p.done(), lambda p: p.result()
        ),
        "ac_overlap": Mode(
            "ac_overlap",
            lambda path: ck.save(sd, path, overlap=True),
            lambda p: p.staged.wait(),
            lambda p: p.done(),
            lambda p: p.result(),
        ),
        "ac_blocking": Mode(
            "ac_blocking", lambda path: ac.save(sd, path), lambda h: None, lambda h: True, lambda h: h
        ),
    }


def _profile_save(ck: Any, sd: dict[str, Any], path: str, top: int) -> str:
    _rm(path)
    _quiesce()
    prof = cProfile.Profile()
    prof.enable()
    p = ck.save(sd, path)
    prof.disable()
    p.result()
    _rm(path)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    return buf.getvalue()


# --------------------------------------------------------------------------- torch DCP


def _init_process_group() -> bool:
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=600), wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return True


def _dcp_mode(name: str, call: Callable[[str], Any]) -> Mode:
    def staged(h: Any) -> None:
        sc = getattr(h, "staging_completion", None)  # AsyncSaveResponse (async staging)
        if sc is not None:
            sc.result()

    def upload(h: Any) -> concurrent.futures.Future[Any]:
        return h if isinstance(h, concurrent.futures.Future) else h.upload_completion

    return Mode(name, call, staged, lambda h: upload(h).done(), lambda h: upload(h).result())


class DcpProcess:
    """DCP PROCESS mode with a persistent shared-memory DefaultStager (if the API has one)."""

    def __init__(self, sd: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.stager: Any = None
        kwargs: dict[str, Any] = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS}
        if "async_stager" in inspect.signature(dcp.async_save).parameters:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self.stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=False,
                    use_shared_memory=True,
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )
            kwargs["async_stager"] = self.stager
        self.description = "DefaultStager(shared memory, synchronous staging)" if self.stager else "default"
        self.mode = _dcp_mode("dcp_process", lambda path: dcp.async_save(sd, checkpoint_id=path, **kwargs))

    def close(self) -> None:
        try:
            import torch.distributed.checkpoint._async_process_executor as ape
        except ImportError:
            ape = None
        if ape is not None:
            proc = getattr(ape, "_CHECKPOINT_PROCESS", None)
            ape._CHECKPOINT_PROCESS = None
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.__del__()  # sends TERMINATE and joins the helper process
        if self.stager is not None:
            self.stager.close()
            self.stager = None
        release_free_memory()


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point fd 2 at ``path`` meanwhile: DCP's PROCESS-mode helper, spawned in here,
    inherits it and logs every request at INFO level."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def dcp_modes(sd: dict[str, Any]) -> dict[str, Mode]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    return {
        "dcp_save": Mode(
            "dcp_save",
            lambda path: dcp.save(sd, checkpoint_id=path),
            lambda h: None,
            lambda h: True,
            lambda h: h,
        ),
        "dcp_thread": _dcp_mode(
            "dcp_thread",
            lambda path: dcp.async_save(
                sd, checkpoint_id=path, async_checkpointer_type=AsyncCheckpointerType.THREAD
            ),
        ),
    }


# --------------------------------------------------------------------------- loads


def _check_equal(target: dict[str, Any], sd: dict[str, Any]) -> bool:
    a, b = list(iter_tensors(target)), list(iter_tensors(sd))
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def phase_loads(
    sd: dict[str, Any], args: argparse.Namespace, ac_dir: str, dcp_dir: str | None
) -> dict[str, Any]:
    import async_ckpt as ac

    target = preallocated_like(sd)
    steps: dict[str, tuple[str, Callable[[], Any]]] = {
        "ac.load cold": (ac_dir, lambda: ac.load(target, ac_dir)),
        "ac.load cold verify=False": (ac_dir, lambda: ac.load(target, ac_dir, verify=False)),
    }
    if dcp_dir is not None:
        import torch.distributed.checkpoint as dcp

        steps["dcp.load cold"] = (dcp_dir, lambda: dcp.load(target, checkpoint_id=dcp_dir))
    times: dict[str, list[float]] = {k: [] for k in steps}
    resident: dict[str, list[int | None]] = {k: [] for k in steps}
    disturbed: dict[str, int] = {k: 0 for k in steps}
    correct: dict[str, bool] = {}
    for _ in range(args.repeats):
        for name, (src, fn) in steps.items():
            for t in iter_tensors(target):
                t.zero_()

            def run(
                src: str = src, fn: Callable[[], Any] = fn, seen: list[int | None] = resident[name]
            ) -> float:
                seen.append(resident_bytes(src))
                _quiesce()
                t0 = time.perf_counter()
                fn()
                return time.perf_counter() - t0

            # One redo at most: dcp.load outlasts the 2 s grace every time.
            dt, redone = cold_step(src, run, attempts=2)
            times[name].append(dt)
            disturbed[name] += redone
            if name not in correct:
                correct[name] = _check_equal(target, sd)
    target.clear()
    release_free_memory()
    return {
        k: {
            **summarize(v),
            "resident_after_evict": resident[k],
            "correct": correct[k],
            "disturbed_runs": disturbed[k],
        }
        for k, v in times.items()
    }


# --------------------------------------------------------------------------- the run


def run(sd: dict[str, Any], args: argparse.Namespace, work: Path, mem: TreeMemory) -> dict[str, Any]:
    import async_ckpt as ac

    res: dict[str, Any] = {"setup": {}, "rounds": [], "memory": {}}
    setup = res["setup"]
    trainer = Trainer()
    cpu = TreeCPU(exclude=mem.pid)
    with mem.measure():  # the trainer alone: interpreter + torch + state dict, no checkpointer yet
        time.sleep(0.5)
    with mem.measure() as alone:
        time.sleep(0.3)
    res["memory"]["trainer_alone"] = alone

    def p(name: str) -> str:
        return str(work / name)

    # --- setup. DCP PROCESS first: its first save spawns its helper, and its memory is
    # measured now, before anything of async_ckpt exists (its staging stays allocated).
    dproc: DcpProcess | None = None
    modes: dict[str, Mode] = {}
    if not args.skip_dcp:
        modes.update(dcp_modes(sd))
    if not args.skip_dcp and not args.light:
        setup["process_group_initialised"] = _init_process_group()
        dproc = DcpProcess(sd)
        modes["dcp_process"] = dproc.mode
        setup["dcp_process_stager"] = dproc.description
        with _stderr_to(work / "dcp-process-child.log"):
            setup["dcp_process_first"] = timed_save(dproc.mode, p("dcp-process-first"), cpu=cpu)
        res["memory"]["dcp_process"] = memory_save(dproc.mode, mem, p("dcpp-mem"))
        first = setup["dcp_process_first"]
        _log(f"  DCP PROCESS first save (spawns its helper): durable {first['durable']:.2f}s")

    t = time.perf_counter()
    ck = ac.AsyncCheckpointer(start=True)
    setup["ac_worker_start_s"] = time.perf_counter() - t
    if args.worker_nice is not None and ck.worker_pid is not None:
        _renice_tree(ck.worker_pid, args.worker_nice)
    _log(f"  async_ckpt worker started in {setup['ac_worker_start_s']:.2f}s (pid {ck.worker_pid})")
    modes.update(ac_modes(ac, ck, sd))
    setup["ac_first"] = timed_save(modes["ac"], p("ac-first"), cpu=cpu)
    first = setup["ac_first"]
    _log(f"  async_ckpt first save: stall {first['stall']:.2f}s durable {first['durable']:.2f}s")
    if "dcp_thread" in modes:
        setup["dcp_thread_first"] = timed_save(modes["dcp_thread"], p("dcp-thread-first"), cpu=cpu)

    # --- rounds: every method once per round, back to back; memcpy right before and
    # right after the async_ckpt save it is compared with.
    order = ["ac", "ac_overlap", "ac_blocking", "dcp_save", "dcp_thread", "dcp_process"]
    # The same copy into a destination allocated once, here, and kept across the rounds
    # as our staging buffers are: memory as old as ours (see docs/benchmarks.md).
    held = None if args.light else Memcpy(sd, 1)
    for r in range(args.repeats):
        rd: dict[str, Any] = {"load_before": _machine_load(), "saves": {}, "slowdown": {}}
        rd["write_fsync"] = time_write(sd, p("raw.bin"))
        mcp = Memcpy(sd, args.warmup if r == 0 else 0)
        before = mcp.time()
        held_before = held.time() if held is not None else None
        rd["saves"]["ac"] = timed_save(modes["ac"], p(f"ac-{r}"), cpu=cpu)
        held_after = held.time() if held is not None else None
        after = mcp.time()
        mcp.close()
        rd["memcpy_runs"] = [before, after]
        rd["memcpy"] = {k: (before[k] + after[k]) / 2 for k in ("wall", "cpu")}
        if held_before is not None and held_after is not None:
            rd["memcpy_held"] = {k: (held_before[k] + held_after[k]) / 2 for k in ("wall", "cpu")}
        for key in order:
            if key not in modes or (key == "dcp_process" and r >= args.process_repeats):
                continue
            keep = r == args.repeats - 1 and key in ("ac_blocking", "dcp_save")
            path = p(f"{key}-src" if keep else f"{key}-{r}")
            if keep:  # the last blocking checkpoints are kept for the load phase
                _rm(path)
                _quiesce()
                t0 = time.perf_counter()
                modes[key].issue(path)
                rd["saves"][key] = {"stall": time.perf_counter() - t0, "durable": time.perf_counter() - t0}
                res[f"{key}_dir"] = path
            elif key != "ac":
                rd["saves"][key] = timed_save(modes[key], path, cpu=cpu)
            if key in ASYNC_KEYS and not args.light:
                rd["slowdown"][key] = slowdown_run(modes[key], trainer, p(f"{key}-train-{r}"))
        rd["load_after"] = _machine_load()
        res["rounds"].append(rd)
        s = rd["saves"]
        _log(
            f"  round {r + 1}/{args.repeats}: memcpy {rd['memcpy']['wall']:.2f}s "
            f"write {rd['write_fsync']['wall']:.2f}s "
            + " ".join(f"{k} {v['stall']:.2f}/{v['durable']:.2f}s" for k, v in s.items())
            + f" (load {rd['load_before']['loadavg_1m']:.1f})"
        )
    if args.profile:
        res["profile"] = _profile_save(ck, sd, p("ac-profile"), args.profile)
    if held is not None:
        held.close()
    if args.light:  # a size-sweep point: stall and time to durable are all it is for
        ck.close()
        return res

    # --- memory, each method with nothing of the others alive
    if dproc is not None:
        dproc.close()
    res["memory"]["ac"] = memory_save(modes["ac"], mem, p("ac-mem"))
    setup["ac_pool_allocations"] = ck._pool.allocations
    setup["ac_worker_starts"] = ck.worker_starts
    ck.close()
    release_free_memory()
    _log("  memory: async_ckpt done")

    # more first saves, each by a fresh checkpointer started eagerly (one sample is noisy)
    setup["ac_worker_start_more_s"] = []
    setup["ac_first_more"] = []
    for i in range(args.repeats - 1):
        t = time.perf_counter()
        cki = ac.AsyncCheckpointer(start=True)
        setup["ac_worker_start_more_s"].append(time.perf_counter() - t)
        if args.worker_nice is not None and cki.worker_pid is not None:
            _renice_tree(cki.worker_pid, args.worker_nice)
        mi = ac_modes(ac, cki, sd)["ac"]
        setup["ac_first_more"].append(timed_save(mi, p(f"ac-first-{i}"), cpu=cpu))
        cki.close()
        del cki, mi
        release_free_memory()
    if setup["ac_first_more"]:
        more = ", ".join(f"{x['durable']:.2f}s" for x in setup["ac_first_more"])
        _log(f"  async_ckpt first saves of fresh eager checkpointers: durable {more}")

    # a fresh checkpointer whose worker starts lazily, inside its first save
    path = p("ac-lazy")
    _rm(path)
    _quiesce()
    t0 = time.perf_counter()
    ck2 = ac.AsyncCheckpointer()
    pend = ck2.save(sd, path)
    t1 = time.perf_counter()
    md = pend.result()
    t2 = time.perf_counter()
    ck2.close()
    _rm(path)
    setup["ac_lazy_first"] = {"stall": t1 - t0, "durable": t2 - t0, "stats": _stats_dict(md)}
    del ck2, pend, md
    release_free_memory()
    _log(f"  async_ckpt lazy first save: stall {t1 - t0:.2f}s durable {t2 - t0:.2f}s")

    res["memory"]["ac_blocking"] = memory_save(modes["ac_blocking"], mem, p("acb-mem"))
    if not args.skip_dcp:
        res["memory"]["dcp_save"] = memory_save(modes["dcp_save"], mem, p("dcps-mem"))
        res["memory"]["dcp_thread"] = memory_save(modes["dcp_thread"], mem, p("dcpt-mem"))
        _log("  memory: DCP done")

    if not args.skip_load:
        _log("cold loads")
        res["loads"] = phase_loads(sd, args, res["ac_blocking_dir"], res.get("dcp_save_dir"))
    return res


# --------------------------------------------------------------------------- summary & report


def _mmm(s: dict[str, Any] | None, fmt: str = "{:.2f}") -> str:
    if not s:
        return "-"
    return "/".join(fmt.format(s[k]) for k in ("min", "median", "max"))


def _sum(xs: list[float]) -> dict[str, Any] | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return summarize(xs) if xs else None


def _med(s: dict[str, Any] | None) -> float | None:
    return None if s is None else s["median"]


def summarize_run(res: dict[str, Any]) -> dict[str, Any]:
    rounds = res["rounds"]
    setup = res["setup"]
    sm: dict[str, Any] = {
        "memcpy": _sum([r["memcpy"]["wall"] for r in rounds]),
        "memcpy_cpu": _sum([r["memcpy"]["cpu"] for r in rounds]),
        "write_fsync": _sum([r["write_fsync"]["wall"] for r in rounds]),
        "loadavg_1m": _sum([r["load_before"]["loadavg_1m"] for r in rounds]),
        "saves": {},
        "slowdown": {},
    }
    keys = sorted({k for r in rounds for k in r["saves"]}, key=list(LABELS).index)
    for k in keys:
        runs = [r["saves"][k] for r in rounds if k in r["saves"]]
        cpu = [x["cpu"] for x in runs if "cpu" in x]
        sm["saves"][k] = {
            "n": len(runs),
            "stall": _sum([x["stall"] for x in runs]),
            "durable": _sum([x["durable"] for x in runs]),
            "stall_cpu": _sum([x.get("stall_cpu", math.nan) for x in runs]),
            **{f: _sum([c[f] for c in cpu]) for f in CPU_FIELDS},
        }
    for k in ASYNC_KEYS:
        runs = [r["slowdown"][k] for r in rounds if k in r["slowdown"]]
        if runs:
            sm["slowdown"][k] = {
                "ratio": _sum([x["ratio"] for x in runs]),
                "lost_s": _sum([x["lost_s"] for x in runs]),
                "durable_training": _sum([x["durable"] for x in runs]),
                "baseline_step": _sum([x["baseline_step"] for x in runs]),
                "baseline_drift": _sum([x["baseline_drift"] for x in runs]),
                "steps": [x["steps"] for x in runs],
            }
    eager = [setup["ac_first"], *setup.get("ac_first_more", [])]
    sm["ac_first_eager"] = {
        "durable": _sum([x["durable"] for x in eager]),
        "stall": _sum([x["stall"] for x in eager]),
        "worker_start": _sum([setup["ac_worker_start_s"], *setup.get("ac_worker_start_more_s", [])]),
    }
    # paired, per-round ratios
    pair_stall, pair_durable, pair_stall_cpu = [], [], []
    for r in rounds:
        a = r["saves"].get("ac")
        if a:
            mc, wr = r["memcpy"], r["write_fsync"]
            pair_stall.append(a["stall"] / mc["wall"])
            pair_durable.append(a["durable"] / (mc["wall"] + wr["wall"]))
            if mc["cpu"] > 0:
                pair_stall_cpu.append(a["stall_cpu"] / mc["cpu"])
    pair_held = [r["saves"]["ac"]["stall"] / r["memcpy_held"]["wall"] for r in rounds if "memcpy_held" in r]
    sm["memcpy_held"] = _sum([r["memcpy_held"]["wall"] for r in rounds if "memcpy_held" in r])
    sm["paired"] = {
        "stall_over_memcpy_held": _sum(pair_held),
        "stall_over_memcpy": _sum(pair_stall),
        "durable_over_memcpy_plus_write": _sum(pair_durable),
        "stall_cpu_over_memcpy_cpu": _sum(pair_stall_cpu),
    }
    return sm


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def _f2(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _kilo(x: float | None) -> str:
    return "-" if x is None else f"{x / 1000:.0f}k"


def _get_in(d: dict[str, Any], key: str, field: str) -> Any:
    """``d[key][field]``, or None where a light run did not measure it."""
    return (d.get(key) or {}).get(field)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def report(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    nbytes = res["state_bytes"]
    sm = summarize_run(res)
    setup, memr = res["setup"], res["memory"]
    mc, wr = _med(sm["memcpy"]), _med(sm["write_fsync"])
    ncpu = os.cpu_count() or 1

    lib = res.get("library", {})
    print()
    print(
        f"async_ckpt at {lib.get('commit', '?')[:12]}"
        + (f" with local edits to {', '.join(lib['modified'])}" if lib.get("modified") else "")
    )
    load = sm["loadavg_1m"]
    print(
        f"Machine: {ncpu} CPUs; 1-min load average before each round {_mmm(load, '{:.1f}')} (min/median/max)"
        + (
            "\n  ** SHARED / OVERSUBSCRIBED machine: wall times are inflated and noisy; methods are compared"
            " within rounds;\n     CPU seconds, run-queue wait and page faults are the load-independent"
            " figures **"
            if load and load["median"] > ncpu
            else ""
        )
    )
    print()
    print_table(
        ["step", "wall s min/med/max", "GB/s (median)", "CPU s (median)"],
        [
            ["memcpy", _mmm(sm["memcpy"]), f"{nbytes / mc / 1e9:.2f}", _f2(_med(sm["memcpy_cpu"]))],
            *(
                [["memcpy, destination held all run", _mmm(sm["memcpy_held"]), "-", "-"]]
                if sm.get("memcpy_held")
                else []
            ),
            ["write+fsync", _mmm(sm["write_fsync"]), f"{nbytes / wr / 1e9:.2f}", "-"],
            ["memcpy + write+fsync", f"{mc + wr:.2f}", "-", "-"],
        ],
        title=f"Hardware limits ({fmt_bytes(nbytes)}, {res['n_tensors']} tensors)",
    )

    rows, rrows = [], []
    for k, s in sm["saves"].items():
        slow = sm["slowdown"].get(k)
        blocking = k in ("ac_blocking", "dcp_save")
        label = LABELS[k] + (f" (x{s['n']})" if s["n"] != args.repeats else "")
        rows.append(
            [
                label,
                _mmm(s["stall"]),
                _mmm(s["durable"]),
                _mmm(slow["durable_training"]) if slow else "-",
                "blocked" if blocking else (_mmm(slow["ratio"]) if slow and slow["ratio"] else "-"),
                _mmm(s["durable"])
                if blocking
                else (_mmm(slow["lost_s"]) if slow and slow["lost_s"] else "-"),
            ]
        )
        m = memr.get(k)
        rrows.append(
            [
                label,
                _f2(_med(s["stall_cpu"])),
                _f2(_med(s["total_cpu"])),
                _f2(_med(s["helpers_cpu"])),
                _f2(_med(s["helpers_runq"])),
                f"{_kilo(_med(s['trainer_minflt']))}/{_kilo(_med(s['helpers_minflt']))}",
                fmt_bytes(m["rss_peak"]) if m else "-",
                fmt_bytes(m["pss_peak"]) if m else "-",
                f"{m['pss_peak'] / nbytes:.2f}" if m else "-",
            ]
        )
    print()
    print_table(
        ["method", "stall s", "durable s", "durable while training s", "step slowdown x", "training lost s"],
        rows,
        title=(
            "Saves, wall s min/median/max over rounds (stall = the call blocks; durable = until the result;\n"
            "while training = the slowdown runs; training lost = stall + extra step time during the save)"
        ),
    )
    print()
    print_table(
        [
            "method",
            "stall CPU s",
            "save CPU s",
            "helper CPU s",
            "helper runq s",
            "minflt trainer/helpers",
            "peak RSS sum",
            "peak PSS sum",
            "PSS/state",
        ],
        rrows,
        title=(
            "Resources per save (medians; CPU of trainer + helper processes; runq = time runnable but waiting"
            " for a CPU);\npeak memory of the process tree during one extra save with nothing else alive "
            "(RSS sum counts shared staging twice; PSS is the honest figure)"
        ),
    )

    frows = []

    def first_row(label: str, r: dict[str, Any] | None) -> None:
        if r:
            cpu = r.get("cpu", {})
            st = r.get("stats") or {}
            frows.append(
                [
                    label,
                    f"{r['stall']:.2f}",
                    f"{r['durable']:.2f}",
                    _f2(r.get("stall_cpu")),
                    _f2(cpu.get("total_cpu")),
                    _f2(cpu.get("helpers_runq")),
                    f"{_kilo(cpu.get('trainer_minflt'))}/{_kilo(cpu.get('helpers_minflt'))}" if cpu else "-",
                    _f2(st.get("stage_s")),
                    _f2(st.get("write_s")),
                ]
            )

    first_row("async_ckpt first save, eager start (main)", setup.get("ac_first"))
    for i, r in enumerate(setup.get("ac_first_more", [])):
        first_row(f"async_ckpt first save, eager start (fresh #{i + 2})", r)
    first_row("async_ckpt first save, lazy start (incl. ctor)", setup.get("ac_lazy_first"))
    first_row("DCP async_save THREAD first", setup.get("dcp_thread_first"))
    first_row("DCP async_save PROCESS first (spawns helper)", setup.get("dcp_process_first"))
    print()
    print_table(
        [
            "first save",
            "stall s",
            "durable s",
            "stall CPU",
            "save CPU",
            "helper runq",
            "minflt",
            "stage_s",
            "write_s",
        ],
        frows,
        title="First saves (stage_s / write_s: async_ckpt md.stats)",
    )
    ws = sm["ac_first_eager"]["worker_start"]
    print(f"async_ckpt worker start (AsyncCheckpointer(start=True)) s: {_mmm(ws)}")
    base = [v["baseline_step"]["median"] for v in sm["slowdown"].values() if v.get("baseline_step")]
    if base:
        print(f"training step (1024x1024 fp32 matmul) baseline: {median(base) * 1e3:.1f} ms (median)")
    if "dcp_process" in sm["saves"]:
        print(f"DCP PROCESS mode stager: {setup.get('dcp_process_stager')}")

    stat_rows = []
    for i, r in enumerate(res["rounds"]):
        a = r["saves"].get("ac")
        s = (a or {}).get("stats")
        if s:
            cpu = a.get("cpu", {})
            stat_rows.append(
                [
                    f"steady r{i + 1}",
                    f"{s['stall_s']:.3f}",
                    f"{s['stage_s']:.3f}",
                    f"{s['stall_s'] - s['stage_s']:.3f}",
                    f"{s['plan_s']:.3f}",
                    f"{s['write_s']:.3f}",
                    f"{s['commit_s']:.3f}",
                    str(s["plan_cached"]),
                    _f2(cpu.get("helpers_cpu")),
                    _f2(cpu.get("helpers_runq")),
                    _kilo(cpu.get("helpers_minflt")),
                ]
            )
    print()
    print_table(
        [
            "save",
            "stall_s",
            "stage_s",
            "non-copy",
            "plan_s",
            "write_s",
            "commit_s",
            "cached",
            "helper CPU",
            "runq",
            "minflt",
        ],
        stat_rows,
        title=(
            "async_ckpt steady-state md.stats (non-copy = stall_s - stage_s: the library's own overhead;"
            "\n+ helper processes' CPU s, run-queue wait s, minor faults)"
        ),
    )

    loads = res.get("loads", {})
    if loads:
        print()
        print_table(
            ["load", "min/median/max s", "GB/s (median)", "correct"],
            [[k, _mmm(v), f"{nbytes / v['median'] / 1e9:.2f}", str(v["correct"])] for k, v in loads.items()],
            title="Cold loads (page cache evicted) into a preallocated target",
        )

    acs = sm["saves"]["ac"]
    ac_slow = _med(sm["slowdown"].get("ac", {}).get("ratio"))
    th_slow = _med(sm["slowdown"].get("dcp_thread", {}).get("ratio"))
    pr_slow = _med(sm["slowdown"].get("dcp_process", {}).get("ratio"))
    ratios: dict[str, Any] = {
        "stall_over_memcpy": _med(sm["paired"]["stall_over_memcpy"]),
        "durable_over_memcpy_plus_write": _med(sm["paired"]["durable_over_memcpy_plus_write"]),
        "peak_pss_over_state": _ratio(_get_in(memr, "ac", "pss_peak"), nbytes),
        "first_eager_over_steady": _ratio(_med(sm["ac_first_eager"]["durable"]), _med(acs["durable"])),
        "stall_over_memcpy_held": _med(sm["paired"]["stall_over_memcpy_held"]),
        "stall_over_memcpy_of_medians": _ratio(_med(acs["stall"]), mc),
        "durable_over_memcpy_plus_write_of_medians": _ratio(_med(acs["durable"]), mc + wr),
        "stall_cpu_over_memcpy_cpu": _med(sm["paired"]["stall_cpu_over_memcpy_cpu"]),
        "peak_rss_over_state": _ratio(_get_in(memr, "ac", "rss_peak"), nbytes),
        "peak_pss_above_trainer_alone_over_state": _ratio(
            _diff(_get_in(memr, "ac", "pss_peak"), _get_in(memr, "trainer_alone", "pss_peak")), nbytes
        ),
        "trainer_alone_pss_over_state": _ratio(_get_in(memr, "trainer_alone", "pss_peak"), nbytes),
        "first_eager_main_over_steady": _ratio(setup["ac_first"]["durable"], _med(acs["durable"])),
        "first_eager_stall_over_steady_stall": _ratio(
            _med(sm["ac_first_eager"]["stall"]), _med(acs["stall"])
        ),
        "first_lazy_over_steady": _ratio(_get_in(setup, "ac_lazy_first", "durable"), _med(acs["durable"])),
        "ac_step_slowdown": ac_slow,
        "dcp_thread_step_slowdown": th_slow,
        "dcp_process_step_slowdown": pr_slow,
    }
    if ac_slow is not None and th_slow is not None:
        ratios["slowdown_vs_dcp_thread"] = _ratio(ac_slow - 1, th_slow - 1) if th_slow > 1 else None
    lost = {k: _med(v.get("lost_s")) for k, v in sm["slowdown"].items()}
    if lost.get("ac") is not None and lost.get("dcp_thread"):
        ratios["training_lost_ac_over_dcp_thread"] = _ratio(lost["ac"], lost["dcp_thread"])
    for k in ("dcp_thread", "dcp_process", "ac_blocking", "dcp_save"):
        if k in sm["saves"]:
            ratios[f"{k}_durable_over_ac_durable"] = _ratio(
                _med(sm["saves"][k]["durable"]), _med(acs["durable"])
            )
        if k in ("dcp_thread", "dcp_process") and k in sm["saves"]:
            ratios[f"{k}_save_cpu_over_ac_save_cpu"] = _ratio(
                _med(sm["saves"][k]["total_cpu"]), _med(acs["total_cpu"])
            )
    if loads and "dcp.load cold" in loads:
        ratios["ac_load_over_dcp_load"] = _ratio(
            loads["ac.load cold"]["median"], loads["dcp.load cold"]["median"]
        )

    verdicts: dict[str, Any] = {}
    trows = []
    for key, limit in TARGETS.items():
        v = ratios.get(key)
        met = None if v is None else v <= limit
        verdicts[key] = {"value": v, "target": limit, "met": met}
        trows.append(
            [
                key,
                "-" if v is None else f"{v:.3f}",
                f"<= {limit}",
                {None: "n/a", True: "MET", False: "MISSED"}[met],
            ]
        )
    print()
    print_table(
        ["target ratio", "value", "target", "verdict"],
        trows,
        title=(
            "Targets (stall, durable: median of per-round paired ratios; first save: median durable of "
            f"{len(setup.get('ac_first_more', [])) + 1} eager first saves / steady median)"
        ),
    )
    if ac_slow is not None:
        extra = f", DCP THREAD {th_slow:.3f}x" if th_slow is not None else ""
        extra += f", DCP PROCESS {pr_slow:.3f}x" if pr_slow is not None else ""
        print(
            f"step slowdown during a background save: async_ckpt {ac_slow:.3f}x{extra};\n"
            "slowdown_vs_dcp_thread = (ours - 1) / (DCP THREAD - 1); a value < 0 means no measurable slowdown"
        )
    others = [[k, "-" if v is None else f"{v:.3f}"] for k, v in ratios.items() if k not in TARGETS]
    print()
    print_table(["other ratio", "value"], others)
    if "profile" in res:
        print()
        print("cProfile of one steady-state ck.save (trainer side):")
        print(res["profile"])
    return {"summary": sm, "ratios": ratios, "targets": verdicts}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--gib", type=float, default=2.0, help="total tensor bytes, GiB")
    ap.add_argument("--tensors", type=int, default=2872, help="number of tensors")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every method runs once per round")
    ap.add_argument(
        "--process-repeats",
        type=int,
        default=None,
        help="rounds that include DCP PROCESS mode (default: 2; its saves are the slowest)",
    )
    ap.add_argument("--warmup", type=int, default=1, help="untimed memcpy rounds before the first")
    ap.add_argument("--dir", default=None, help="where to write (a fresh subdirectory is made and removed)")
    ap.add_argument("--json", default=None, help="write every figure here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-dcp", action="store_true", help="skip torch DCP")
    ap.add_argument("--skip-load", action="store_true", help="skip the cold-load comparison")
    ap.add_argument(
        "--light",
        action="store_true",
        help="a size-sweep point: only the rounds' stall and time to durable (no DCP PROCESS, "
        "step slowdown, memory, extra first saves or loads)",
    )
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile one steady-state ck.save; print the top N",
    )
    ap.add_argument(
        "--worker-nice",
        type=int,
        default=None,
        help="re-nice the async_ckpt worker to this value after it starts",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.process_repeats = min(args.repeats, args.process_repeats or 2)

    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed.*")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:  # DCP's shared-memory staging keeps one fd per tensor storage
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(
                resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard)
            )

    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_async-", dir=base))
    t_start = time.perf_counter()
    mem = TreeMemory()
    res: dict[str, Any] = {
        "config": vars(args),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "dir": str(work),
            "load_at_start": _machine_load(),
        },
        "library": _library_revision(),
        "targets": TARGETS,
    }
    try:
        _log(f"making a {args.gib:g} GiB state dict of {args.tensors} tensors")
        sd = make_state_dict(int(args.gib * (1 << 30)), args.tensors, args.seed)
        res["state_bytes"] = state_dict_bytes(sd)
        res["n_tensors"] = sum(1 for _ in iter_tensors(sd))
        release_free_memory()
        res.update(run(sd, args, work, mem))
        res["machine"]["load_at_end"] = _machine_load()
        res["total_s"] = time.perf_counter() - t_start
        res.update(report(res, args))
        print(f"\ntotal benchmark time {res['total_s']:.0f}s")
    finally:
        mem.close()
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
        _log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
