import os
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from async_ckpt.worker.kvstore import StoreServer

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


@pytest.fixture
def server() -> Iterator[StoreServer]:
    """The workers' key/value store, served for one test (test_kvstore.py, test_worker_comm.py)."""
    s = StoreServer()
    try:
        yield s
    finally:
        s.close()
