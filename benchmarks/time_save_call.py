"""Where an overlap save's call time goes (issue 14 item 3): the trainer-side work of one save.

``AsyncCheckpointer.save(sd, id, overlap=True)`` returns once the state dict is
flattened, its cached plan looked up, the optimizers to guard found and the
staging job handed to the helper thread. This times the whole call, and each
part of it alone on the same state dict (``_common.make_state_dict``, model +
Adam), over ``--calls`` calls after a warm-up (layout cached), and with
``--profile`` prints cProfile's top functions of the whole call. The work
depends on the tensor count, not on the bytes: ``--gib 0.05`` gives the same
figures as ``--gib 2`` (``--gib`` is there to check that).

    python benchmarks/time_save_call.py                     # 2,872 tensors, 0.25 GiB
    python benchmarks/time_save_call.py --gib 2 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # async_ckpt, uninstalled
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_bytes, iter_tensors, make_state_dict, median, rm, state_dict_bytes


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=0.25, help="state dict size in GiB (default 0.25)")
    p.add_argument("--tensors", type=int, default=2872, help="tensors in the state dict (default 2872)")
    p.add_argument("--calls", type=int, default=20, help="timed calls of each part (default 20)")
    p.add_argument("--profile", action="store_true", help="also cProfile the whole call")
    p.add_argument("--call-only", action="store_true", help="time the whole call only (any version's code)")
    args = p.parse_args(argv)

    import async_ckpt as ac

    torch.set_num_threads(1)
    sd = make_state_dict(int(args.gib * (1 << 30)), args.tensors)
    opt = torch.optim.SGD(list(iter_tensors(sd)), lr=0.0)  # what bench_overhead.py guards
    print(f"{fmt_bytes(state_dict_bytes(sd))} in {args.tensors} tensors; {ac.__file__}")
    work = tempfile.mkdtemp(prefix="time-save-call-")
    ck = ac.AsyncCheckpointer(start=True, worker_idle=False)
    try:
        ck.start(sd)
        n = [0]

        def call(prof: cProfile.Profile | None = None) -> None:
            path = os.path.join(work, f"c{n[0]}")
            n[0] += 1
            if prof is not None:
                prof.enable()
            t0 = time.perf_counter()
            pending = ck.save(sd, path, overlap=True, guard=[opt])
            calls.append(time.perf_counter() - t0)
            if prof is not None:
                prof.disable()
            pending.result(600)  # outside the timed part: each call finds the pool free
            opt.step()  # retires the guard, as training would
            rm(path)

        calls: list[float] = []
        for _ in range(3):
            call()
        calls.clear()
        for _ in range(args.calls):
            call()
        parts: dict[str, list[float]] = {"whole call": calls}
        if not args.call_only:
            parts |= time_parts(sd, opt, ck, args.calls)
        for name, ts in parts.items():
            print(f"{name:>22}: median {median(ts) * 1e3:6.2f} ms  min {min(ts) * 1e3:6.2f} ms")
        if args.profile:
            # The call alone: not the wait for the save, nor the cleanup between calls.
            prof = cProfile.Profile()
            for _ in range(args.calls):
                call(prof)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    finally:
        ck.close()
        rm(work)
    return 0


def time_parts(sd: dict[str, Any], opt: torch.optim.Optimizer, ck: Any, n: int) -> dict[str, list[float]]:
    """Each part of the call alone, with the garbage collector paused as the call pauses it."""
    from async_ckpt import layout_cache
    from async_ckpt._gc import gc_paused
    from async_ckpt.format.values import encode_value
    from async_ckpt.overlap_guard import optimizers_to_guard
    from async_ckpt.state_dict import flatten

    with gc_paused():
        flat = flatten(sd)
        layouts = ck._layouts
        return {
            "flatten": timed(lambda: flatten(sd), n),
            "layout cache (all)": timed(
                lambda: layouts.prepare(flat, allow_pickle=False, verify_replicas=False), n
            ),
            "- signature": timed(lambda: layout_cache._signature(flat), n),
            "- encode values": timed(
                lambda: [encode_value(v, fqn=k, allow_pickle=False) for k, v in flat.values.items()], n
            ),
            "optimizers_to_guard": timed(lambda: optimizers_to_guard(flat.statefuls, True, [opt]), n),
        }


if __name__ == "__main__":
    sys.exit(main())
