"""What the ``async-ckpt`` commands share for printing: plain text, sizes, ages."""

from __future__ import annotations

import time

from rich.console import Console
from rich.text import Text

__all__ = ["age", "human", "say"]


def say(console: Console, text: str, style: str = "") -> None:
    # Text, not markup: paths and messages often hold [brackets].
    console.print(Text(text, style=style), soft_wrap=True)


def human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def age(mtime: float | None) -> str:
    if mtime is None:
        return "-"
    s = max(0.0, time.time() - mtime)
    for limit, unit, div in ((120, "s", 1), (7200, "m", 60), (172800, "h", 3600)):
        if s < limit:
            return f"{int(s // div)}{unit} ago"
    return f"{int(s // 86400)}d ago"
