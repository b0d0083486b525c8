"""How many faults the fault-injection tests injected and saw caught, per section.

Tests add to the counts; ``tests/conftest.py`` prints them in pytest's terminal
summary, so no test depends on running after the others to report them.
"""

from __future__ import annotations

COUNTS: dict[str, dict[str, int]] = {}

# A section's line of totals: (section, key prefix, label).
_TOTALS = (("integrity", "bit flips", "bit flips detected in all"),)


def count(section: str, name: str, n: int = 1) -> None:
    counts = COUNTS.setdefault(section, {})
    counts[name] = counts.get(name, 0) + n


def get(section: str, name: str) -> int:
    return COUNTS.get(section, {}).get(name, 0)


def summary_lines() -> list[str]:
    lines = []
    for section, counts in sorted(COUNTS.items()):
        lines.append(f"[{section}] " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        for where, prefix, label in _TOTALS:
            if where == section:
                total = sum(v for k, v in counts.items() if k.startswith(prefix))
                lines.append(f"[{section}] {label}: {total}")
    return lines
