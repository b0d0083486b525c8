"""Draws docs/architecture.png: the flow of one async save. Run: python docs/diagrams/architecture.py"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

LANES = [
    ("trainer process (rank r)", 0.2, "#e8f0fe"),
    ("worker process (rank r, persistent)", 4.2, "#e6f4ea"),
    ("storage", 8.4, "#fef7e0"),
]
STEPS = [
    (0, 8.6, "await async_save(sd, id)\nflatten -> entries + layout key"),
    (0, 7.2, "stage: copy into reused shared-memory\nbuffers (pinned + side stream on CUDA)"),
    (0, 5.6, "return PendingCheckpoint\ntraining goes on"),
    (1, 7.2, "cached plan? write at once\nelse: gather plans on the workers'\nown store, dedup, assign, validate"),
    (1, 5.3, "asyncio (uvloop) writer: several files,\nxxh3 per 4 MiB block, fsync"),
    (1, 3.6, "commit barrier: rank 0 writes\nmetadata.json last, renames dir"),
    (2, 5.3, "shard-r*.safetensors\n(in .name.tmp-token/)"),
    (2, 3.6, "name/metadata.json\n= committed"),
    (0, 2.0, "pending resolves: Metadata\n(timings, bytes) or the error"),
]
ARROWS = [(0, 1), (1, 2), (1, 3), (3, 4), (4, 6), (4, 5), (5, 7), (5, 8)]


def main() -> None:
    fig, ax = plt.subplots(figsize=(12, 7.5), dpi=110)
    ax.set_xlim(0, 12.4)
    ax.set_ylim(0.5, 10)
    ax.axis("off")
    for title, x, color in LANES:
        ax.add_patch(FancyBboxPatch((x, 1.2), 3.8, 8.5, boxstyle="round,pad=0.02", fc=color, ec="#999"))
        ax.text(x + 1.9, 9.45, title, ha="center", va="center", fontsize=11, weight="bold")
    centers = []
    for lane, y, text in STEPS:
        x = LANES[lane][1] + 0.15
        ax.add_patch(FancyBboxPatch((x, y - 0.55), 3.5, 1.1, boxstyle="round,pad=0.03", fc="white", ec="#555"))
        ax.text(x + 1.75, y, text, ha="center", va="center", fontsize=8.5)
        centers.append((x + 1.75, y))
    for a, b in ARROWS:
        (x0, y0), (x1, y1) = centers[a], centers[b]
        if abs(x0 - x1) > 0.1:
            x0 += 1.75 if x1 > x0 else -1.75
            x1 -= 1.75 if x1 > x0 else -1.75
        else:
            y0 -= 0.55
            y1 += 0.55
        ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=14, color="#333"))
    ax.text(6.2, 0.85, "small request over a socket pair; buffers were handed over once as memfd descriptors",
            ha="center", fontsize=8.5, style="italic")
    out = Path(__file__).resolve().parent.parent / "architecture.png"
    fig.savefig(out, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
