"""The tables and ratios of a ``bench_async.py`` run, from the figures it measured.

``summarize_run`` reduces the rounds to min / median / max (and per-round paired
ratios); ``report`` prints every table and returns the summary, the ratios and
the verdict on each target in ``TARGETS``.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from _common import fmt_bytes, median, print_table, summarize
from async_measure import CPU_FIELDS
from async_modes import ASYNC_KEYS, LABELS

__all__ = ["TARGETS", "report", "summarize_run"]

TARGETS = {
    "stall_over_memcpy": 1.3,
    "durable_over_memcpy_plus_write": 1.3,
    "peak_pss_over_state": 2.3,
    "slowdown_vs_dcp_thread": 0.5,
    "first_eager_over_steady": 2.0,
}


def _mmm(s: dict[str, Any] | None, fmt: str = "{:.2f}") -> str:
    if not s:
        return "-"
    return "/".join(fmt.format(s[k]) for k in ("min", "median", "max"))


def _sum(xs: list[float]) -> dict[str, Any] | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return summarize(xs) if xs else None


def _med(s: dict[str, Any] | None) -> float | None:
    return None if s is None else s["median"]


def summarize_run(res: dict[str, Any]) -> dict[str, Any]:
    rounds = res["rounds"]
    setup = res["setup"]
    sm: dict[str, Any] = {
        "memcpy": _sum([r["memcpy"]["wall"] for r in rounds]),
        "memcpy_cpu": _sum([r["memcpy"]["cpu"] for r in rounds]),
        "write_fsync": _sum([r["write_fsync"]["wall"] for r in rounds]),
        "loadavg_1m": _sum([r["load_before"]["loadavg_1m"] for r in rounds]),
        "saves": {},
        "slowdown": {},
    }
    keys = sorted({k for r in rounds for k in r["saves"]}, key=list(LABELS).index)
    for k in keys:
        runs = [r["saves"][k] for r in rounds if k in r["saves"]]
        cpu = [x["cpu"] for x in runs if "cpu" in x]
        sm["saves"][k] = {
            "n": len(runs),
            "stall": _sum([x["stall"] for x in runs]),
            "durable": _sum([x["durable"] for x in runs]),
            "stall_cpu": _sum([x.get("stall_cpu", math.nan) for x in runs]),
            **{f: _sum([c[f] for c in cpu]) for f in CPU_FIELDS},
        }
    for k in ASYNC_KEYS:
        runs = [r["slowdown"][k] for r in rounds if k in r["slowdown"]]
        if runs:
            sm["slowdown"][k] = {
                "ratio": _sum([x["ratio"] for x in runs]),
                "lost_s": _sum([x["lost_s"] for x in runs]),
                "durable_training": _sum([x["durable"] for x in runs]),
                "baseline_step": _sum([x["baseline_step"] for x in runs]),
                "baseline_drift": _sum([x["baseline_drift"] for x in runs]),
                "steps": [x["steps"] for x in runs],
            }
    eager = [setup["ac_first"], *setup.get("ac_first_more", [])]
    sm["ac_first_eager"] = {
        "durable": _sum([x["durable"] for x in eager]),
        "stall": _sum([x["stall"] for x in eager]),
        "worker_start": _sum([setup["ac_worker_start_s"], *setup.get("ac_worker_start_more_s", [])]),
    }
    # paired, per-round ratios
    pair_stall, pair_durable, pair_stall_cpu = [], [], []
    for r in rounds:
        a = r["saves"].get("ac")
        if a:
            mc, wr = r["memcpy"], r["write_fsync"]
            pair_stall.append(a["stall"] / mc["wall"])
            pair_durable.append(a["durable"] / (mc["wall"] + wr["wall"]))
            if mc["cpu"] > 0:
                pair_stall_cpu.append(a["stall_cpu"] / mc["cpu"])
    pair_held = [r["saves"]["ac"]["stall"] / r["memcpy_held"]["wall"] for r in rounds if "memcpy_held" in r]
    sm["memcpy_held"] = _sum([r["memcpy_held"]["wall"] for r in rounds if "memcpy_held" in r])
    sm["paired"] = {
        "stall_over_memcpy_held": _sum(pair_held),
        "stall_over_memcpy": _sum(pair_stall),
        "durable_over_memcpy_plus_write": _sum(pair_durable),
        "stall_cpu_over_memcpy_cpu": _sum(pair_stall_cpu),
    }
    return sm


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return None
    return num / den


def _f2(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def _kilo(x: float | None) -> str:
    return "-" if x is None else f"{x / 1000:.0f}k"


def _get_in(d: dict[str, Any], key: str, field: str) -> Any:
    """``d[key][field]``, or None where a light run did not measure it."""
    return (d.get(key) or {}).get(field)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _print_machine(res: dict[str, Any], sm: dict[str, Any]) -> None:
    ncpu = os.cpu_count() or 1
    lib = res.get("library", {})
    print()
    print(
        f"async_ckpt at {lib.get('commit', '?')[:12]}"
        + (f" with local edits to {', '.join(lib['modified'])}" if lib.get("modified") else "")
    )
    load = sm["loadavg_1m"]
    print(
        f"Machine: {ncpu} CPUs; 1-min load average before each round {_mmm(load, '{:.1f}')} (min/median/max)"
        + (
            "\n  ** SHARED / OVERSUBSCRIBED machine: wall times are inflated and noisy; methods are compared"
            " within rounds;\n     CPU seconds, run-queue wait and page faults are the load-independent"
            " figures **"
            if load and load["median"] > ncpu
            else ""
        )
    )
    print()


def _print_hardware(res: dict[str, Any], sm: dict[str, Any]) -> None:
    nbytes = res["state_bytes"]
    mc, wr = _med(sm["memcpy"]), _med(sm["write_fsync"])
    print_table(
        ["step", "wall s min/med/max", "GB/s (median)", "CPU s (median)"],
        [
            ["memcpy", _mmm(sm["memcpy"]), f"{nbytes / mc / 1e9:.2f}", _f2(_med(sm["memcpy_cpu"]))],
            *(
                [["memcpy, destination held all run", _mmm(sm["memcpy_held"]), "-", "-"]]
                if sm.get("memcpy_held")
                else []
            ),
            ["write+fsync", _mmm(sm["write_fsync"]), f"{nbytes / wr / 1e9:.2f}", "-"],
            ["memcpy + write+fsync", f"{mc + wr:.2f}", "-", "-"],
        ],
        title=f"Hardware limits ({fmt_bytes(nbytes)}, {res['n_tensors']} tensors)",
    )


def _label(k: str, s: dict[str, Any], args: argparse.Namespace) -> str:
    return LABELS[k] + (f" (x{s['n']})" if s["n"] != args.repeats else "")


def _print_saves(sm: dict[str, Any], args: argparse.Namespace) -> None:
    """Per method: stall, durable, and the training-step slowdown while it is in flight."""
    rows = []
    for k, s in sm["saves"].items():
        slow = sm["slowdown"].get(k)
        blocking = k in ("ac_blocking", "dcp_save")
        rows.append(
            [
                _label(k, s, args),
                _mmm(s["stall"]),
                _mmm(s["durable"]),
                _mmm(slow["durable_training"]) if slow else "-",
                "blocked" if blocking else (_mmm(slow["ratio"]) if slow and slow["ratio"] else "-"),
                _mmm(s["durable"])
                if blocking
                else (_mmm(slow["lost_s"]) if slow and slow["lost_s"] else "-"),
            ]
        )
    print()
    print_table(
        ["method", "stall s", "durable s", "durable while training s", "step slowdown x", "training lost s"],
        rows,
        title=(
            "Saves, wall s min/median/max over rounds (stall = the call blocks; durable = until the result;\n"
            "while training = the slowdown runs; training lost = stall + extra step time during the save)"
        ),
    )


def _print_resources(res: dict[str, Any], sm: dict[str, Any], args: argparse.Namespace) -> None:
    """Per method: CPU, run-queue wait and page faults per save, and the tree's peak memory."""
    nbytes, memr = res["state_bytes"], res["memory"]
    rows = []
    for k, s in sm["saves"].items():
        m = memr.get(k)
        rows.append(
            [
                _label(k, s, args),
                _f2(_med(s["stall_cpu"])),
                _f2(_med(s["total_cpu"])),
                _f2(_med(s["helpers_cpu"])),
                _f2(_med(s["helpers_runq"])),
                f"{_kilo(_med(s['trainer_minflt']))}/{_kilo(_med(s['helpers_minflt']))}",
                fmt_bytes(m["rss_peak"]) if m else "-",
                fmt_bytes(m["pss_peak"]) if m else "-",
                f"{m['pss_peak'] / nbytes:.2f}" if m else "-",
            ]
        )
    print()
    print_table(
        [
            "method",
            "stall CPU s",
            "save CPU s",
            "helper CPU s",
            "helper runq s",
            "minflt trainer/helpers",
            "peak RSS sum",
            "peak PSS sum",
            "PSS/state",
        ],
        rows,
        title=(
            "Resources per save (medians; CPU of trainer + helper processes; runq = time runnable but waiting"
            " for a CPU);\npeak memory of the process tree during one extra save with nothing else alive "
            "(RSS sum counts shared staging twice; PSS is the honest figure)"
        ),
    )


def _print_first_saves(setup: dict[str, Any], sm: dict[str, Any]) -> None:
    frows = []

    def first_row(label: str, r: dict[str, Any] | None) -> None:
        if r:
            cpu = r.get("cpu", {})
            st = r.get("stats") or {}
            frows.append(
                [
                    label,
                    f"{r['stall']:.2f}",
                    f"{r['durable']:.2f}",
                    _f2(r.get("stall_cpu")),
                    _f2(cpu.get("total_cpu")),
                    _f2(cpu.get("helpers_runq")),
                    f"{_kilo(cpu.get('trainer_minflt'))}/{_kilo(cpu.get('helpers_minflt'))}" if cpu else "-",
                    _f2(st.get("stage_s")),
                    _f2(st.get("write_s")),
                ]
            )

    first_row("async_ckpt first save, eager start (main)", setup.get("ac_first"))
    for i, r in enumerate(setup.get("ac_first_more", [])):
        first_row(f"async_ckpt first save, eager start (fresh #{i + 2})", r)
    first_row("async_ckpt first save, lazy start (incl. ctor)", setup.get("ac_lazy_first"))
    first_row("DCP async_save THREAD first", setup.get("dcp_thread_first"))
    first_row("DCP async_save PROCESS first (spawns helper)", setup.get("dcp_process_first"))
    print()
    print_table(
        [
            "first save",
            "stall s",
            "durable s",
            "stall CPU",
            "save CPU",
            "helper runq",
            "minflt",
            "stage_s",
            "write_s",
        ],
        frows,
        title="First saves (stage_s / write_s: async_ckpt md.stats)",
    )
    ws = sm["ac_first_eager"]["worker_start"]
    print(f"async_ckpt worker start (AsyncCheckpointer(start=True)) s: {_mmm(ws)}")
    base = [v["baseline_step"]["median"] for v in sm["slowdown"].values() if v.get("baseline_step")]
    if base:
        print(f"training step (1024x1024 fp32 matmul) baseline: {median(base) * 1e3:.1f} ms (median)")
    if "dcp_process" in sm["saves"]:
        print(f"DCP PROCESS mode stager: {setup.get('dcp_process_stager')}")


def _print_steady_stats(res: dict[str, Any]) -> None:
    """The library's own md.stats of every steady-state save, beside its helpers' CPU."""
    stat_rows = []
    for i, r in enumerate(res["rounds"]):
        a = r["saves"].get("ac")
        s = (a or {}).get("stats")
        if s:
            cpu = a.get("cpu", {})
            stat_rows.append(
                [
                    f"steady r{i + 1}",
                    f"{s['stall_s']:.3f}",
                    f"{s['stage_s']:.3f}",
                    f"{s['stall_s'] - s['stage_s']:.3f}",
                    f"{s['plan_s']:.3f}",
                    f"{s['write_s']:.3f}",
                    f"{s['commit_s']:.3f}",
                    str(s["plan_cached"]),
                    _f2(cpu.get("helpers_cpu")),
                    _f2(cpu.get("helpers_runq")),
                    _kilo(cpu.get("helpers_minflt")),
                ]
            )
    print()
    print_table(
        [
            "save",
            "stall_s",
            "stage_s",
            "non-copy",
            "plan_s",
            "write_s",
            "commit_s",
            "cached",
            "helper CPU",
            "runq",
            "minflt",
        ],
        stat_rows,
        title=(
            "async_ckpt steady-state md.stats (non-copy = stall_s - stage_s: the library's own overhead;"
            "\n+ helper processes' CPU s, run-queue wait s, minor faults)"
        ),
    )


def _print_loads(res: dict[str, Any]) -> None:
    nbytes = res["state_bytes"]
    loads = res.get("loads", {})
    if loads:
        print()
        print_table(
            ["load", "min/median/max s", "GB/s (median)", "correct"],
            [[k, _mmm(v), f"{nbytes / v['median'] / 1e9:.2f}", str(v["correct"])] for k, v in loads.items()],
            title="Cold loads (page cache evicted) into a preallocated target",
        )


def compute_ratios(res: dict[str, Any], sm: dict[str, Any]) -> dict[str, Any]:
    """Every ratio the run supports: the targets' and the others (None where not measured)."""
    nbytes, setup, memr, loads = res["state_bytes"], res["setup"], res["memory"], res.get("loads", {})
    mc, wr = _med(sm["memcpy"]), _med(sm["write_fsync"])
    acs = sm["saves"]["ac"]
    ac_slow = _med(sm["slowdown"].get("ac", {}).get("ratio"))
    th_slow = _med(sm["slowdown"].get("dcp_thread", {}).get("ratio"))
    pr_slow = _med(sm["slowdown"].get("dcp_process", {}).get("ratio"))
    ratios: dict[str, Any] = {
        "stall_over_memcpy": _med(sm["paired"]["stall_over_memcpy"]),
        "durable_over_memcpy_plus_write": _med(sm["paired"]["durable_over_memcpy_plus_write"]),
        "peak_pss_over_state": _ratio(_get_in(memr, "ac", "pss_peak"), nbytes),
        "first_eager_over_steady": _ratio(_med(sm["ac_first_eager"]["durable"]), _med(acs["durable"])),
        "stall_over_memcpy_held": _med(sm["paired"]["stall_over_memcpy_held"]),
        "stall_over_memcpy_of_medians": _ratio(_med(acs["stall"]), mc),
        "durable_over_memcpy_plus_write_of_medians": _ratio(_med(acs["durable"]), mc + wr),
        "stall_cpu_over_memcpy_cpu": _med(sm["paired"]["stall_cpu_over_memcpy_cpu"]),
        "peak_rss_over_state": _ratio(_get_in(memr, "ac", "rss_peak"), nbytes),
        "peak_pss_above_trainer_alone_over_state": _ratio(
            _diff(_get_in(memr, "ac", "pss_peak"), _get_in(memr, "trainer_alone", "pss_peak")), nbytes
        ),
        "trainer_alone_pss_over_state": _ratio(_get_in(memr, "trainer_alone", "pss_peak"), nbytes),
        "first_eager_main_over_steady": _ratio(setup["ac_first"]["durable"], _med(acs["durable"])),
        "first_eager_stall_over_steady_stall": _ratio(
            _med(sm["ac_first_eager"]["stall"]), _med(acs["stall"])
        ),
        "first_lazy_over_steady": _ratio(_get_in(setup, "ac_lazy_first", "durable"), _med(acs["durable"])),
        "ac_step_slowdown": ac_slow,
        "dcp_thread_step_slowdown": th_slow,
        "dcp_process_step_slowdown": pr_slow,
    }
    if ac_slow is not None and th_slow is not None:
        ratios["slowdown_vs_dcp_thread"] = _ratio(ac_slow - 1, th_slow - 1) if th_slow > 1 else None
    lost = {k: _med(v.get("lost_s")) for k, v in sm["slowdown"].items()}
    if lost.get("ac") is not None and lost.get("dcp_thread"):
        ratios["training_lost_ac_over_dcp_thread"] = _ratio(lost["ac"], lost["dcp_thread"])
    for k in ("dcp_thread", "dcp_process", "ac_blocking", "dcp_save"):
        if k in sm["saves"]:
            ratios[f"{k}_durable_over_ac_durable"] = _ratio(
                _med(sm["saves"][k]["durable"]), _med(acs["durable"])
            )
        if k in ("dcp_thread", "dcp_process") and k in sm["saves"]:
            ratios[f"{k}_save_cpu_over_ac_save_cpu"] = _ratio(
                _med(sm["saves"][k]["total_cpu"]), _med(acs["total_cpu"])
            )
    if loads and "dcp.load cold" in loads:
        ratios["ac_load_over_dcp_load"] = _ratio(
            loads["ac.load cold"]["median"], loads["dcp.load cold"]["median"]
        )

    return ratios


def _print_targets(res: dict[str, Any], ratios: dict[str, Any]) -> dict[str, Any]:
    setup = res["setup"]
    ac_slow, th_slow, pr_slow = (
        ratios.get(k) for k in ("ac_step_slowdown", "dcp_thread_step_slowdown", "dcp_process_step_slowdown")
    )
    verdicts: dict[str, Any] = {}
    trows = []
    for key, limit in TARGETS.items():
        v = ratios.get(key)
        met = None if v is None else v <= limit
        verdicts[key] = {"value": v, "target": limit, "met": met}
        trows.append(
            [
                key,
                "-" if v is None else f"{v:.3f}",
                f"<= {limit}",
                {None: "n/a", True: "MET", False: "MISSED"}[met],
            ]
        )
    print()
    print_table(
        ["target ratio", "value", "target", "verdict"],
        trows,
        title=(
            "Targets (stall, durable: median of per-round paired ratios; first save: median durable of "
            f"{len(setup.get('ac_first_more', [])) + 1} eager first saves / steady median)"
        ),
    )
    if ac_slow is not None:
        extra = f", DCP THREAD {th_slow:.3f}x" if th_slow is not None else ""
        extra += f", DCP PROCESS {pr_slow:.3f}x" if pr_slow is not None else ""
        print(
            f"step slowdown during a background save: async_ckpt {ac_slow:.3f}x{extra};\n"
            "slowdown_vs_dcp_thread = (ours - 1) / (DCP THREAD - 1); a value < 0 means no measurable slowdown"
        )
    others = [[k, "-" if v is None else f"{v:.3f}"] for k, v in ratios.items() if k not in TARGETS]
    print()
    print_table(["other ratio", "value"], others)
    if "profile" in res:
        print()
        print("cProfile of one steady-state ck.save (trainer side):")
        print(res["profile"])
    return verdicts


def report(res: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Print every table of a run; return its summary, ratios and target verdicts."""
    sm = summarize_run(res)
    _print_machine(res, sm)
    _print_hardware(res, sm)
    _print_saves(sm, args)
    _print_resources(res, sm, args)
    _print_first_saves(res["setup"], sm)
    _print_steady_stats(res)
    _print_loads(res)
    ratios = compute_ratios(res, sm)
    verdicts = _print_targets(res, ratios)
    return {"summary": sm, "ratios": ratios, "targets": verdicts}
