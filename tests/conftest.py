import os
import sys
from typing import Any

# Multi-rank tests spawn processes; keep each to one intra-op thread so two
# cores are not oversubscribed.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    # Imported here: the module is shared with the tests through sys.path, set above.
    from _counts import summary_lines

    lines = summary_lines()
    if lines:
        terminalreporter.section("fault-injection counts")
        for line in lines:
            terminalreporter.write_line(line)
