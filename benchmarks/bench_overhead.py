"""Save overhead in a training run (issue 14 item 3): what one checkpoint costs the training loop.

overhead = wall time of K training steps that include one save
           - wall time of the same K steps without it

The synthetic training step (``--threads`` intra-op threads, default 1, so the
other core is left to the saver, as a GPU leaves the CPU to it):

- "forward/backward": 1024x1024 float32 matmuls, as many as take
  ``--compute-ratio`` x one memcpy of the state (calibrated once);
- "optimizer step": a real ``torch.optim.Optimizer`` whose ``step()`` changes
  every tensor of the state dict in place (``mul_``), as Adam does.

The save is issued after step ``--save-at``'s optimizer step. Modes, each on
the same ``_common.make_state_dict`` state (model + Adam):

- ``ac_blocking``: ``AsyncCheckpointer.save`` (the call returns once staged);
- ``ac_overlap``: ``save(overlap=True, guard=[optimizer])``: staging runs on a
  helper thread during the next forward/backward, and the next optimizer step
  waits for it (the guard); also the call's return time (target <= 10 ms);
- ``dcp_thread``: ``torch.distributed.checkpoint.async_save`` (thread mode);
- ``dcp_process``: the same in process mode (``--dcp-process``; it needs a
  process group: a 1-rank gloo group is created, which async_ckpt then uses too).

Every save run sits between two runs of the same K steps without a save,
whose mean is its baseline (load drift cancels); each round runs every mode
once, and ratios to memcpy (``copy_`` of every tensor into preallocated,
touched tensors, measured at each round's start and end) are taken per round
before the median. A run also says whether the save became durable within its
K steps (if not, some of its background cost falls outside the window: raise
``--steps``). Between runs the save's directory is removed and the disk synced.

    python benchmarks/bench_overhead.py --gib 2 --out overhead.json
    python benchmarks/bench_overhead.py --gib 0.25 --rounds 1    # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # async_ckpt, uninstalled
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (
    fmt_bytes,
    iter_tensors,
    log,
    make_state_dict,
    median,
    preallocated_like,
    print_table,
    quiesce,
    rm,
    state_dict_bytes,
)

CALL_TARGET_S = 0.010
OVERHEAD_TARGET = 0.5
"""ac_overlap's overhead / memcpy (issue 14 item 3)."""


class InPlaceStep(torch.optim.Optimizer):
    """A stand-in optimizer: ``step()`` changes every tensor of the state in place, as Adam's does."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__(tensors, {"scale": 1.0 - 2.0**-20})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for t in group["params"]:
                t.mul_(group["scale"])


@dataclass
class Mode:
    name: str
    save: Callable[[str], Any]
    """Issue the save; returns a handle."""
    done: Callable[[Any], bool]
    wait: Callable[[Any], None]


def memcpy_s(sd: dict[str, Any], dst: dict[str, Any]) -> float:
    srcs, dsts = list(iter_tensors(sd)), list(iter_tensors(dst))
    t0 = time.perf_counter()
    for d, s in zip(dsts, srcs, strict=True):
        d.copy_(s)
    return time.perf_counter() - t0


def calibrate_matmuls(target_s: float) -> tuple[int, float]:
    a, b = torch.randn(_SIDE, _SIDE), torch.randn(_SIDE, _SIDE)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    one = median(times)
    return max(1, round(target_s / one)), one


# Each product of the chain is scaled by 1/sqrt(n): a 1024x1024 matmul of unit-variance
# values multiplies their spread by 32. Scaling by 1/1024, as before, shrank them 32x a
# matmul: after ~24 they were denormal and each matmul took 1.1-1.4 s instead of 7 ms,
# so a step's time depended on whether calibration gave it more than ~24 matmuls.
_SIDE = 1024
_SCALE = _SIDE**-0.5


class Trainer:
    def __init__(self, sd: dict[str, Any], n_matmuls: int) -> None:
        self.opt = InPlaceStep(list(iter_tensors(sd)))
        self.n = n_matmuls
        self.a, self.b = torch.randn(_SIDE, _SIDE), torch.randn(_SIDE, _SIDE)

    def compute(self) -> torch.Tensor:
        """One step's forward and backward: a chain of ``n`` matmuls, values kept near unit scale."""
        c = self.a
        for _ in range(self.n):
            c = c @ self.b
            c.mul_(_SCALE)
        return c

    def steps(self, k: int, save_at: int = -1, mode: Mode | None = None, path: str = "") -> StepsRun:
        """Run ``k`` steps; with a ``mode``, issue its save to ``path`` after step ``save_at``."""
        run = StepsRun(0.0)
        t0 = time.perf_counter()
        for i in range(k):
            self.compute()
            self.opt.step()
            if mode is not None and i == save_at:
                t_call = time.perf_counter()
                run.handle = mode.save(path)
                run.call_s = time.perf_counter() - t_call
            elif mode is not None and run.handle is not None and run.durable_after is None:
                if mode.done(run.handle):
                    run.durable_after = i
        run.seconds = time.perf_counter() - t0
        return run


@dataclass
class StepsRun:
    seconds: float
    handle: Any = None
    call_s: float = 0.0
    durable_after: int | None = None
    """The first step after which the save was seen durable."""


def init_one_rank_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=600), wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def make_modes(
    sd: dict[str, Any], opt: torch.optim.Optimizer, names: list[str], worker_idle: bool = True
) -> tuple[dict[str, Mode], Any]:
    import async_ckpt as ac

    ck = ac.AsyncCheckpointer(start=True, worker_idle=worker_idle)
    ck.start(sd)
    modes: dict[str, Mode] = {}

    def ac_mode(name: str, overlap: bool) -> Mode:
        def save(path: str) -> Any:
            return ck.save(sd, path, overlap=overlap, guard=[opt])

        return Mode(name, save, lambda p: p.done(), lambda p: p.result(600))

    if "ac_blocking" in names:
        modes["ac_blocking"] = ac_mode("ac_blocking", False)
    if "ac_overlap" in names:
        modes["ac_overlap"] = ac_mode("ac_overlap", True)
    if any(n.startswith("dcp") for n in names):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        def upload(h: Any) -> Any:
            return h if hasattr(h, "result") else h.upload_completion

        for name, kind in (
            ("dcp_thread", AsyncCheckpointerType.THREAD),
            ("dcp_process", AsyncCheckpointerType.PROCESS),
        ):
            if name in names:
                modes[name] = Mode(
                    name,
                    lambda path, kind=kind: dcp.async_save(
                        sd, checkpoint_id=path, async_checkpointer_type=kind
                    ),
                    lambda h: upload(h).done(),
                    lambda h: upload(h).result(),
                )
    return modes, ck


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    total = int(args.gib * (1 << 30))
    log(f"building a {fmt_bytes(total)} state dict of {args.tensors} tensors", "overhead")
    sd = make_state_dict(total, args.tensors)
    dst = preallocated_like(sd)
    memcpy_s(sd, dst)  # touch the destination
    mc0 = median([memcpy_s(sd, dst) for _ in range(3)])
    n_mm, one_mm = calibrate_matmuls(args.compute_ratio * mc0)
    trainer = Trainer(sd, n_mm)
    names = [m for m in args.modes.split(",") if m]
    if "dcp_process" in names and not args.dcp_process:
        names.remove("dcp_process")
    if args.dcp_process and "dcp_process" not in names:
        names.append("dcp_process")
    if "dcp_process" in names:
        init_one_rank_group()
    modes, ck = make_modes(sd, trainer.opt, names, worker_idle=not args.no_worker_idle)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "config": {
            "bytes": state_dict_bytes(sd),
            "tensors": args.tensors,
            "steps": args.steps,
            "save_at": args.save_at,
            "rounds": args.rounds,
            "threads": args.threads,
            "compute_ratio": args.compute_ratio,
            "matmuls_per_step": n_mm,
            "matmul_s": one_mm,
            "modes": list(modes),
        },
        "rounds": [],
    }
    try:
        for name, mode in modes.items():  # warm-up: first saves start helpers, allocate, plan
            log(f"warm-up save: {name}", "overhead")
            path = str(work / f"warm-{name}")
            mode.wait(mode.save(path))
            rm(path)
        quiesce()
        for r in range(args.rounds):
            rnd: dict[str, Any] = {"memcpy_s": [memcpy_s(sd, dst)], "modes": {}}
            base = trainer.steps(args.steps).seconds
            for name, mode in modes.items():
                path = str(work / f"r{r}-{name}")
                run = trainer.steps(args.steps, args.save_at, mode, path)
                durable_in_window = run.durable_after is not None or mode.done(run.handle)
                mode.wait(run.handle)
                quiesce()
                after = trainer.steps(args.steps).seconds
                baseline = (base + after) / 2
                rnd["modes"][name] = {
                    "steps_s": run.seconds,
                    "baseline_s": baseline,
                    "overhead_s": run.seconds - baseline,
                    "call_s": run.call_s,
                    "durable_in_window": durable_in_window,
                    "durable_after_step": run.durable_after,
                }
                log(
                    f"round {r} {name}: overhead {run.seconds - baseline:.3f}s, "
                    f"call {run.call_s * 1e3:.1f} ms, "
                    f"durable in window: {durable_in_window}",
                    "overhead",
                )
                rm(path)
                quiesce()
                base = after
            rnd["memcpy_s"].append(memcpy_s(sd, dst))
            res["rounds"].append(rnd)
    finally:
        ck.close()
        for name in modes:
            rm(str(work / f"warm-{name}"))
        if not args.work:
            rm(str(work))
    res["summary"] = summarize(res)
    return res


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    rounds = res["rounds"]
    mc = [sum(r["memcpy_s"]) / len(r["memcpy_s"]) for r in rounds]
    out: dict[str, Any] = {"memcpy_s": median(mc), "modes": {}}
    for name in res["config"]["modes"]:
        runs = [(r["modes"][name], m) for r, m in zip(rounds, mc, strict=True) if name in r["modes"]]
        out["modes"][name] = {
            "overhead_s": median([x["overhead_s"] for x, _ in runs]),
            "overhead_over_memcpy": median([x["overhead_s"] / m for x, m in runs]),
            "call_s": median([x["call_s"] for x, _ in runs]),
            "call_over_memcpy": median([x["call_s"] / m for x, m in runs]),
            "baseline_s": median([x["baseline_s"] for x, _ in runs]),
            "durable_in_window": all(x["durable_in_window"] for x, _ in runs),
        }
    ov = out["modes"].get("ac_overlap")
    if ov is not None:
        out["targets"] = {
            "ac_overlap call <= 10 ms": ov["call_s"] <= CALL_TARGET_S,
            f"ac_overlap overhead <= {OVERHEAD_TARGET} x memcpy": ov["overhead_over_memcpy"]
            <= OVERHEAD_TARGET,
        }
    return out


def report(res: dict[str, Any]) -> None:
    s, c = res["summary"], res["config"]
    rows = [
        [
            name,
            f"{m['overhead_s']:.3f}",
            f"{m['overhead_over_memcpy']:.2f}",
            f"{m['call_s'] * 1e3:.1f}",
            f"{m['call_over_memcpy']:.2f}",
            f"{m['baseline_s']:.2f}",
            "yes" if m["durable_in_window"] else "NO",
        ]
        for name, m in s["modes"].items()
    ]
    print_table(
        [
            "mode",
            "overhead s",
            "/ memcpy",
            "call ms",
            "call / memcpy",
            f"{c['steps']} steps s",
            "durable in window",
        ],
        rows,
        title=(
            f"save overhead, {fmt_bytes(c['bytes'])} in {c['tensors']} tensors, {c['rounds']} round(s), "
            f"{c['matmuls_per_step']} matmuls per step; memcpy {s['memcpy_s']:.3f}s (medians)"
        ),
    )
    for name, met in s.get("targets", {}).items():
        print(f"target {name}: {'met' if met else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=2.0, help="state dict size in GiB (default 2)")
    p.add_argument("--tensors", type=int, default=1000, help="tensors in the state dict (default 1000)")
    p.add_argument("--steps", type=int, default=8, help="K: training steps per timed run (default 8)")
    p.add_argument("--save-at", type=int, default=1, help="the save follows this step's optimizer step")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every mode (default 3)")
    p.add_argument("--compute-ratio", type=float, default=1.5, help="forward/backward time / memcpy (1.5)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the trainer (default 1)")
    p.add_argument("--modes", default="ac_blocking,ac_overlap,dcp_thread", help="comma-separated modes")
    p.add_argument("--dcp-process", action="store_true", help="also DCP's process mode (1-rank gloo group)")
    p.add_argument("--work", help="directory for the checkpoints (default: a temporary one)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--no-worker-idle", action="store_true", help="AsyncCheckpointer(worker_idle=False)")
    args = p.parse_args(argv)
    if not 0 <= args.save_at < args.steps - 1:
        p.error("--save-at must leave at least one step after the save")
    res = run(args)
    report(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        log(f"wrote {args.out}", "overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
