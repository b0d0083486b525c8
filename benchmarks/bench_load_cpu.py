"""Where a cold load's time and CPU go: ``ac.load`` against a plain read of the same files.

Each round, in an order that turns from round to round, each step from a cold page
cache (``_common.cache_then_evict``):

- read:      the checkpoint's own files read with 64 MiB ``readinto`` calls into one
             preallocated buffer (same bytes, same file layout: the load's limit);
- load:      ``async_ckpt.load(target, dir)`` into a preallocated, touched target;
- load nv:   the same with ``verify=False`` (what checksum verification costs).

A cold step during which the VM reported free memory to its host is redone
(``_common.cold_step``): the host's re-faults of that memory land in whichever
step reads next, as system time, and would swamp the differences measured here.

Reported per step: the median wall time, process CPU (user and system, all threads),
minor page faults, and the median over rounds of each round's load / read ratio.
On a busy machine wall time moves with the neighbours; CPU seconds move far less,
so they show what a change saves. ``--dir /dev/shm`` measures from memory (no
eviction): the load's CPU with no disk at all. ``--profile`` prints a cProfile of
one more cold load.

    python benchmarks/bench_load_cpu.py --gib 1 --rounds 5 [--dir /dev/shm] [--json out.json]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cache_then_evict, cold_step, make_state_dict, median, preallocated_like

_READ = 64 << 20


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _plain_read(files: list[Path], buf: memoryview) -> None:
    pos = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf[pos : pos + _READ]):
                pos += n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--tensors", type=int, default=2872)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the checkpoint goes (default: the temp dir)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import async_ckpt as ac

    sd = make_state_dict(int(args.gib * (1 << 30)), args.tensors)
    target = preallocated_like(sd)
    work = tempfile.mkdtemp(prefix="bench_load_cpu-", dir=args.dir)
    try:
        ckpt = os.path.join(work, "ckpt")
        ac.save(sd, ckpt)
        files = sorted(p for p in Path(ckpt).iterdir() if p.is_file())
        nbytes = sum(p.stat().st_size for p in files)
        buf = memoryview(torch.empty(nbytes, dtype=torch.uint8).zero_().numpy()).cast("B")
        cold = not str(Path(ckpt).resolve()).startswith("/dev/shm")
        steps: dict[str, Callable[[], Any]] = {
            "read": lambda: _plain_read(files, buf),
            "load": lambda: ac.load(target, ckpt),
            "load nv": lambda: ac.load(target, ckpt, verify=False),
        }
        rows: dict[str, list[tuple[float, float, float, int]]] = {k: [] for k in steps}
        names = list(steps)
        for rnd in range(args.rounds + 1):  # round 0 warms up, untimed
            # The order turns each round, so no step always follows the same neighbour.
            for name in names[rnd % 3 :] + names[: rnd % 3]:
                got: list[tuple[float, float, float, int]] = []

                def run(fn: Callable[[], Any] = steps[name], got: list[Any] = got) -> float:
                    got.clear()  # a redone run replaces the disturbed one
                    u0, s0, f0 = _usage()
                    t0 = time.perf_counter()
                    fn()
                    wall = time.perf_counter() - t0
                    u1, s1, f1 = _usage()
                    got.append((wall, u1 - u0, s1 - s0, f1 - f0))
                    return wall

                if cold:
                    # Redone when the VM handed freed memory back to its host meanwhile:
                    # re-faulting it costs the read (as system time) whoever reads.
                    cold_step(ckpt, run)
                else:
                    run()
                if rnd:
                    rows[name].append(got[0])
        if not all(torch.equal(a, b) for a, b in zip(_tensors(target), _tensors(sd), strict=True)):
            raise SystemExit("the load returned the wrong bytes")
        report = _report(rows, nbytes, cold)
        if args.profile:
            if cold:
                cache_then_evict(ckpt)
            prof = cProfile.Profile()
            prof.runcall(ac.load, target, ckpt)
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _tensors(node: Any) -> list[torch.Tensor]:
    if isinstance(node, torch.Tensor):
        return [node]
    if isinstance(node, dict):
        return [t for v in node.values() for t in _tensors(v)]
    if isinstance(node, list | tuple):
        return [t for v in node for t in _tensors(v)]
    return []


def _report(
    rows: dict[str, list[tuple[float, float, float, int]]], nbytes: int, cold: bool
) -> dict[str, Any]:
    where = "cold (evicted)" if cold else "from memory"
    print(f"{nbytes / (1 << 30):.2f} GiB, {where}, {len(rows['read'])} rounds")
    print(
        f"{'step':8s} {'wall s':>8s} {'user s':>8s} {'sys s':>8s} {'cpu s':>8s} {'minflt':>8s} {'/read':>6s}"
    )
    out: dict[str, Any] = {"bytes": nbytes, "cold": cold, "steps": {}}
    for name, rs in rows.items():
        ratio = median([r[0] / b[0] for r, b in zip(rs, rows["read"], strict=True)])
        fig = {
            "wall": median([r[0] for r in rs]),
            "user": median([r[1] for r in rs]),
            "sys": median([r[2] for r in rs]),
            "cpu": median([r[1] + r[2] for r in rs]),
            "minflt": median([r[3] for r in rs]),
            "over_read": ratio,
            "walls": [r[0] for r in rs],
        }
        out["steps"][name] = fig
        print(
            f"{name:8s} {fig['wall']:8.3f} {fig['user']:8.3f} {fig['sys']:8.3f} {fig['cpu']:8.3f} "
            f"{fig['minflt']:8.0f} {ratio:6.2f}"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
