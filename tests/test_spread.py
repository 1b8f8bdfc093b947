"""meter.sources.spread: the energy between two counter reads spread over the ticks between them by power."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from meter.sources.spread import CounterSpreader, spread

ticks_strategy = st.lists(
    st.tuples(st.integers(1, 500_000_000), st.one_of(st.none(), st.integers(0, 2_000_000))), min_size=1, max_size=40
)


@given(
    last_mj=st.integers(0, 10**13),
    delta_mj=st.integers(0, 10**7),
    steps=ticks_strategy,
)
def test_spread_keeps_the_counter_and_never_runs_backwards(
    last_mj: int, delta_mj: int, steps: list[tuple[int, int | None]]
) -> None:
    t0 = 1_700_000_000_000_000_000
    ticks = []
    t = t0
    for gap_ns, power in steps:
        t += gap_ns
        ticks.append((t, power))
    values = spread(last_mj, t0, ticks, last_mj + delta_mj)
    assert len(values) == len(ticks)
    assert values[-1] == last_mj + delta_mj  # every counter read's energy, to the millijoule
    assert all(a <= b for a, b in itertools.pairwise([last_mj, *values]))  # never backwards
    assert all(last_mj <= v <= last_mj + delta_mj for v in values)


def test_spread_follows_power_and_falls_back_to_time() -> None:
    # three 100 ms intervals drawing 100, 300 and 600 W (the power read at each one's end): 60 J of 1,000 split so
    t0 = 0
    ticks = [(100, 100_000), (200, 300_000), (300, 600_000)]
    assert spread(1_000, t0, ticks, 2_000) == [1_100, 1_400, 2_000]
    # one tick without a power reading: by duration alone, for all of them
    assert spread(1_000, t0, [(100, 100_000), (200, None), (400, 600_000)], 2_000) == [1_250, 1_500, 2_000]


def test_a_spreader_waits_for_the_counter_and_retries_a_failed_read() -> None:
    s = CounterSpreader("gpu")
    assert s.owes_counter
    [first] = s.counter_tick(100, 5_000, 200_000, None)
    assert (first.t_ns, first.energy_mj) == (100, 5_000) and not s.owes_counter
    assert s.power_tick(200, 200_000) == [] and s.power_tick(300, 200_000) == []
    assert s.counter_tick(400, None, 200_000, "GpuIsLost") == []  # failed: the ticks wait, the read is owed
    assert s.owes_counter
    out = s.counter_tick(500, 5_400, 200_000, None)
    assert [(x.t_ns, x.energy_mj) for x in out] == [(200, 5_100), (300, 5_200), (400, 5_300), (500, 5_400)]
    assert not s.owes_counter


def test_a_reset_or_a_counter_gone_too_long_leaves_gaps() -> None:
    s = CounterSpreader("gpu", max_pending=3)
    s.counter_tick(100, 5_000, None, None)
    s.power_tick(200, 1)
    out = s.counter_tick(300, 10, 1, None)  # the counter restarted (driver reload): nothing to spread
    assert [(x.t_ns, x.energy_mj) for x in out] == [(200, None), (300, 10)]
    assert out[0].error == "counter reset between counter reads"
    for t in (400, 500, 600):
        assert s.power_tick(t, 1) == []
    gaps = s.power_tick(700, 1)  # a fourth tick without a counter read: given up
    assert [(x.t_ns, x.energy_mj) for x in gaps] == [(400, None), (500, None), (600, None), (700, None)]
    assert s.owes_counter  # the next read starts afresh, nothing spread across the gaps
    [fresh] = s.counter_tick(800, 90, 1, None)
    assert (fresh.t_ns, fresh.energy_mj) == (800, 90)
