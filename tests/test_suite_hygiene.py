"""The test suite's own plumbing: what ``tests/conftest.py`` adds to a pytest run."""

from __future__ import annotations

from pathlib import Path

import pytest

# Multi-process or otherwise heavy: outside the fast set (`pytest -m 'not slow'`).
pytestmark = pytest.mark.slow

pytest_plugins = ("pytester",)

HERE = Path(__file__).resolve().parent


def test_fault_counts_are_reported_in_the_terminal_summary(pytester: pytest.Pytester) -> None:
    # The suite's own conftest and counter, in a fresh directory with two tests that count.
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makepyfile(_counts=(HERE / "_counts.py").read_text())
    pytester.makepyfile(
        test_counting="""
        from _counts import count

        def test_a():
            count("hostile", "fuzz: header mutations", 3)
            count("integrity", "bit flips detected (random)", 2)

        def test_b():
            count("hostile", "fuzz: header mutations", 4)
            count("integrity", "bit flips detected (every bit)", 5)
        """
    )
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=2)
    result.stdout.re_match_lines(
        [
            r".*fault-injection counts.*",
            r"\[hostile\] fuzz: header mutations: 7$",
            r"\[integrity\] bit flips detected \(every bit\): 5, bit flips detected \(random\): 2$",
            r"\[integrity\] bit flips detected in all: 7$",
        ]
    )


def test_no_fault_counts_section_when_nothing_counted(pytester: pytest.Pytester) -> None:
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makepyfile(_counts=(HERE / "_counts.py").read_text())
    pytester.makepyfile(test_plain="def test_a():\n    assert True\n")
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)
    assert "fault-injection counts" not in result.stdout.str()
