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

The measuring tools are in ``async_measure.py``, the save methods in
``async_modes.py`` and the tables and ratios in ``async_report.py``; this file
runs the phases in order.

``--light`` is a size-sweep point: the rounds only, measuring stall and time to
durable of async_ckpt, blocking ``dcp.save`` and DCP THREAD mode beside memcpy and
write+fsync (no DCP PROCESS, whose helper spawn alone costs ~12 s per size, no
step slowdown, memory, extra first saves or loads).

``--profile N`` also profiles one steady-state ``ck.save`` on the trainer side with
cProfile and prints the top N functions by cumulative time. ``--worker-nice N``
re-nices the async_ckpt worker after it starts (an experiment: by default the library starts it
at nice 15, ``AsyncCheckpointer(worker_nice=15)``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    cold_step,
    iter_tensors,
    log,
    make_state_dict,
    preallocated_like,
    quiesce,
    release_free_memory,
    resident_bytes,
    rm,
    state_dict_bytes,
    summarize,
)
from async_measure import (
    Memcpy,
    Trainer,
    TreeCPU,
    TreeMemory,
    library_revision,
    machine_load,
    memory_save,
    profile_save,
    slowdown_run,
    stats_dict,
    time_write,
    timed_save,
)
from async_modes import (
    ASYNC_KEYS,
    DcpStaged,
    Mode,
    ac_modes,
    dcp_modes,
    init_process_group,
    renice_tree,
    stderr_to,
)
from async_report import TARGETS, report

# The order in which each round runs the methods, back to back.
ROUND_ORDER = ("ac", "ac_overlap", "ac_blocking", "dcp_save", "dcp_thread", "dcp_process")


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
                quiesce()
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


class _Run:
    """One run's shared state: where it writes, what it measures with, and the results."""

    def __init__(self, sd: dict[str, Any], args: argparse.Namespace, work: Path, mem: TreeMemory) -> None:
        self.sd, self.args, self.work, self.mem = sd, args, work, mem
        self.res: dict[str, Any] = {"setup": {}, "rounds": [], "memory": {}}
        self.setup: dict[str, Any] = self.res["setup"]
        self.trainer = Trainer()
        self.cpu = TreeCPU(exclude=mem.pid)
        self.modes: dict[str, Mode] = {}

    def p(self, name: str) -> str:
        return str(self.work / name)

    def start_checkpointer(self, ac: Any) -> tuple[Any, float]:
        """A checkpointer started eagerly (re-niced if asked) and the seconds its start took."""
        t = time.perf_counter()
        ck = ac.AsyncCheckpointer(start=True, worker_idle=not self.args.no_worker_idle)
        started = time.perf_counter() - t
        if self.args.worker_nice is not None and ck.worker_pid is not None:
            renice_tree(ck.worker_pid, self.args.worker_nice)
        return ck, started


def _trainer_alone(mem: TreeMemory) -> dict[str, Any]:
    """The trainer's memory alone: interpreter + torch + state dict, no checkpointer yet."""
    with mem.measure():
        time.sleep(0.5)
    with mem.measure() as alone:
        time.sleep(0.3)
    return alone


def _setup_dcp_process(run: _Run) -> DcpStaged:
    """DCP PROCESS first: its first save spawns its helper, and its memory is measured
    now, before anything of async_ckpt exists (whose staging stays allocated)."""
    setup = run.setup
    setup["process_group_initialised"] = init_process_group()
    dproc = DcpStaged("dcp_process", run.sd, process=True)
    run.modes["dcp_process"] = dproc.mode
    setup["dcp_process_stager"] = dproc.description
    with stderr_to(run.work / "dcp-process-child.log"):
        setup["dcp_process_first"] = timed_save(dproc.mode, run.p("dcp-process-first"), cpu=run.cpu)
    run.res["memory"]["dcp_process"] = memory_save(dproc.mode, run.mem, run.p("dcpp-mem"))
    log(f"  DCP PROCESS first save (spawns its helper): durable {setup['dcp_process_first']['durable']:.2f}s")
    return dproc


def _one_round(run: _Run, r: int, held: Memcpy | None) -> dict[str, Any]:
    """Every method once, back to back; memcpy right before and right after the async_ckpt
    save it is compared with."""
    args, modes = run.args, run.modes
    rd: dict[str, Any] = {"load_before": machine_load(), "saves": {}, "slowdown": {}}
    rd["write_fsync"] = time_write(run.sd, run.p("raw.bin"))
    mcp = Memcpy(run.sd, args.warmup if r == 0 else 0)
    before = mcp.time()
    held_before = held.time() if held is not None else None
    rd["saves"]["ac"] = timed_save(modes["ac"], run.p(f"ac-{r}"), cpu=run.cpu)
    held_after = held.time() if held is not None else None
    after = mcp.time()
    mcp.close()
    rd["memcpy_runs"] = [before, after]
    rd["memcpy"] = {k: (before[k] + after[k]) / 2 for k in ("wall", "cpu")}
    if held_before is not None and held_after is not None:
        rd["memcpy_held"] = {k: (held_before[k] + held_after[k]) / 2 for k in ("wall", "cpu")}
    for key in ROUND_ORDER:
        if key not in modes or (key == "dcp_process" and r >= args.process_repeats):
            continue
        keep = r == args.repeats - 1 and key in ("ac_blocking", "dcp_save")
        path = run.p(f"{key}-src" if keep else f"{key}-{r}")
        if keep:  # the last blocking checkpoints are kept for the load phase
            rm(path)
            quiesce()
            t0 = time.perf_counter()
            modes[key].issue(path)
            rd["saves"][key] = {"stall": time.perf_counter() - t0, "durable": time.perf_counter() - t0}
            run.res[f"{key}_dir"] = path
        elif key != "ac":
            rd["saves"][key] = timed_save(modes[key], path, cpu=run.cpu)
        if key in ASYNC_KEYS and not args.light:
            rd["slowdown"][key] = slowdown_run(modes[key], run.trainer, run.p(f"{key}-train-{r}"))
    rd["load_after"] = machine_load()
    s = rd["saves"]
    log(
        f"  round {r + 1}/{args.repeats}: memcpy {rd['memcpy']['wall']:.2f}s "
        f"write {rd['write_fsync']['wall']:.2f}s "
        + " ".join(f"{k} {v['stall']:.2f}/{v['durable']:.2f}s" for k, v in s.items())
        + f" (load {rd['load_before']['loadavg_1m']:.1f})"
    )
    return rd


def _more_first_saves(run: _Run, ac: Any) -> None:
    """More first saves, each by a fresh checkpointer started eagerly (one sample is noisy),
    then one whose worker starts lazily, inside its first save."""
    setup = run.setup
    setup["ac_worker_start_more_s"] = []
    setup["ac_first_more"] = []
    for i in range(run.args.repeats - 1):
        cki, started = run.start_checkpointer(ac)
        setup["ac_worker_start_more_s"].append(started)
        mi = ac_modes(ac, cki, run.sd)["ac"]
        setup["ac_first_more"].append(timed_save(mi, run.p(f"ac-first-{i}"), cpu=run.cpu))
        cki.close()
        del cki, mi
        release_free_memory()
    if setup["ac_first_more"]:
        more = ", ".join(f"{x['durable']:.2f}s" for x in setup["ac_first_more"])
        log(f"  async_ckpt first saves of fresh eager checkpointers: durable {more}")

    path = run.p("ac-lazy")
    rm(path)
    quiesce()
    t0 = time.perf_counter()
    ck2 = ac.AsyncCheckpointer()
    pend = ck2.save(run.sd, path)
    t1 = time.perf_counter()
    md = pend.result()
    t2 = time.perf_counter()
    ck2.close()
    rm(path)
    setup["ac_lazy_first"] = {"stall": t1 - t0, "durable": t2 - t0, "stats": stats_dict(md)}
    del ck2, pend, md
    release_free_memory()
    log(f"  async_ckpt lazy first save: stall {t1 - t0:.2f}s durable {t2 - t0:.2f}s")


def run(sd: dict[str, Any], args: argparse.Namespace, work: Path, mem: TreeMemory) -> dict[str, Any]:
    import async_ckpt as ac

    bench = _Run(sd, args, work, mem)
    res, setup, modes = bench.res, bench.setup, bench.modes
    res["memory"]["trainer_alone"] = _trainer_alone(mem)

    dproc: DcpStaged | None = None
    if not args.skip_dcp:
        modes.update(dcp_modes(sd))
        if not args.light:
            dproc = _setup_dcp_process(bench)

    ck, setup["ac_worker_start_s"] = bench.start_checkpointer(ac)
    log(f"  async_ckpt worker started in {setup['ac_worker_start_s']:.2f}s (pid {ck.worker_pid})")
    modes.update(ac_modes(ac, ck, sd))
    setup["ac_first"] = first = timed_save(modes["ac"], bench.p("ac-first"), cpu=bench.cpu)
    log(f"  async_ckpt first save: stall {first['stall']:.2f}s durable {first['durable']:.2f}s")
    if "dcp_thread" in modes:
        setup["dcp_thread_first"] = timed_save(
            modes["dcp_thread"], bench.p("dcp-thread-first"), cpu=bench.cpu
        )

    # The same copy into a destination allocated once, here, and kept across the rounds
    # as our staging buffers are: memory as old as ours (see docs/benchmarks.md).
    held = None if args.light else Memcpy(sd, 1)
    for r in range(args.repeats):
        res["rounds"].append(_one_round(bench, r, held))
    if args.profile:
        res["profile"] = profile_save(ck, sd, bench.p("ac-profile"), args.profile)
    if held is not None:
        held.close()
    if args.light:  # a size-sweep point: stall and time to durable are all it is for
        ck.close()
        return res

    # --- memory, each method with nothing of the others alive
    if dproc is not None:
        dproc.close()
    res["memory"]["ac"] = memory_save(modes["ac"], mem, bench.p("ac-mem"))
    setup["ac_pool_allocations"] = ck.staging_allocations
    setup["ac_worker_starts"] = ck.worker_starts
    ck.close()
    release_free_memory()
    log("  memory: async_ckpt done")

    _more_first_saves(bench, ac)

    res["memory"]["ac_blocking"] = memory_save(modes["ac_blocking"], mem, bench.p("acb-mem"))
    if not args.skip_dcp:
        res["memory"]["dcp_save"] = memory_save(modes["dcp_save"], mem, bench.p("dcps-mem"))
        res["memory"]["dcp_thread"] = memory_save(modes["dcp_thread"], mem, bench.p("dcpt-mem"))
        log("  memory: DCP done")

    if not args.skip_load:
        log("cold loads")
        res["loads"] = phase_loads(sd, args, res["ac_blocking_dir"], res.get("dcp_save_dir"))
    return res


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
    ap.add_argument(
        "--no-worker-idle",
        action="store_true",
        help="AsyncCheckpointer(worker_idle=False): the worker at its nice only, not SCHED_IDLE + idle I/O",
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
            "load_at_start": machine_load(),
        },
        "library": library_revision(),
        "targets": TARGETS,
    }
    try:
        log(f"making a {args.gib:g} GiB state dict of {args.tensors} tensors")
        sd = make_state_dict(int(args.gib * (1 << 30)), args.tensors, args.seed)
        res["state_bytes"] = state_dict_bytes(sd)
        res["n_tensors"] = sum(1 for _ in iter_tensors(sd))
        release_free_memory()
        res.update(run(sd, args, work, mem))
        res["machine"]["load_at_end"] = machine_load()
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
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
