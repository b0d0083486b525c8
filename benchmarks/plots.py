"""Draw the benchmark figures from ``results.json`` (written by ``run.py``).

    python benchmarks/plots.py bench-out/results.json --out docs/benchmarks

PNGs:

- ``stall_durable.png``: stall and time to durable (medians) of every checkpointer
  at the main size, as bars, with the hardware limits (memcpy; memcpy + write+fsync)
  as horizontal lines;
- ``size_sweep.png``: the same figures against the state-dict size, as lines;
- ``multirank_bytes.png``: bytes written per rank in multi-rank mode, ours against DCP.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["PNG_NAMES", "make_plots"]

PNG_NAMES = ("stall_durable.png", "size_sweep.png", "multirank_bytes.png")

LABELS = {
    "ac": "async_ckpt AsyncCheckpointer",
    "ac_overlap": "async_ckpt overlap=True",
    "ac_blocking": "async_ckpt ac.save (blocking)",
    "dcp_save": "DCP save (blocking)",
    "dcp_thread": "DCP async_save THREAD",
    "dcp_process": "DCP async_save PROCESS",
}


def _med(d: Any, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    if isinstance(d, dict):
        d = d.get("median")
    return float(d) if isinstance(d, int | float) else None


def _usable(part: Any) -> bool:
    return isinstance(part, dict) and "error" not in part and isinstance(part.get("summary"), dict)


def _headroom(ax: Any) -> None:
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 1.35)  # room for the legend above the data


def _placeholder(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _subtitle(res: dict[str, Any]) -> str:
    m = res.get("machine") or {}
    quick = " (SMOKE-SIZE RUN)" if (res.get("config") or {}).get("quick") else ""
    return f"{m.get('cpu_count', '?')} cpus, {m.get('cpu_model') or '?'}, torch {m.get('torch', '?')}{quick}"


def plot_stall_durable(res: dict[str, Any], path: Path) -> None:
    a = res.get("async") or {}
    sm = a.get("summary") or {}
    saves = sm.get("saves") or {}
    fig, ax = plt.subplots(figsize=(10, 5))
    names = [k for k in LABELS if k in saves]
    if not names:
        _placeholder(ax, "no bench_async results")
    else:
        x = range(len(names))
        w = 0.38
        stall = [_med(saves[k], "stall") or 0.0 for k in names]
        dur = [_med(saves[k], "durable") or 0.0 for k in names]
        ax.bar([i - w / 2 for i in x], stall, w, label="stall (blocks training)")
        ax.bar([i + w / 2 for i in x], dur, w, label="time to durable")
        mc, wf = _med(sm, "memcpy"), _med(sm, "write_fsync")
        if mc is not None:
            ax.axhline(mc, color="k", ls="--", lw=1, label=f"memcpy {mc:.3f}s")
        if mc is not None and wf is not None:
            ax.axhline(mc + wf, color="r", ls=":", lw=1.5, label=f"memcpy + write+fsync {mc + wf:.3f}s")
        ax.set_xticks(list(x), [LABELS[k].replace(" ", "\n", 1) for k in names], fontsize=8)
        ax.set_ylabel("seconds (median)")
        _headroom(ax)
        ax.legend(fontsize=8, ncol=2)
    gib = (a.get("state_bytes") or 0) / (1 << 30)
    ax.set_title(f"Stall and time to durable, {gib:.2f} GiB state dict\n{_subtitle(res)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_size_sweep(res: dict[str, Any], path: Path) -> None:
    pts = [p for p in res.get("sweep") or [] if _usable(p.get("async"))]
    main_gib = (res.get("config") or {}).get("gib")
    if _usable(res.get("async")) and main_gib is not None and all(p["gib"] != main_gib for p in pts):
        pts.append({"gib": main_gib, "async": res["async"]})  # the main run is one more size
    pts.sort(key=lambda p: p["gib"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    if not pts:
        for ax in axes:
            _placeholder(ax, "no size sweep")
    else:
        xs = [p["gib"] for p in pts]
        sms = [(p["async"].get("summary") or {}) for p in pts]
        mc = [_med(s, "memcpy") for s in sms]
        wf = [_med(s, "write_fsync") for s in sms]
        limit = {
            "stall": mc,
            "durable": [
                a + b if a is not None and b is not None else None for a, b in zip(mc, wf, strict=True)
            ],
        }
        for ax, fig_key in zip(axes, ("stall", "durable"), strict=True):
            for k in LABELS:
                ys = [_med(s.get("saves") or {}, k, fig_key) for s in sms]
                if any(y is not None for y in ys):
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=LABELS[k])
            lab = "memcpy" if fig_key == "stall" else "memcpy + write+fsync"
            ax.plot(
                xs, [float("nan") if y is None else y for y in limit[fig_key]], "k--", marker="x", label=lab
            )
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            _headroom(ax)
            ax.set_xlabel("state-dict size (GiB)")
            ax.set_ylabel("seconds (median)")
            ax.set_title("stall" if fig_key == "stall" else "time to durable", fontsize=10)
            ax.legend(fontsize=7)
    fig.suptitle(f"Against state-dict size\n{_subtitle(res)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_multirank_bytes(res: dict[str, Any], path: Path) -> None:
    worlds = [w for w in (res.get("multirank") or {}).get("results") or [] if w.get("methods")]
    fig, axes = plt.subplots(1, max(1, len(worlds)), figsize=(5.5 * max(1, len(worlds)), 4.5), squeeze=False)
    if not worlds:
        _placeholder(axes[0][0], "no multi-rank results")
    for ax, w in zip(axes[0], worlds, strict=False):
        methods = [k for k in ("ac", "dcp_thread", "dcp_save") if k in w["methods"]]
        methods = methods[:2] if "dcp_thread" in methods else methods
        n = w["world"]
        width = 0.8 / max(1, len(methods))
        for j, k in enumerate(methods):
            per = [b / (1 << 20) for b in w["methods"][k]["bytes_per_rank"]]
            bal = w["methods"][k].get("balance_max_over_mean")
            lab = LABELS[k] + (f" (max/mean {bal:.2f})" if bal else "")
            ax.bar([r + (j - (len(methods) - 1) / 2) * width for r in range(n)], per, width, label=lab)
        ax.set_xticks(list(range(n)), [f"rank {r}" for r in range(n)])
        ax.set_ylabel("MiB written")
        _headroom(ax)
        ax.set_title(
            f"{n} ranks, {w.get('unique_bytes', 0) / (1 << 20):.0f} MiB unique, "
            f"{w.get('replicated_fraction', 0):g} replicated",
            fontsize=10,
        )
        ax.legend(fontsize=7)
    fig.suptitle(f"Bytes written per rank\n{_subtitle(res)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(res: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in PNG_NAMES]
    plot_stall_durable(res, paths[0])
    plot_size_sweep(res, paths[1])
    plot_multirank_bytes(res, paths[2])
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("results", type=Path, help="results.json from run.py")
    default_out = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
    ap.add_argument("--out", type=Path, default=default_out)
    args = ap.parse_args(argv)
    for p in make_plots(json.loads(args.results.read_text()), args.out):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
