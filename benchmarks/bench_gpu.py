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
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    fmt_bytes,
    iter_tensors,
    make_state_dict,
    map_tensors,
    median,
    print_table,
    release_free_memory,
    state_dict_bytes,
    summarize,
)

__all__ = ["main"]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _rm(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


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


def _timed(
    path: str, issue: Callable[[str], Any], staged: Callable[[Any], None], durable: Callable[[Any], Any]
) -> dict[str, float]:
    """One save into a fresh ``path`` (removed afterwards): returned, staged, durable."""
    _rm(path)
    os.sync()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    h = issue(path)
    t_ret = time.perf_counter()
    staged(h)
    t_staged = time.perf_counter()
    durable(h)
    t_end = time.perf_counter()
    del h
    _rm(path)
    return {"stall": t_ret - t0, "staged": t_staged - t0, "durable": t_end - t0}


def _dcp_pinned(sd: dict[str, Any]) -> tuple[Callable[[str], Any], str, Any]:
    """DCP THREAD-mode async_save with a pinned DefaultStager where this torch has one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    kwargs: dict[str, Any] = {"async_checkpointer_type": AsyncCheckpointerType.THREAD}
    stager = None
    desc = "default stager (no DefaultStager in this torch)"
    if "async_stager" in inspect.signature(dcp.async_save).parameters:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=True,
                use_shared_memory=False,
                use_async_staging=True,
                use_non_blocking_copy=True,
            )
        )
        kwargs["async_stager"] = stager
        desc = "DefaultStager(pinned, async staging, non-blocking copies)"
    return (lambda path: dcp.async_save(sd, checkpoint_id=path, **kwargs)), desc, stager


def _dcp_staged(h: Any) -> None:
    sc = getattr(h, "staging_completion", None)
    if sc is not None:
        sc.result()


def _dcp_durable(h: Any) -> None:
    (getattr(h, "upload_completion", None) or h).result()


def _overlap_steps(step: GpuStep, issue: Callable[[str], Any], path: str) -> dict[str, Any]:
    """GPU steps alone (before and after) and while an overlap-mode save is in flight."""
    _rm(path)
    base = [step.step() for _ in range(20)]
    h = issue(path)
    during = []
    while not h.done():
        during.append(step.step())
    h.result()
    base += [step.step() for _ in range(20)]
    _rm(path)
    return {
        "baseline": median(base),
        "during": median(during) if during else None,
        "steps_during": len(during),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import async_ckpt as ac

    _log(f"making a {args.gib:g} GiB state dict of {args.tensors} tensors on {torch.cuda.get_device_name()}")
    sd = map_tensors(make_state_dict(int(args.gib * (1 << 30)), args.tensors, args.seed), lambda t: t.cuda())
    nbytes = state_dict_bytes(sd)
    tensors = list(iter_tensors(sd))
    release_free_memory()
    limit = D2HLimit(tensors)
    step = GpuStep()
    ck = ac.AsyncCheckpointer(start=True)  # pins its staging buffers when CUDA is available
    dcp_issue, dcp_desc, stager = _dcp_pinned(sd)

    def ours(overlap: bool) -> Callable[[str], Any]:
        return lambda path: ck.save(sd, path, overlap=overlap)

    def ours_staged(h: Any) -> None:
        h.staged.wait()

    def ours_durable(h: Any) -> None:
        h.result()

    def path(name: str) -> str:
        return str(work / name)

    first = {
        "ac": _timed(path("ac-first"), ours(False), ours_staged, ours_durable),
        "dcp_pinned": _timed(path("dcp-first"), dcp_issue, _dcp_staged, _dcp_durable),
    }
    rounds: list[dict[str, Any]] = []
    for r in range(args.repeats):
        rd: dict[str, Any] = {"d2h": limit.time()}
        rd["ac"] = _timed(path(f"ac-{r}"), ours(False), ours_staged, ours_durable)
        rd["ac_overlap"] = _timed(path(f"aco-{r}"), ours(True), ours_staged, ours_durable)
        rd["dcp_pinned"] = _timed(path(f"dcp-{r}"), dcp_issue, _dcp_staged, _dcp_durable)
        rd["d2h_after"] = limit.time()
        rd["overlap_step"] = _overlap_steps(step, ours(True), path(f"acs-{r}"))
        rounds.append(rd)
        _log(
            f"round {r + 1}/{args.repeats}: d2h {rd['d2h']:.3f}s ours {rd['ac']['stall']:.3f}/"
            f"{rd['ac']['durable']:.3f}s overlap staged {rd['ac_overlap']['staged']:.3f}s "
            f"DCP pinned {rd['dcp_pinned']['stall']:.3f}/{rd['dcp_pinned']['staged']:.3f}/"
            f"{rd['dcp_pinned']['durable']:.3f}s"
        )
    ck.close()
    if stager is not None:
        with contextlib.suppress(Exception):
            stager.close()
    d2h = [(x["d2h"] + x["d2h_after"]) / 2 for x in rounds]
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "state_bytes": nbytes,
        "n_tensors": len(tensors),
        "dcp_stager": dcp_desc,
        "first": first,
        "rounds": rounds,
        "d2h": summarize(d2h),
    }
    for key in ("ac", "ac_overlap", "dcp_pinned"):
        out[key] = {f: summarize([x[key][f] for x in rounds]) for f in ("stall", "staged", "durable")}
    slow = [
        x["overlap_step"]["during"] / x["overlap_step"]["baseline"]
        for x in rounds
        if x["overlap_step"]["during"] is not None
    ]
    out["overlap_step_slowdown"] = summarize(slow) if slow else None

    def paired(k: str, f: str) -> float:
        return median([x[k][f] / ((x["d2h"] + x["d2h_after"]) / 2) for x in rounds])

    out["ratios"] = {
        "stall_over_d2h": paired("ac", "stall"),
        "overlap_staged_over_d2h": paired("ac_overlap", "staged"),
        "dcp_pinned_stall_over_d2h": paired("dcp_pinned", "stall"),
        "dcp_pinned_staged_over_d2h": paired("dcp_pinned", "staged"),
        "dcp_pinned_durable_over_ours": median(
            [x["dcp_pinned"]["durable"] / x["ac"]["durable"] for x in rounds]
        ),
    }
    return out


def report(res: dict[str, Any]) -> None:
    rows = [["D2H limit (pinned copy_)", "-", f"{res['d2h']['median']:.3f}", "-"]]
    names = {
        "ac": "async_ckpt save",
        "ac_overlap": "async_ckpt save(overlap=True)",
        "dcp_pinned": f"DCP async_save THREAD, {res['dcp_stager']}",
    }
    for k, label in names.items():
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
    for k, v in res["ratios"].items():
        print(f"  {k:<32} {v:.3f}")
    if res["overlap_step_slowdown"]:
        print(
            f"  GPU step during an overlap-mode save / alone: {res['overlap_step_slowdown']['median']:.3f}x"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--gib", type=float, default=2.0, help="total tensor bytes, GiB")
    ap.add_argument("--tensors", type=int, default=2872, help="number of tensors")
    ap.add_argument("--repeats", type=int, default=3)
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
