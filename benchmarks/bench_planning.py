"""Benchmark global save planning (dedup + validation) against DCP's own.

Simulates, in one process, the coordinator's work for R ranks each planning
about ``--items`` write items.  The model is a Llama-like stack on a 2-D
(dp, tp) mesh: attention/MLP weights are sharded on tp (Shard(0) or Shard(1))
and replicated across dp, norms and Adam ``step`` scalars are fully
replicated, and a few non-tensor values ride along (two the same on every
rank, two different per rank).  Every tensor has a parameter plus Adam's
``exp_avg``/``exp_avg_sq``/``step``, as a DCP optimizer state dict does.
``--layout fsdp_tp`` shards every tensor across dp as well (FSDP2 + TP).

Local plans are built up front and passed through pickle, as gathered plans
are, so no two ranks share objects.  Each phase then runs in a forked child
(identical conditions for us and for DCP, and a hard time cap for DCP's
slower phases); the figure reported is the median of the repeats.

    python benchmarks/bench_planning.py --ranks 64 256 1024 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from async_ckpt.planning import (  # noqa: E402
    ChunkStorageMetadata,
    MetadataIndex,
    SavePlan,
    TensorProperties,
    TensorWriteData,
    WriteItem,
    WriteItemType,
    balanced_dedup,
    create_global_plan,
    dedup_save_plans,
    validate_coverage,
)

DP, TP = "dp", "tp"
HIDDEN, FFN, KV, VOCAB = 4096, 14336, 1024, 128256
DTYPE = torch.float32


@dataclass(frozen=True)
class Param:
    """A tensor and, per tensor dim, the mesh dims splitting it (outer first)."""

    fqn: str
    shape: tuple[int, ...]
    splits: tuple[tuple[str, ...], ...]


def model_params(n_items: int, layout: str) -> list[Param]:
    """Parameters and Adam states, about ``n_items`` of them including ``step``."""
    fsdp = (DP,) if layout == "fsdp_tp" else ()

    def sharded(fqn: str, shape: tuple[int, int], tp_dim: int) -> Param:
        # FSDP2 shards dim 0 of whatever TP left, so dp nests inside tp there.
        dim0 = (TP, *fsdp) if tp_dim == 0 else fsdp
        dim1 = (TP,) if tp_dim == 1 else ()
        return Param(fqn, shape, (dim0, dim1))

    def replicated(fqn: str, shape: tuple[int, ...]) -> Param:
        return Param(fqn, shape, (fsdp,) if shape else ())

    def layer(i: int) -> list[Param]:
        p = f"layers.{i}."
        return [
            sharded(p + "attention.wq.weight", (HIDDEN, HIDDEN), 0),
            sharded(p + "attention.wk.weight", (KV, HIDDEN), 0),
            sharded(p + "attention.wv.weight", (KV, HIDDEN), 0),
            sharded(p + "attention.wo.weight", (HIDDEN, HIDDEN), 1),
            sharded(p + "feed_forward.w1.weight", (FFN, HIDDEN), 0),
            sharded(p + "feed_forward.w2.weight", (HIDDEN, FFN), 1),
            sharded(p + "feed_forward.w3.weight", (FFN, HIDDEN), 0),
            replicated(p + "attention_norm.weight", (HIDDEN,)),
            replicated(p + "ffn_norm.weight", (HIDDEN,)),
        ]

    top = [
        sharded("tok_embeddings.weight", (VOCAB, HIDDEN), 0),
        sharded("output.weight", (VOCAB, HIDDEN), 0),
        replicated("norm.weight", (HIDDEN,)),
    ]
    n_layers = max(1, (n_items - 4 * len(top) - 4) // (4 * 9))
    params = top + [p for i in range(n_layers) for p in layer(i)]
    states: list[Param] = []
    for p in params:
        states.append(Param("model." + p.fqn, p.shape, p.splits))
        for state in ("exp_avg", "exp_avg_sq"):
            states.append(Param(f"optim.state.{p.fqn}.{state}", p.shape, p.splits))
        states.append(Param(f"optim.state.{p.fqn}.step", (), ()))
    return states


def _piece(start: int, length: int, parts: int, coord: int) -> tuple[int, int]:
    # torch.chunk semantics: ceil-sized pieces, trailing ones short or empty.
    step = -(-length // parts)
    lo = min(start + coord * step, start + length)
    hi = min(lo + step, start + length)
    return lo, hi - lo


def chunk_of(param: Param, coords: dict[str, int], mesh: dict[str, int]) -> tuple[
    tuple[int, ...], tuple[int, ...]
]:
    offsets, sizes = [], []
    for dim, length in enumerate(param.shape):
        start, size = 0, length
        for mesh_dim in param.splits[dim] if dim < len(param.splits) else ():
            start, size = _piece(start, size, mesh[mesh_dim], coords[mesh_dim])
        offsets.append(start)
        sizes.append(size)
    return tuple(offsets), tuple(sizes)


def build_local_plans(ranks: int, tp: int, n_items: int, layout: str) -> list[SavePlan]:
    """Each rank's local plan, as distinct objects (pickled, as if gathered)."""
    if ranks % tp:
        raise SystemExit(f"--ranks {ranks} is not a multiple of --tp {tp}")
    mesh = {DP: ranks // tp, TP: tp}
    params = model_params(n_items, layout)
    props = TensorProperties(DTYPE)
    uses = [{m for dims in param.splits for m in dims} for param in params]
    uses_dp = [DP in used for used in uses]
    uses_tp = [TP in used for used in uses]
    cache: dict[tuple[int, int, int], WriteItem] = {}
    plans = []
    for rank in range(ranks):
        coords = {DP: rank // tp, TP: rank % tp}
        items = []
        for i, param in enumerate(params):
            key = (i, coords[DP] if uses_dp[i] else -1, coords[TP] if uses_tp[i] else -1)
            item = cache.get(key)
            if item is None:
                offsets, sizes = chunk_of(param, coords, mesh)
                whole = sizes == param.shape
                item = cache[key] = WriteItem(
                    MetadataIndex(param.fqn, offsets),
                    WriteItemType.TENSOR if whole else WriteItemType.SHARD,
                    TensorWriteData(ChunkStorageMetadata(offsets, sizes), props, param.shape),
                )
            items.append(item)
        for name, per_rank in (
            ("train_state", False),
            ("lr_scheduler", False),
            ("dataloader", True),
            ("rng_state", True),
        ):
            value_hash = f"{name}-{rank if per_rank else 0}"
            items.append(
                WriteItem(MetadataIndex(name), WriteItemType.BYTE_IO, value_hash=value_hash)
            )
        plans.append(pickle.loads(pickle.dumps(SavePlan(items))))
    return plans


def to_dcp(plans: Sequence[SavePlan]) -> list[Any]:
    """The same plans in DCP's types (again pickled per rank)."""
    from torch.distributed.checkpoint import metadata as dcp_md
    from torch.distributed.checkpoint import planner as dcp_pl

    kinds = {
        WriteItemType.TENSOR: dcp_pl.WriteItemType.TENSOR,
        WriteItemType.SHARD: dcp_pl.WriteItemType.SHARD,
        WriteItemType.BYTE_IO: dcp_pl.WriteItemType.BYTE_IO,
    }
    converted: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    result = []
    for plan in plans:
        items = []
        for item in plan.items:
            key = (item.index.fqn, item.index.offset)
            dcp_item = converted.get(key)
            if dcp_item is None:
                tensor_data = None
                if item.tensor_data is not None:
                    data = item.tensor_data
                    tensor_data = dcp_pl.TensorWriteData(
                        chunk=dcp_md.ChunkStorageMetadata(
                            offsets=torch.Size(data.offsets), sizes=torch.Size(data.sizes)
                        ),
                        properties=dcp_md.TensorProperties(dtype=data.dtype),
                        size=torch.Size(data.size),
                    )
                dcp_item = converted[key] = dcp_pl.WriteItem(
                    index=dcp_md.MetadataIndex(item.index.fqn, item.index.offset),
                    type=kinds[item.type],
                    tensor_data=tensor_data,
                )
            items.append(dcp_item)
        result.append(pickle.loads(pickle.dumps(dcp_pl.SavePlan(items))))
    return result


def bytes_balance(plans: Sequence[Any]) -> float:
    """max / mean of the chunk bytes each plan writes."""
    per_rank = []
    for plan in plans:
        total = 0
        for item in plan.items:
            data = item.tensor_data
            if data is not None:
                total += math.prod(data.chunk.sizes) * data.properties.dtype.itemsize
        per_rank.append(total)
    mean = statistics.fmean(per_rank)
    return max(per_rank) / mean if mean else 1.0


# --- phases: (setup, timed) pairs run in a forked child -------------------

Phase = tuple[Callable[[Any], Any], Callable[[Any], Any]]
_INPUT: Any = None  # set before forking; children inherit it


def _no_setup(plans: Any) -> Any:
    return plans


def _ours_validate_setup(plans: Any) -> Any:
    gp = create_global_plan(plans)
    return gp.plans, gp.per_rank_fqns


def _ours_validate(arg: Any) -> None:
    validate_coverage(arg[0], per_rank_fqns=arg[1])


def _dcp_dedup(plans: Any) -> Any:
    from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans as dcp

    return dcp(plans)


def _dcp_global(plans: Any) -> Any:
    from torch.distributed.checkpoint.default_planner import (
        _validate_global_plan,
        create_default_global_save_plan,
    )

    # DefaultSavePlanner._create_global_plan, minus the planner object.
    global_plan, metadata = create_default_global_save_plan(_dcp_dedup(plans))
    errors = _validate_global_plan(global_plan, metadata)
    if errors:
        raise RuntimeError(f"DCP rejected the plan: {errors[:3]}")
    return global_plan


def _dcp_validate_setup(plans: Any) -> Any:
    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

    return create_default_global_save_plan(_dcp_dedup(plans))


def _dcp_validate(arg: Any) -> None:
    from torch.distributed.checkpoint.default_planner import _validate_global_plan

    errors = _validate_global_plan(*arg)
    if errors:
        raise RuntimeError(f"DCP rejected the plan: {errors[:3]}")


OURS: dict[str, Phase] = {
    "dedup (balanced)": (_no_setup, balanced_dedup),
    "dedup (DCP port)": (_no_setup, dedup_save_plans),
    "validate": (_ours_validate_setup, _ours_validate),
    "global plan (total)": (_no_setup, create_global_plan),
}
DCP: dict[str, Phase] = {
    "dedup (DCP greedy)": (_no_setup, _dcp_dedup),
    "validate": (_dcp_validate_setup, _dcp_validate),
    "global plan (total)": (_no_setup, _dcp_global),
}
BALANCE_PHASES = {"dedup (balanced)", "dedup (DCP greedy)"}


def _child(
    conn: multiprocessing.connection.Connection, phase: Phase, repeats: int, cap: float,
    balance: bool,
) -> None:
    try:
        setup, timed = phase
        arg = setup(_INPUT)
        gc.collect()
        conn.send(("ready", None))
        spent, result = 0.0, None
        for _ in range(repeats):
            start = time.perf_counter()
            result = timed(arg)
            elapsed = time.perf_counter() - start
            conn.send(("time", elapsed))
            spent += elapsed
            if spent > cap:
                break
        if balance:
            conn.send(("balance", bytes_balance(result)))
        conn.send(("done", None))
    except BaseException as exc:  # the parent reports whatever went wrong
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_phase(phase: Phase, repeats: int, cap: float, balance: bool) -> dict[str, Any]:
    """Median seconds of ``phase`` (None past the cap), measured in a forked child."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, phase, repeats, cap, balance))
    proc.start()
    child.close()
    times: list[float] = []
    out: dict[str, Any] = {"seconds": None, "times": times}
    # Setup (untimed) may itself be slow for DCP; allow it generously.
    deadline = time.monotonic() + 20 * cap
    while True:
        if not parent.poll(max(0.0, deadline - time.monotonic())):
            out["capped"] = True
            break
        try:
            kind, value = parent.recv()
        except EOFError:
            out["error"] = "child exited"
            break
        if kind == "ready":
            deadline = time.monotonic() + cap
        elif kind == "time":
            times.append(value)
        elif kind == "balance":
            out["balance"] = value
        elif kind == "error":
            out["error"] = value
            break
        else:
            break
    if proc.is_alive():
        proc.kill()
    proc.join()
    if times and "error" not in out:
        out["seconds"] = statistics.median(times)
    return out


def bench(ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    global _INPUT
    t0 = time.perf_counter()
    plans = build_local_plans(ranks, args.tp, args.items, args.layout)
    n_items = sum(len(p.items) for p in plans)
    print(
        f"\n== {ranks} ranks (dp={ranks // args.tp}, tp={args.tp}), layout={args.layout}, "
        f"{n_items:,} items ({n_items // ranks} per rank); built in "
        f"{time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    result: dict[str, Any] = {"ranks": ranks, "items": n_items, "ours": {}, "dcp": {}}
    _INPUT = plans
    gc.collect()
    gc.freeze()  # inputs are long-lived; keep the collector off them, for both sides
    for name, phase in OURS.items():
        result["ours"][name] = run_phase(phase, args.repeats, args.cap, name in BALANCE_PHASES)
        _print_row("ours", name, result["ours"][name], args.cap)
    run_dcp = ranks <= args.dcp_max_ranks
    _INPUT = None
    gc.unfreeze()
    if run_dcp:
        _INPUT = to_dcp(plans)
    del plans
    gc.collect()
    if run_dcp:
        gc.freeze()
        for name, phase in DCP.items():
            result["dcp"][name] = run_phase(phase, args.repeats, args.cap, name in BALANCE_PHASES)
            _print_row("DCP", name, result["dcp"][name], args.cap)
        _INPUT = None
        gc.unfreeze()
        gc.collect()
    return result


def _fmt(entry: dict[str, Any] | None, cap: float) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return "error"
    if entry["seconds"] is None:
        return f"> {cap:.0f} s"
    return f"{entry['seconds']:.3f} s"


def _print_row(who: str, name: str, entry: dict[str, Any], cap: float) -> None:
    extra = f"   max/mean bytes {entry['balance']:.3f}" if "balance" in entry else ""
    if "error" in entry:
        extra += f"   {entry['error']}"
    print(f"  {who:<5}{name:<22}{_fmt(entry, cap):>12}{extra}", flush=True)


def print_table(results: list[dict[str, Any]], cap: float) -> None:
    print("\nseconds (median); DCP = torch.distributed.checkpoint", torch.__version__)
    header = f"{'ranks':>6} {'items':>11} | {'phase':<20} | {'ours':>10} | {'DCP':>10}"
    print(header)
    print("-" * len(header))
    rows = [
        ("dedup", "dedup (balanced)", "dedup (DCP greedy)"),
        ("dedup, DCP rule", "dedup (DCP port)", "dedup (DCP greedy)"),
        ("validate", "validate", "validate"),
        ("global plan (total)", "global plan (total)", "global plan (total)"),
    ]
    for res in results:
        for label, ours_key, dcp_key in rows:
            ours = _fmt(res["ours"].get(ours_key), cap)
            dcp = _fmt(res["dcp"].get(dcp_key), cap) if res["dcp"] else "not run"
            print(f"{res['ranks']:>6} {res['items']:>11,} | {label:<20} | {ours:>10} | {dcp:>10}")
        ours_bal = res["ours"]["dedup (balanced)"].get("balance")
        dcp_bal = res["dcp"].get("dedup (DCP greedy)", {}).get("balance")
        if ours_bal is not None:
            dcp_text = f"{dcp_bal:.3f}" if dcp_bal is not None else "-"
            print(
                f"{res['ranks']:>6} {'':>11} | {'max/mean bytes':<20} | {ours_bal:>10.3f} | "
                f"{dcp_text:>10}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--items", type=int, default=2000, help="items per rank (about)")
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--layout", choices=("tp", "fsdp_tp"), default="tp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per DCP phase")
    parser.add_argument(
        "--dcp-max-ranks", type=int, default=1024, help="skip DCP above this many ranks"
    )
    parser.add_argument("--json", type=Path, help="also write results here")
    args = parser.parse_args()

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, pid {os.getpid()}")
    results = [bench(r, args) for r in args.ranks]
    print_table(results, args.cap)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "results": results}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
