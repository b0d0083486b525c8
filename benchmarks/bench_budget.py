"""Saves under a staging budget beside unbudgeted ones (issue 14 item 2), in one run.

For each mode (``unbudgeted``: ``AsyncCheckpointer()``; ``budgeted``:
``AsyncCheckpointer(staging_budget=B)``), on the same ``_common.make_state_dict``
state, after one warm-up save (which allocates the staging buffers and plans):

- stall: the blocking ``save`` call, until staged (budgeted: until the last round is copied);
- durable: from the call until the checkpoint is committed;
- peak PSS: of the process tree (the trainer and its worker), sampled by
  ``async_measure.TreeMemory`` from before the call until committed;
- staging bytes the pool holds.

Against the hardware, measured in the same run: memcpy (``copy_`` of every
tensor into preallocated, touched tensors) and write+fsync (the state's bytes
written to one file with ``writev`` and fsynced). The issue's targets (checked
on the budgeted mode's medians):

- peak PSS <= state + budget + 400 MiB;
- durable <= 1.3 x (memcpy + write+fsync);
- stall: reported beside the unbudgeted stall.

    python benchmarks/bench_budget.py --gib 0.5 --budget-mib 128
    python benchmarks/bench_budget.py --gib 2 --budget-mib 512 --out budget.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # async_ckpt, uninstalled
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    fmt_bytes,
    log,
    make_state_dict,
    median,
    print_table,
    quiesce,
    release_free_memory,
    rm,
    state_dict_bytes,
)
from async_measure import Memcpy, TreeMemory, time_write

import async_ckpt as ac

MiB = 1 << 20
_OVERHEAD_ALLOWED = 400 * MiB
_DURABLE_RATIO = 1.3


def run_mode(
    sd: dict[str, Any], root: Path, budget: int | None, rounds: int, nice: int, mem: TreeMemory
) -> list[dict[str, float]]:
    out = []
    with ac.AsyncCheckpointer(staging_budget=budget, start=True, worker_nice=nice) as ck:
        rm(root / "warm")
        ck.save(sd, root / "warm").result()  # allocates the buffers, plans; not timed
        rm(root / "warm")
        for i in range(rounds):
            path = root / f"c{i}"
            rm(path)
            quiesce()
            release_free_memory()
            with mem.measure(interval=0.02) as peak:
                t0 = time.perf_counter()
                pending = ck.save(sd, path)
                t1 = time.perf_counter()
                pending.result()
                t2 = time.perf_counter()
            out.append(
                {
                    "stall": t1 - t0,
                    "durable": t2 - t0,
                    "peak_pss": peak["pss_peak"],
                    "staging": ck.staging_bytes,
                }
            )
            rm(path)
    release_free_memory()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=0.5, help="state dict size (GiB)")
    p.add_argument("--budget-mib", type=int, default=128, help="staging budget (MiB)")
    p.add_argument("--tensors", type=int, default=400, help="tensors in the state dict")
    p.add_argument("--rounds", type=int, default=3, help="timed saves per mode (after a warm-up)")
    p.add_argument(
        "--worker-nice",
        type=int,
        default=15,
        help="the workers' worker_nice (library default 15; 0 where other processes hog the cores)",
    )
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()

    budget = args.budget_mib * MiB
    sd = make_state_dict(int(args.gib * (1 << 30)), args.tensors)
    state = state_dict_bytes(sd)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_budget-"))
    root.mkdir(parents=True, exist_ok=True)
    log(f"state {fmt_bytes(state)} in {args.tensors} tensors, budget {fmt_bytes(budget)}, under {root}")

    copier = Memcpy(sd, warmup=1)
    memcpy = [copier.time()["wall"] for _ in range(args.rounds)]
    copier.close()
    write = [time_write(sd, str(root / "raw.bin"))["wall"] for _ in range(args.rounds)]
    log(f"memcpy {median(memcpy):.3f}s, write+fsync {median(write):.3f}s")
    results: dict[str, list[dict[str, float]]] = {}
    mem = TreeMemory()
    try:
        for name, b in (("unbudgeted", None), ("budgeted", budget)):
            log(f"{name} saves")
            results[name] = run_mode(sd, root, b, args.rounds, args.worker_nice, mem)
    finally:
        mem.close()

    base = median(memcpy) + median(write)
    med = {
        name: {k: median([r[k] for r in rs]) for k in ("stall", "durable", "peak_pss", "staging")}
        for name, rs in results.items()
    }
    rows = []
    for name, m in med.items():
        rows.append(
            [
                name,
                f"{m['stall']:.3f}",
                f"{m['stall'] / median(memcpy):.2f}",
                f"{m['durable']:.3f}",
                f"{m['durable'] / base:.2f}",
                fmt_bytes(m["peak_pss"]),
                fmt_bytes(m["peak_pss"] - state),
                fmt_bytes(m["staging"]),
            ]
        )
    print_table(
        [
            "mode",
            "stall s",
            "stall/memcpy",
            "durable s",
            "durable/(memcpy+write)",
            "peak PSS",
            "PSS-state",
            "staging",
        ],
        rows,
        title=(
            f"state {fmt_bytes(state)}, budget {fmt_bytes(budget)}, worker_nice {args.worker_nice}; "
            f"medians of {args.rounds}; "
            f"memcpy {median(memcpy):.3f}s, write+fsync {median(write):.3f}s"
        ),
    )
    b = med["budgeted"]
    pss_limit = state + budget + _OVERHEAD_ALLOWED
    checks = {
        "peak_pss": (b["peak_pss"] <= pss_limit, f"{fmt_bytes(b['peak_pss'])} <= {fmt_bytes(pss_limit)}"),
        "durable": (
            b["durable"] <= _DURABLE_RATIO * base,
            f"{b['durable'] / base:.2f} x (memcpy + write+fsync) <= {_DURABLE_RATIO}",
        ),
        "staging_within_budget": (
            b["staging"] <= budget,
            f"{fmt_bytes(b['staging'])} <= {fmt_bytes(budget)}",
        ),
    }
    print()
    for name, (ok, text) in checks.items():
        print(f"target {name}: {'met' if ok else 'MISSED'} ({text})")
    print(
        f"stall: budgeted {b['stall']:.3f}s = {b['stall'] / med['unbudgeted']['stall']:.2f} x "
        f"unbudgeted {med['unbudgeted']['stall']:.3f}s"
    )
    if args.out:
        payload = {
            "state_bytes": state,
            "budget_bytes": budget,
            "worker_nice": args.worker_nice,
            "loadavg_1m": os.getloadavg()[0],
            "memcpy_s": memcpy,
            "write_fsync_s": write,
            "runs": results,
            "medians": med,
            "targets": {k: {"met": ok, "detail": text} for k, (ok, text) in checks.items()},
        }
        Path(args.out).write_text(json.dumps(payload, indent=2))
    if not args.dir:
        rm(root)


if __name__ == "__main__":
    main()
