"""GPU mode: checkpointing a state dict that lives on a CUDA device.

Side by side on the same synthetic model + Adam state dict, moved to the GPU,
min / median / max over ``--repeats`` rounds:

- D2H limit: ``copy_(non_blocking=True)`` of every tensor into preallocated,
  already touched *pinned* host tensors, then one synchronize: the least any
  checkpointer can block a GPU training loop;
- async_ckpt ``AsyncCheckpointer.save`` (staging buffers pinned, D2H on a side
  stream): stall (until the call returns: the copy is done) and time to durable;
- async_ckpt ``save(overlap=True)``: the call returns at once; *staged* is when
  ``pending.staged`` fires (the copy is done), durable as above;
- async_ckpt ``AsyncCheckpointer(staging_budget=--budget-mib)``: the state is
  staged round by round through one pinned buffer of the budget; the call
  returns when the last round is copied; the buffer's bytes are reported;
- DCP ``async_save`` in THREAD mode with a ``DefaultStager`` staging into pinned
  memory with non-blocking copies (``use_async_staging=True``, where the torch
  version has it): stall (until the call returns), staged
  (``staging_completion``), durable (``upload_completion``);
- overlap: a GPU "training step" (4096x4096 matmul, synchronized) timed alone
  and while an overlap-mode save stages and writes; the slowdown is the median
  step time during the save over the median alone.

Without CUDA it prints that and writes ``{"skipped": ...}`` to ``--json``, so
``run.py`` can always call it.

    python benchmarks/bench_gpu.py --gib 2.0 --tensors 2872 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
    fmt_bytes,
    iter_tensors,
    log,
    make_state_dict,
    map_tensors,
    median,
    print_table,
    release_free_memory,
    rm,
    state_dict_bytes,
    summarize,
)
from async_modes import DcpStaged, Mode, ac_modes

__all__ = ["main"]


class D2HLimit:
    """Non-blocking copies of every tensor into pinned, preallocated, touched host tensors."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.src = tensors
        self.dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for d in self.dst:
            d.zero_()
        self.time()  # first use of the pinned pages is not timed

    def time(self) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, s in zip(self.dst, self.src, strict=True):
            d.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0


class GpuStep:
    """A stand-in GPU training step: one matmul, synchronized so its wall time is its cost."""

    def __init__(self, n: int = 4096) -> None:
        g = torch.Generator(device="cuda").manual_seed(1)
        self.a = torch.randn(n, n, device="cuda", generator=g)
        self.b = torch.randn(n, n, device="cuda", generator=g)
        self.c = torch.empty(n, n, device="cuda")
        for _ in range(5):
            self.step()

    def step(self) -> float:
        t = time.perf_counter()
        torch.mm(self.a, self.b, out=self.c)
        torch.cuda.synchronize()
        return time.perf_counter() - t


def _timed(path: str, mode: Mode) -> dict[str, float]:
    """One save into a fresh ``path`` (removed afterwards): returned, staged, durable."""
    rm(path)
    os.sync()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    h = mode.issue(path)
    t_ret = time.perf_counter()
    mode.staged(h)
    t_staged = time.perf_counter()
    mode.wait(h)
    t_end = time.perf_counter()
    del h
    rm(path)
    return {"stall": t_ret - t0, "staged": t_staged - t0, "durable": t_end - t0}


def _overlap_steps(step: GpuStep, mode: Mode, path: str) -> dict[str, Any]:
    """GPU steps alone (before and after) and while an overlap-mode save is in flight."""
    rm(path)
    base = [step.step() for _ in range(20)]
    h = mode.issue(path)
    during = []
    while not mode.done(h):
        during.append(step.step())
    mode.wait(h)
    base += [step.step() for _ in range(20)]
    rm(path)
    return {
        "baseline": median(base),
        "during": median(during) if during else None,
        "steps_during": len(during),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import async_ckpt as ac

    log(f"making a {args.gib:g} GiB state dict of {args.tensors} tensors on {torch.cuda.get_device_name()}")
    sd = map_tensors(make_state_dict(int(args.gib * (1 << 30)), args.tensors, args.seed), lambda t: t.cuda())
    nbytes = state_dict_bytes(sd)
    tensors = list(iter_tensors(sd))
    release_free_memory()
    limit = D2HLimit(tensors)
    step = GpuStep()
    ck = ac.AsyncCheckpointer(start=True)  # pins its staging buffers when CUDA is available
    budget = int(args.budget_mib * (1 << 20))
    ck_budget = ac.AsyncCheckpointer(start=True, staging_budget=budget)
    # The same methods bench_async.py times, here on CUDA tensors; DCP stages into pinned memory.
    modes = ac_modes(ac, ck, sd)
    modes["ac_budget"] = dataclasses.replace(ac_modes(ac, ck_budget, sd)["ac"], name="ac_budget")
    dcp = DcpStaged("dcp_pinned", sd, process=False)
    modes["dcp_pinned"] = dcp.mode

    def path(name: str) -> str:
        return str(work / name)

    dcp_error: list[str] = []

    def timed(k: str, name: str) -> dict[str, float] | None:
        """One save; DCP's failures are reported and end its rounds, never the benchmark."""
        if k == "dcp_pinned" and dcp_error:
            return None
        try:
            return _timed(path(name), modes[k])
        except Exception as exc:
            if k != "dcp_pinned":
                raise
            dcp_error.append(f"{type(exc).__name__}: {exc}")
            log(f"DCP pinned save failed, left out from here on: {dcp_error[0]}")
            return None

    first = {k: timed(k, f"{k}-first") for k in ("ac", "dcp_pinned")}
    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        rd: dict[str, Any] = {"d2h": limit.time()}
        for k in ("ac", "ac_overlap", "ac_budget", "dcp_pinned"):
            rd[k] = timed(k, f"{k}-{r}")
        rd["d2h_after"] = limit.time()
        rd["overlap_step"] = _overlap_steps(step, modes["ac_overlap"], path(f"acs-{r}"))
        rounds.append(rd)
        log(
            f"round {r + 1}/{args.repeats}: d2h {rd['d2h']:.3f}s ours {rd['ac']['stall']:.3f}/"
            f"{rd['ac']['durable']:.3f}s overlap staged {rd['ac_overlap']['staged']:.3f}s "
            f"budget {rd['ac_budget']['stall']:.3f}/{rd['ac_budget']['durable']:.3f}s "
            + (
                f"DCP pinned {rd['dcp_pinned']['stall']:.3f}/{rd['dcp_pinned']['staged']:.3f}/"
                f"{rd['dcp_pinned']['durable']:.3f}s"
                if rd["dcp_pinned"]
                else "DCP pinned failed"
            )
        )
    pinned = {
        "ac": ck.staging_bytes,
        "ac_budget": ck_budget.staging_bytes,
        "all_pinned": all(sl.pinned for c in (ck, ck_budget) for sl in c._pool.slots()),
    }
    ck.close()
    ck_budget.close()
    dcp.close()
    d2h = [(x["d2h"] + x["d2h_after"]) / 2 for x in rounds]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "state_bytes": nbytes,
        "n_tensors": len(tensors),
        "dcp_stager": dcp.description,
        "dcp_error": dcp_error[0] if dcp_error else None,
        "budget_bytes": budget,
        "staging_bytes": pinned,
        "first": first,
        "rounds": rounds,
        "d2h": summarize(d2h),
    }
    for key in ("ac", "ac_overlap", "ac_budget", "dcp_pinned"):
        done = [x[key] for x in rounds if x[key] is not None]
        out[key] = (
            {f: summarize([d[f] for d in done]) for f in ("stall", "staged", "durable")} if done else None
        )
    slow = [
        x["overlap_step"]["during"] / x["overlap_step"]["baseline"]
        for x in rounds
        if x["overlap_step"]["during"] is not None
    ]
    out["overlap_step_slowdown"] = summarize(slow) if slow else None

    def paired(k: str, f: str) -> float | None:
        done = [x for x in rounds if x[k] is not None]
        return median([x[k][f] / ((x["d2h"] + x["d2h_after"]) / 2) for x in done]) if done else None

    with_dcp = [x for x in rounds if x["dcp_pinned"] is not None]

    out["ratios"] = {
        "stall_over_d2h": paired("ac", "stall"),
        "overlap_staged_over_d2h": paired("ac_overlap", "staged"),
        "budget_stall_over_d2h": paired("ac_budget", "stall"),
        "budget_durable_over_ours": median([x["ac_budget"]["durable"] / x["ac"]["durable"] for x in rounds]),
        "dcp_pinned_stall_over_d2h": paired("dcp_pinned", "stall"),
        "dcp_pinned_staged_over_d2h": paired("dcp_pinned", "staged"),
        "dcp_pinned_durable_over_ours": median(
            [x["dcp_pinned"]["durable"] / x["ac"]["durable"] for x in with_dcp]
        )
        if with_dcp
        else None,
    }
    return out


def report(res: dict[str, Any]) -> None:
    rows = [["D2H limit (pinned copy_)", "-", f"{res['d2h']['median']:.3f}", "-"]]
    names = {
        "ac": "async_ckpt save",
        "ac_overlap": "async_ckpt save(overlap=True)",
        "ac_budget": f"async_ckpt save, staging_budget {fmt_bytes(res['budget_bytes'])}",
        "dcp_pinned": f"DCP async_save THREAD, {res['dcp_stager']}",
    }
    for k, label in names.items():
        if res[k] is None:
            rows.append([label, "failed", "-", "-"])
            continue
        rows.append(
            [
                label,
                f"{res[k]['stall']['median']:.3f}",
                f"{res[k]['staged']['median']:.3f}",
                f"{res[k]['durable']['median']:.3f}",
            ]
        )
    title = f"GPU mode on {res['device']}: {fmt_bytes(res['state_bytes'])}, {res['n_tensors']} tensors"
    print_table(["method", "stall s", "staged s", "durable s"], rows, title=title + " (medians)")
    sb = res["staging_bytes"]
    print(
        f"  staging held: {fmt_bytes(sb['ac'])} unbudgeted, {fmt_bytes(sb['ac_budget'])} budgeted; "
        f"all pinned: {sb['all_pinned']}"
    )
    if res["dcp_error"]:
        print(f"  DCP failed: {res['dcp_error']}")
    for k, v in res["ratios"].items():
        print(f"  {k:<32} {'-' if v is None else f'{v:.3f}'}")
    if res["overlap_step_slowdown"]:
        print(
            f"  GPU step during an overlap-mode save / alone: {res['overlap_step_slowdown']['median']:.3f}x"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--gib", type=float, default=2.0, help="total tensor bytes, GiB")
    ap.add_argument("--tensors", type=int, default=2872, help="number of tensors")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-mib", type=float, default=512.0, help="staging_budget of the budgeted mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default=None, help="where to write (a fresh subdirectory is made and removed)")
    ap.add_argument("--json", default=None, help="write every figure here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        res: dict[str, Any] = {"skipped": "CUDA is not available on this machine"}
        print("GPU mode skipped: CUDA is not available on this machine")
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="bench_gpu-", dir=base))
        try:
            res = {"config": vars(args), **run(args, work)}
            report(res)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(Exception):
                import torch.distributed as dist

                if dist.is_initialized():
                    dist.destroy_process_group()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
