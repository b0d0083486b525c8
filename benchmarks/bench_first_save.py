"""Where a first save's stall goes (issue 14 item 4): each part of it, beside a steady save's.

Each sample is a fresh Python process (``--child``), as in ``bench_worker.py``'s
"first" kind: ``AsyncCheckpointer()``, then the state dict built (the worker
starts meanwhile), then a blocking ``save`` without ``start()`` and ``--steady``
saves after it. The library's steps are timed by wrapping them in the child
(wrapping adds microseconds); a part's time is wall time on the trainer's thread,
so the parts of a save add up to its stall but for what ``other`` holds
(the request, the staged signal):

- worker: waiting for the background start to finish (``_ensure_worker``);
- flatten: the state dict into leaves; prepare: the local plan and the layout
  (``LayoutCache.prepare``; a steady save reuses the cached ones);
- acquire: a staging slot (a first save: creating its shared memory, and backing
  it where the pool backs it there; ``back`` is that part of it);
- register: the slot's file descriptors to the worker; layout: the plan and tree
  sent once (``RegisterLayout``, pickled on this thread);
- copy: the tensors into the slot (``StagingSlot.copy_in``).

    python benchmarks/bench_first_save.py --gib 2 --repeats 5
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # async_ckpt, uninstalled
sys.path.insert(0, str(HERE))
from _common import log, make_state_dict, median, print_table, rm  # noqa: E402

PARTS = ("worker", "flatten", "prepare", "acquire", "back", "register", "layout", "copy")


def _wrap(owner: Any, name: str, part: str, acc: dict[str, float]) -> None:
    """Add ``owner.name``'s wall time to ``acc[part]`` on every call (absent in this revision: skipped)."""
    fn: Callable[..., Any] | None = owner.__dict__.get(name)
    if fn is None:
        return
    if isinstance(fn, staticmethod):
        fn = fn.__func__

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[part] = acc.get(part, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)


def _child(args: argparse.Namespace) -> dict[str, Any]:
    import async_ckpt as ac
    from async_ckpt import checkpointer, layout_cache, staging
    from async_ckpt.worker import client

    acc: dict[str, float] = {}
    _wrap(checkpointer.AsyncCheckpointer, "_ensure_worker", "worker", acc)
    _wrap(checkpointer, "flatten", "flatten", acc)
    _wrap(layout_cache.LayoutCache, "prepare", "prepare", acc)
    _wrap(staging.StagingPool, "acquire", "acquire", acc)
    _wrap(staging, "_back_all", "back", acc)
    _wrap(client.WorkerClient, "register", "register", acc)
    _wrap(client.WorkerClient, "register_layout", "layout", acc)
    _wrap(staging.StagingSlot, "copy_in", "copy", acc)

    work = Path(args.work)
    ck = ac.AsyncCheckpointer()
    sd = make_state_dict(int(args.gib * (1 << 30)), args.tensors)
    saves = []
    for i in range(1 + args.steady):
        path = work / f"s{i}"
        rm(path)
        acc.clear()
        t0 = time.perf_counter()
        pending = ck.save(sd, str(path))
        stall = time.perf_counter() - t0
        pending.result()
        saves.append({"stall": stall, **{p: acc.get(p, 0.0) for p in PARTS}})
        rm(path)
    ck.close()
    return {"first": saves[0], "steady": saves[1:]}


def _sample(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--work", str(work)]
    cmd += ["--gib", str(args.gib), "--tensors", str(args.tensors), "--steady", str(args.steady)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sample failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(samples: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def part(save: dict[str, Any], p: str) -> float:
        return float(save[p]) if p != "other" else save["stall"] - sum(save[q] for q in PARTS if q != "back")

    out: dict[str, Any] = {"first": {}, "steady": {}}
    for p in ("stall", *PARTS, "other"):
        out["first"][p] = median([part(s["first"], p) for s in samples])
        out["steady"][p] = median([median([part(x, p) for x in s["steady"]]) for s in samples])
    out["first_over_steady"] = median(
        [s["first"]["stall"] / median([x["stall"] for x in s["steady"]]) for s in samples]
    )
    rows = [[p, f"{out['first'][p]:.3f}", f"{out['steady'][p]:.3f}"] for p in ("stall", *PARTS, "other")]
    rows.append(["first / steady stall", f"{out['first_over_steady']:.2f}", ""])
    print_table(
        ["part (s; back is inside acquire)", "first save", "steady save"],
        rows,
        title=f"first save's stall, {args.gib:g} GiB, {args.tensors} tensors, median of {len(samples)} runs",
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0, help="state dict size in GiB (default 2)")
    p.add_argument("--tensors", type=int, default=1000, help="tensors in the state dict (default 1000)")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes (default 5)")
    p.add_argument("--steady", type=int, default=3, help="saves after the first (default 3)")
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: $TMPDIR)")
    p.add_argument("--out", help="write samples and medians as JSON here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)), flush=True)
        return 0
    samples = []
    with tempfile.TemporaryDirectory(prefix="bench-first-", dir=args.dir) as tmp:
        for r in range(args.repeats):
            log(f"run {r + 1}/{args.repeats}", "first")
            samples.append(_sample(args, Path(tmp)))
    out = report(samples, args)
    if args.out:
        Path(args.out).write_text(json.dumps({"samples": samples, "summary": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
