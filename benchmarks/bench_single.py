"""Single-process save/load throughput of async_ckpt against the hardware and torch.save.

One run measures, side by side on the same synthetic model + Adam state dict
(``_common.make_state_dict``), over ``--repeats`` rounds (min / median / max):

- memcpy:       ``copy_`` of every tensor into preallocated, already-touched tensors;
- write+fsync:  the same bytes written to one file with large ``writev`` calls (no
                extra copy), then fsync: the hardware limit for save;
- read warm / read cold: that file read back with 64 MiB ``readinto`` calls into
                preallocated memory, from the page cache / after evicting it: the
                cold read is the hardware limit for load;
- ac.save:      ``async_ckpt.save(sd, dir)`` into a fresh directory each round;
- ac.load cold: ``async_ckpt.load(target, dir)`` after evicting the checkpoint, into
                a preallocated target of the same structure (and again with
                ``verify=False``, to show what checksum verification costs);
- torch.save+fsync / torch.load cold (``weights_only=True``; it allocates the
                tensors it returns, so it pays first-touch page faults the others
                do not).

Steps run round-robin (one of each per round, after ``--warmup`` untimed rounds),
so drift in machine load hits all of them alike and every round gives a paired
ratio. Before each write the disk is quiesced (``os.sync``), so no step pays for
an earlier one's writeback. Cold steps first read the file into the page cache,
then evict it with fsync + POSIX_FADV_DONTNEED (+ drop_caches as root), and
mincore confirms that it left: every cold step, baseline and ours, starts from
the same state (``_common.cache_then_evict`` says why that matters on a VM).
Besides wall time, each step's process CPU time (all threads) is reported: it is
far less sensitive than wall time to other tenants of a small machine.

Targets: ac.save / write+fsync <= 1.3 and ac.load cold / read cold <= 1.3.
Memory: about 5x ``--gib`` (state dict, memcpy and read buffers, load target,
torch.load result), plus the page cache.

    python benchmarks/bench_single.py --gib 2.0 --tensors 2872 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    IO_BYTES,
    PeakRSS,
    cache_then_evict,
    cold_step,
    fmt_bytes,
    iter_tensors,
    log,
    make_state_dict,
    median,
    preallocated_like,
    print_table,
    quiesce,
    raw_write,
    release_free_memory,
    reported_kib,
    resident_bytes,
    rm,
    state_dict_bytes,
    summarize,
    tensor_views,
    write_batches,
)

SAVE_TARGET = LOAD_TARGET = 1.3


def raw_read(path: str, buf: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        pos = 0
        while pos < len(buf):
            n = f.readinto(buf[pos : pos + IO_BYTES])
            if not n:
                raise RuntimeError(f"{path}: short read at {pos} of {len(buf)}")
            pos += n


def disk_usage(path: str) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a file or directory tree."""
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    apparent = allocated = 0
    for f in files:
        st = f.stat()
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return apparent, allocated


class Bench:
    """Timings by step name, with the peak RSS growth (process tree) seen while each ran."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.times: dict[str, list[float]] = {}
        self.peaks: dict[str, int] = {}
        self.cpu: dict[str, list[float]] = {}
        self.load_start = os.getloadavg()
        self.extra: dict[str, dict[str, Any]] = {}

    def time(self, name: str, rnd: int, fn: Callable[[], Any]) -> float:
        """Run ``fn`` once, timed; rounds below 0 are warm-up and not recorded."""
        release_free_memory()
        with PeakRSS() as rss:
            c0 = time.process_time()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0
        if rnd >= 0:
            self.times.setdefault(name, []).append(dt)
            self.cpu.setdefault(name, []).append(cpu)
            self.peaks[name] = max(self.peaks.get(name, 0), rss.delta)
        log(f"{'warm-up' if rnd < 0 else f'round {rnd}'}: {name:<26} {dt:7.3f}s  (cpu {cpu:.3f}s)")
        return dt

    def cold(self, name: str, rnd: int, path: str, fn: Callable[[], Any], resident: list[int | None]) -> None:
        """``time`` after evicting ``path``; runs that free page reporting disturbed are redone."""

        def run() -> float:
            resident.append(resident_bytes(path))
            return self.time(name, rnd, fn)

        def discard() -> None:
            log(f"  {name}: the VM reported free memory to its host during the run; again")
            if rnd >= 0:
                self.times[name].pop()
                self.cpu[name].pop()

        _, disturbed = cold_step(path, run, discard=discard)
        if rnd >= 0:
            extra = self.extra.setdefault(name, {})
            extra["disturbed_runs"] = extra.get("disturbed_runs", 0) + disturbed

    @property
    def results(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, xs in self.times.items():
            res = summarize(xs)
            res["gb_per_s"] = self.nbytes / res["median"] / 1e9
            res["peak_rss_delta"] = self.peaks[name]
            res["cpu_s"] = self.cpu[name]
            res["cpu_median"] = median(self.cpu[name])
            res.update(self.extra.get(name, {}))
            out[name] = res
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--gib", type=float, default=2.0, help="total tensor bytes, GiB")
    ap.add_argument("--tensors", type=int, default=2872, help="number of tensors")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every step runs once per round")
    ap.add_argument("--dir", default=None, help="where to write (a fresh subdirectory is made and removed)")
    ap.add_argument("--json", default=None, help="write all figures here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--skip-torch", action="store_true", help="leave out torch.save / torch.load")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: with OpenMP threads, every parallel copy_ waits "
        "for a thread the OS descheduled, and on a busy 2-core machine the memcpy baseline "
        "swings 0.04-4 s per 200 MiB; 0 keeps torch's default)",
    )
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)

    t_import = time.perf_counter()
    import async_ckpt as ac

    import_s = time.perf_counter() - t_import

    parent = args.dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="bench_single-", dir=parent)
    try:
        return _run(args, ac, import_s, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, ac: Any, import_s: float, work: str) -> int:
    target_bytes = int(args.gib * (1 << 30))
    log(f"building state dict: {args.tensors} tensors, {fmt_bytes(target_bytes)}")
    t0 = time.perf_counter()
    sd = make_state_dict(target_bytes, args.tensors, seed=args.seed)
    build_s = time.perf_counter() - t0
    tensors = list(iter_tensors(sd))
    nbytes = state_dict_bytes(sd)
    by_dtype: dict[str, int] = {}
    for t in tensors:
        by_dtype[str(t.dtype)] = by_dtype.get(str(t.dtype), 0) + t.numel() * t.element_size()
    log(f"built in {build_s:.1f}s: {len(tensors)} tensors, {nbytes} bytes; work dir {work}")
    if 4 * nbytes > psutil.virtual_memory().available:
        log(
            f"WARNING: the run needs about {fmt_bytes(4 * nbytes)} more memory; "
            f"{fmt_bytes(psutil.virtual_memory().available)} is available"
        )

    # Everything the timed steps write into is allocated (and touched) up front and kept
    # for the whole run, so no step pays first-touch page faults another does not.
    log("preallocating destinations")
    dst = [torch.empty_like(t).zero_() for t in tensors]  # memcpy
    batches = write_batches(tensor_views(tensors))  # raw write: no copies, large writev calls
    buf = memoryview(torch.empty(nbytes, dtype=torch.uint8).zero_().numpy()).cast("B")  # raw read
    target = preallocated_like(sd)  # ac.load

    raw = os.path.join(work, "raw.bin")
    bench = Bench(nbytes)
    sizes: dict[str, dict[str, int]] = {}
    eviction: dict[str, Any] = {
        "raw_resident_when_warm": [],
        "raw_resident_after_evict": [],
        "ckpt_resident_after_evict": [],
        "torch_resident_after_evict": [],
    }

    def memcpy() -> None:
        for d, s in zip(dst, tensors, strict=True):
            d.copy_(s)

    def torch_save(path: str) -> None:
        torch.save(sd, path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    loaded: list[Any] = []

    def torch_load(path: str) -> None:
        loaded.append(torch.load(path, weights_only=True))  # kept until the step's end

    write_phases: list[dict[str, float]] = []
    for rnd in range(-args.warmup, args.repeats):
        # Steps run round-robin, so drift in machine load hits every step alike, and
        # each round gives a paired ratio. Before each write the disk is quiesced.
        # Warm-up rounds (rnd < 0) run everything once untimed: the first use of
        # fresh memory in a VM (page cache included) can cost host-side faults.
        first = rnd == -args.warmup
        bench.time("memcpy", rnd, memcpy)
        if first and not all(torch.equal(d, s) for d, s in zip(dst, tensors, strict=True)):
            raise SystemExit("memcpy baseline copied the wrong bytes")

        quiesce()
        bench.time("write+fsync", rnd, partial(raw_write, raw, batches, write_phases if rnd >= 0 else None))
        sizes["write+fsync"] = _usage(raw)
        for _ in range(3):  # all of it in the page cache (another process may drop caches)
            raw_read(raw, buf)
            resident = resident_bytes(raw)
            if resident is None or resident >= nbytes - (1 << 20):
                break
        eviction["raw_resident_when_warm"].append(resident)
        bench.time("read warm", rnd, lambda: raw_read(raw, buf))
        if first and bytes(buf[: 1 << 20]) != b"".join(batches[0])[: 1 << 20]:
            raise SystemExit("raw read baseline read back the wrong bytes")
        bench.cold("read cold", rnd, raw, lambda: raw_read(raw, buf), eviction["raw_resident_after_evict"])
        rm(raw)

        ckpt = os.path.join(work, f"ac-{rnd}")
        quiesce()
        bench.time("ac.save", rnd, partial(ac.save, sd, ckpt))
        sizes["ac.save"] = _usage(ckpt)
        after_evict = eviction["ckpt_resident_after_evict"]
        bench.cold("ac.load cold", rnd, ckpt, partial(ac.load, target, ckpt), after_evict)
        if first:
            _check_loaded(target, sd, tensors)
        no_verify = partial(ac.load, target, ckpt, verify=False)
        bench.cold("ac.load cold verify=False", rnd, ckpt, no_verify, after_evict)
        rm(ckpt)

        if args.skip_torch:
            continue
        pt = os.path.join(work, f"torch-{rnd}.pt")
        quiesce()
        bench.time("torch.save+fsync", rnd, partial(torch_save, pt))
        sizes["torch.save+fsync"] = _usage(pt)
        # torch.load outlasts the 2 s before the next report: one run, disturbed or not.
        cache_then_evict(pt)
        eviction["torch_resident_after_evict"].append(resident_bytes(pt))
        bench.time("torch.load cold", rnd, partial(torch_load, pt))
        loaded.clear()
        rm(pt)

    bench.extra["write+fsync"] = {
        "phases": write_phases,
        "write_median": median([p["write_s"] for p in write_phases]),
        "fsync_median": median([p["fsync_s"] for p in write_phases]),
    }
    _report(args, bench, sizes, eviction, nbytes, len(tensors), by_dtype, build_s, import_s, work)
    return 0


def _usage(path: str) -> dict[str, int]:
    apparent, allocated = disk_usage(path)
    return {"apparent": apparent, "allocated": allocated}


def _check_loaded(target: Any, sd: dict[str, Any], tensors: list[torch.Tensor]) -> None:
    got = list(iter_tensors(target))
    if len(got) != len(tensors) or not all(torch.equal(a, b) for a, b in zip(got, tensors, strict=True)):
        raise SystemExit("ac.load returned different tensors than were saved")
    if target["step"] != sd["step"] or target["optim"]["param_groups"] != sd["optim"]["param_groups"]:
        raise SystemExit("ac.load returned different non-tensor values than were saved")


def _report(
    args: argparse.Namespace,
    bench: Bench,
    sizes: dict[str, dict[str, int]],
    eviction: dict[str, Any],
    nbytes: int,
    ntensors: int,
    by_dtype: dict[str, int],
    build_s: float,
    import_s: float,
    work: str,
) -> None:
    r = bench.results
    print()
    print(
        f"state dict: {ntensors} tensors, {fmt_bytes(nbytes)} ({nbytes} bytes): "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(by_dtype.items()))
        + f"; built in {build_s:.1f}s; `import async_ckpt` {import_s:.2f}s"
    )
    load_end = os.getloadavg()
    print(
        f"dir: {work} ({_fs_of(work)}); {os.cpu_count()} cpus; torch {torch.__version__}; "
        f"rounds {args.repeats} (+{args.warmup} warm-up); torch threads {torch.get_num_threads()}; "
        f"load average {bench.load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
    )
    if max(bench.load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1):
        print("NOTE: other processes were busy on this machine; expect noisy figures (compare min columns)")
    print()
    rows = []
    for name, res in r.items():
        size = sizes.get(name)
        rows.append(
            [
                name,
                f"{res['min']:.3f}",
                f"{res['median']:.3f}",
                f"{res['max']:.3f}",
                f"{res['gb_per_s']:.2f}",
                f"{res['cpu_median']:.3f}",
                fmt_bytes(size["apparent"]) if size else "",
                fmt_bytes(res["peak_rss_delta"]),
            ]
        )
    print_table(
        ["step", "min s", "median s", "max s", "GB/s (med)", "cpu s (med)", "on disk", "peak RSS +"], rows
    )
    print(
        "cpu s: user+system time of this process (all threads) during the step; "
        "peak RSS +: growth of the process tree's RSS over the step's start"
    )

    def ratio(num: str, den: str) -> dict[str, Any]:
        """Median over median, and the median of the per-round (paired) ratios."""
        paired = [x / y for x, y in zip(bench.times[num], bench.times[den], strict=True)]
        return {
            "of_medians": r[num]["median"] / r[den]["median"],
            "paired": paired,
            "paired_median": median(paired),
            "of_mins": r[num]["min"] / r[den]["min"],
        }

    ratios = {
        "save_over_write_fsync": ratio("ac.save", "write+fsync"),
        "load_over_cold_read": ratio("ac.load cold", "read cold"),
        "load_noverify_over_cold_read": ratio("ac.load cold verify=False", "read cold"),
        "save_over_memcpy": ratio("ac.save", "memcpy"),
        "cold_read_over_warm_read": ratio("read cold", "read warm"),
    }
    if "torch.load cold" in r:
        ratios["torch_save_over_write_fsync"] = ratio("torch.save+fsync", "write+fsync")
        ratios["torch_load_over_cold_read"] = ratio("torch.load cold", "read cold")
    save_ratio = ratios["save_over_write_fsync"]["of_medians"]
    load_ratio = ratios["load_over_cold_read"]["of_medians"]
    print()
    print("ratio (median/median; paired per-round median; min/min)")
    for label, key, goal in (
        ("ac.save / write+fsync", "save_over_write_fsync", SAVE_TARGET),
        ("ac.load cold / read cold", "load_over_cold_read", LOAD_TARGET),
        ("ac.load verify=False / read cold", "load_noverify_over_cold_read", None),
        ("torch.save+fsync / write+fsync", "torch_save_over_write_fsync", None),
        ("torch.load cold / read cold", "torch_load_over_cold_read", None),
        ("ac.save / memcpy", "save_over_memcpy", None),
        ("read cold / read warm", "cold_read_over_warm_read", None),
    ):
        if key not in ratios:
            continue
        x = ratios[key]
        verdict = ""
        if goal is not None:
            verdict = f"   target <= {goal}: {'OK' if x['of_medians'] <= goal else 'MISSED'}"
        print(f"  {label:<34} {x['of_medians']:6.2f} {x['paired_median']:6.2f} {x['of_mins']:6.2f}{verdict}")
    ph = r["write+fsync"]
    print(f"write+fsync split (medians): write {ph['write_median']:.3f}s, fsync {ph['fsync_median']:.3f}s")
    cold_vs_warm = ratios["cold_read_over_warm_read"]["of_medians"]
    after = [
        x
        for k in ("raw_resident_after_evict", "ckpt_resident_after_evict", "torch_resident_after_evict")
        for x in eviction[k]
    ]
    worst = max((x for x in after if x is not None), default=None)
    warm = min((x for x in eviction["raw_resident_when_warm"] if x is not None), default=None)
    print(
        f"eviction: cold read is {cold_vs_warm:.1f}x the warm read; raw file resident "
        f"{fmt_bytes(warm)} (at least) when warm, at most {fmt_bytes(worst)} of any file right "
        "after eviction (mincore)"
    )
    if cold_vs_warm < 1.5 or (worst is not None and worst > nbytes // 100):
        print("WARNING: eviction looks ineffective; 'cold' figures may be warm ones")
    redone = {k: v["disturbed_runs"] for k, v in r.items() if v.get("disturbed_runs")}
    if reported_kib() is not None:
        print(
            "free page reporting (VM): cold runs redone because the VM handed free memory to its "
            f"host during them: {redone or 'none'}"
        )

    if args.json:
        out = {
            "config": {
                "gib": args.gib,
                "tensors": args.tensors,
                "repeats": args.repeats,
                "warmup": args.warmup,
                "seed": args.seed,
                "torch_threads": torch.get_num_threads(),
                "dir": work,
                "filesystem": _fs_of(work),
            },
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "mem_total": _mem_total(),
                "loadavg_start": bench.load_start,
                "loadavg_end": load_end,
            },
            "state_dict": {
                "tensors": ntensors,
                "bytes": nbytes,
                "bytes_by_dtype": by_dtype,
                "build_s": build_s,
            },
            "import_async_ckpt_s": import_s,
            "results": r,
            "bytes_on_disk": sizes,
            "ratios": ratios,
            "targets": {"save_over_write_fsync": SAVE_TARGET, "load_over_cold_read": LOAD_TARGET},
            "met": {"save": save_ratio <= SAVE_TARGET, "load": load_ratio <= LOAD_TARGET},
            "eviction": eviction,
        }
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


def _fs_of(path: str) -> str:
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1] if len(parts) >= 3 else ""
                inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if mnt and inside and len(mnt) >= len(best):
                    best, fstype = parts[1], f"{parts[2]} on {parts[0]}"
    except OSError:
        pass
    return fstype


def _mem_total() -> int | None:
    try:
        return int(psutil.virtual_memory().total)
    except (ImportError, OSError, psutil.Error):
        return None


if __name__ == "__main__":
    sys.exit(main())
