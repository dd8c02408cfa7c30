"""The arithmetic behind benchmarks/datafree/neighbourhood.py's report: log-k interpolation of measured stream
sizes and the least-squares line in log bytes, against answers worked out by hand."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "datafree"


@pytest.fixture(scope="module")
def nb():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("neighbourhood", BENCH / "neighbourhood.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def test_interpolation_is_linear_in_log_k_between_and_beyond_the_measured_points(nb):
    xs, ys = [0.98, 1.0, 1.02], [100.0, 90.0, 82.0]
    assert nb.interpolate_log(xs, ys, 1.0) == pytest.approx(90.0)
    # halfway in log between 1.0 and 1.02
    mid = math.sqrt(1.02)
    assert nb.interpolate_log(xs, ys, mid) == pytest.approx(86.0)
    # between 0.98 and 1.0, a quarter of the log distance from 0.98
    x = math.exp(math.log(0.98) + 0.25 * (0.0 - math.log(0.98)))
    assert nb.interpolate_log(xs, ys, x) == pytest.approx(97.5)
    # beyond the last point: the last segment extended
    x = math.exp(2 * math.log(1.02))
    assert nb.interpolate_log(xs, ys, x) == pytest.approx(74.0)


def test_line_at_fits_a_straight_line_in_log_bytes(nb):
    b = [1000, 2000, 4000]
    # exactly on score = 5 - 0.5 * log2(bytes / 1000)
    s = [5.0, 4.5, 4.0]
    assert nb.line_at(b, s, 1000 * 2 ** 1.5) == pytest.approx(4.25)
    # symmetric noise around the line leaves the fit where the line is
    noisy = [5.0 + 0.1, 4.5 - 0.2, 4.0 + 0.1]
    assert nb.line_at(b, noisy, 2000) == pytest.approx(4.5)
    # one point: the line is flat at it
    assert nb.line_at([1000], [3.0], 5000) == pytest.approx(3.0)
