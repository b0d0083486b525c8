"""Loading a torch.distributed.checkpoint (DCP) checkpoint: ``ac.load`` against ``dcp.load``, cold.

One ``dcp.save`` checkpoint of the synthetic model + Adam state dict
(``_common.make_state_dict``, single process), then over ``--repeats`` rounds,
each step once per round in alternating order (so drift in machine load hits
both alike and every round gives a paired ratio):

- dcp.load cold:            ``dcp.load(target, checkpoint_id=dir)`` into a preallocated target;
- ac.load cold:             ``ac.load(target, dir)`` into the same target (DCP has no
                            checksums, so there is nothing to verify);
- ac.load_state_dict cold:  ``ac.load_state_dict(dir)``, no target (it allocates what it
                            returns, so it pays first-touch page faults the others do not).

Every step starts cold: the checkpoint is read into the page cache, then evicted
(``_common.cold_step``, as ``bench_single.py`` does). Target: ac.load / dcp.load <= 1.0.

    python benchmarks/bench_dcp_load.py --gib 1.0 --tensors 2872 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    PeakRSS,
    cold_step,
    fmt_bytes,
    iter_tensors,
    log,
    make_state_dict,
    median,
    preallocated_like,
    print_table,
    release_free_memory,
    state_dict_bytes,
    summarize,
)

TARGET = 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--gib", type=float, default=1.0, help="total tensor bytes, GiB")
    ap.add_argument("--tensors", type=int, default=2872, help="number of tensors")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every step runs once per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--dir", default=None, help="where to write (a fresh subdirectory is made and removed)")
    ap.add_argument("--json", default=None, help="write all figures here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-dcp-load-", dir=args.dir)
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: str) -> int:
    import torch.distributed.checkpoint as dcp

    import async_ckpt as ac

    sd = make_state_dict(int(args.gib * (1 << 30)), args.tensors, seed=args.seed)
    nbytes = state_dict_bytes(sd)
    tensors = list(iter_tensors(sd))
    ckpt = os.path.join(work, "dcp")
    log(f"dcp.save of {len(tensors)} tensors, {fmt_bytes(nbytes)} to {ckpt}")
    dcp.save(sd, checkpoint_id=ckpt)
    target = preallocated_like(sd)
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    kept: list[Any] = []

    def step(name: str, rnd: int, fn: Any) -> None:
        def run() -> float:
            release_free_memory()
            with PeakRSS() as rss:
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                used = time.process_time() - c0
            kept.clear()
            if rnd >= 0:
                times.setdefault(name, []).append(dt)
                cpu.setdefault(name, []).append(used)
                peaks[name] = max(peaks.get(name, 0), rss.delta)
            log(f"{'warm-up' if rnd < 0 else f'round {rnd}'}: {name:<24} {dt:7.3f}s  (cpu {used:.3f}s)")
            return dt

        def discard() -> None:
            if rnd >= 0:
                times[name].pop()
                cpu[name].pop()

        cold_step(ckpt, run, discard=discard)

    steps = {
        "dcp.load cold": lambda: dcp.load(target, checkpoint_id=ckpt),
        "ac.load cold": lambda: ac.load(target, ckpt),
        "ac.load_state_dict cold": lambda: kept.append(ac.load_state_dict(ckpt)),
    }
    for rnd in range(-args.warmup, args.repeats):
        order = list(steps) if rnd % 2 == 0 else list(reversed(steps))
        for name in order:
            step(name, rnd, steps[name])
            if rnd == -args.warmup and name == "ac.load cold":
                got = list(iter_tensors(target))
                if not all(torch.equal(a, b) for a, b in zip(got, tensors, strict=True)):
                    raise SystemExit("ac.load of the DCP checkpoint returned different tensors")
    results = {}
    for name, xs in times.items():
        res = summarize(xs)
        res.update(gb_per_s=nbytes / res["median"] / 1e9, cpu_s=cpu[name], cpu_median=median(cpu[name]))
        res["peak_rss_delta"] = peaks[name]
        results[name] = res
    paired = [a / d for a, d in zip(times["ac.load cold"], times["dcp.load cold"], strict=True)]
    tree = [a / d for a, d in zip(times["ac.load_state_dict cold"], times["dcp.load cold"], strict=True)]
    ratios = {
        "ac_load_over_dcp_load": {
            "of_medians": results["ac.load cold"]["median"] / results["dcp.load cold"]["median"],
            "paired_median": median(paired),
            "paired": paired,
            "target": TARGET,
        },
        "load_state_dict_over_dcp_load": {"paired_median": median(tree), "paired": tree},
    }
    print_table(
        ["step", "median s", "min s", "max s", "GB/s", "cpu s"],
        [
            [
                n,
                f"{r['median']:.3f}",
                f"{r['min']:.3f}",
                f"{r['max']:.3f}",
                f"{r['gb_per_s']:.2f}",
                f"{r['cpu_median']:.2f}",
            ]
            for n, r in results.items()
        ],
        title=f"loading one DCP checkpoint, {fmt_bytes(nbytes)}, {len(tensors)} tensors, cold",
    )
    r = ratios["ac_load_over_dcp_load"]
    print(
        f"ac.load / dcp.load: {r['of_medians']:.3f} (medians), {r['paired_median']:.3f} (paired), "
        f"target <= {TARGET}"
    )
    if args.json:
        out = {
            "config": vars(args),
            "nbytes": nbytes,
            "tensors": len(tensors),
            "results": results,
            "ratios": ratios,
            "loadavg": list(os.getloadavg()),
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
