"""The benchmarks' own arithmetic: a tool that reports a change with the wrong sign misleads
every decision taken on its figures (`bench/compare.py`'s round-by-round median did, from
`df4b2cc` to 2026-12-07)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench(name: str) -> ModuleType:
    """A script of `bench/`, which import each other by name."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_compare_reports_a_change_that_makes_streams_faster_as_negative() -> None:
    compare, overhead = _bench("compare"), _bench("stream_overhead")
    drift = (5.0, 5.6, 4.9, 6.3, 5.2, 5.8, 4.7)  # the machine's, shared by both in each round
    before = overhead.Arm("before", [overhead.Sample(ms / 1000, 0.0, 1) for ms in drift])
    after = overhead.Arm("after", [overhead.Sample((ms - 0.4) / 1000, 0.0, 1) for ms in drift])

    median, low, high = compare.paired_change(before, after)

    assert median == pytest.approx(-0.0004)
    assert (low, high) == pytest.approx((-0.0004, -0.0004))
    assert compare.paired_change(after, before)[0] == pytest.approx(0.0004)
