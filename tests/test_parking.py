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


ops_st = st.lists(
    st.tuples(st.floats(0, 5), st.one_of(st.integers(0, 40), st.none())),  # (time step, value to record or a probe)
    max_size=40,
)


@given(ops=ops_st, hold=st.floats(0, 20))
def test_peak_hold_is_the_max_of_the_step_function_over_the_window(
    ops: list[tuple[float, int | None]], hold: float
) -> None:
    """Records and probes interleaved in time order (as leases, releases and scrapes come), against brute force."""
    ph = PeakHold(hold)
    steps: list[tuple[float, int]] = []
    now = 0.0
    for dt, value in ops:
        now += dt
        if value is not None:
            ph.record(now, value)
            steps.append((now, value))
            continue
        in_force = [v for t, v in steps if t <= now - hold]
        inside = [v for t, v in steps if now - hold < t <= now]
        expected = max([*in_force[-1:], *inside], default=0)
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
