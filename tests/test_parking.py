"""The parking signal (common.parking): backends the load needs, with a peak held for the scale-in delay."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.parking import PeakHold, backends_needed


@given(in_flight=st.integers(0, 1000), target=st.integers(1, 64), backends=st.integers(1, 16))
def test_backends_needed_is_the_packed_count_within_the_fleet(in_flight: int, target: int, backends: int) -> None:
    n = backends_needed(in_flight, target, backends)
    assert 1 <= n <= backends
    if in_flight <= target * backends:
        assert (n - 1) * target < max(in_flight, 1) <= n * target  # just enough backends at the target


def test_backends_needed_edges() -> None:
    assert backends_needed(0, 7, 4) == 1  # a model stays served
    assert backends_needed(8, 7, 4) == 2
    assert backends_needed(100, 7, 4) == 4
    assert backends_needed(5, 7, 0) == 0
    with pytest.raises(ValueError):
        backends_needed(1, 0, 2)


steps_st = st.lists(st.tuples(st.floats(0, 50), st.integers(0, 40)), max_size=30).map(
    lambda xs: sorted(xs, key=lambda x: x[0])
)


@given(steps=steps_st, hold=st.floats(0, 20), probes=st.lists(st.floats(0, 80), max_size=10))
def test_peak_hold_is_the_max_of_the_step_function_over_the_window(
    steps: list[tuple[float, int]], hold: float, probes: list[float]
) -> None:
    ph = PeakHold(hold)
    for t, v in steps:
        ph.record(t, v)
    for now in sorted(probes):  # asked in time order, as a scrape does
        expected = 0
        in_force = [v for t, v in steps if t <= now - hold]
        if in_force:
            expected = in_force[-1]
        inside = [v for t, v in steps if now - hold < t <= now]
        expected = max([expected, *inside])
        assert ph.peak(now) == expected


def test_it_rises_at_once_and_falls_only_after_the_hold() -> None:
    ph = PeakHold(300.0)
    ph.record(0.0, 10)
    ph.record(5.0, 1)
    assert ph.peak(5.0) == 10
    assert ph.peak(299.0) == 10
    assert ph.peak(305.0) == 1
    ph.record(306.0, 20)
    assert ph.peak(306.0) == 20
    assert math.isclose(ph.hold_s, 300.0)
    with pytest.raises(ValueError):
        ph.record(1.0, 3)
