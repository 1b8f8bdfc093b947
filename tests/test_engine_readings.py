"""meter.engine.readings (pure): ticks of multi-GPU backends, gaps, and the exact partition of a counter into epochs."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from meter.engine.readings import Tick, epoch_bounds, epoch_readings, group_ticks

MS = 1_000_000
S = 1_000_000_000


def test_group_ticks_joins_the_devices_of_one_read() -> None:
    samples = [
        ("a", 1000 * MS, 10), ("b", 1003 * MS, 20), ("x", 1004 * MS, 99),  # x belongs to another backend
        ("a", 1100 * MS, 15), ("b", 1104 * MS, 26),
        ("a", 1200 * MS, None), ("b", 1203 * MS, 30),  # a failed read: a bad tick
        ("a", 1300 * MS, 21),  # b missing: incomplete, bad
        ("a", 1400 * MS, 25), ("b", 1402 * MS, 40),
    ]  # fmt: skip
    ticks = group_ticks(samples, ("a", "b"), gap_ns=40 * MS)
    assert ticks == [
        Tick(1003 * MS, (10, 20)),
        Tick(1104 * MS, (15, 26)),
        Tick(1203 * MS, None),
        Tick(1300 * MS, None),
        Tick(1402 * MS, (25, 40)),
    ]
    assert ticks[0].energy_mj == 30


def test_group_ticks_splits_on_a_repeated_device_even_without_a_pause() -> None:
    samples = [("a", 0, 1), ("b", 5 * MS, 2), ("a", 10 * MS, 3), ("b", 15 * MS, 4)]
    assert group_ticks(samples, ("a", "b"), gap_ns=40 * MS) == [Tick(5 * MS, (1, 2)), Tick(15 * MS, (3, 4))]


def test_epoch_readings_waits_for_the_boundary_and_splits_at_gaps() -> None:
    ticks = [Tick(t * 100 * MS, (t * 10,)) for t in range(0, 25)]
    assert epoch_readings(ticks, 0, 3 * S, 0, 5 * S) is None  # no reading at/after 3 s yet
    r = epoch_readings(ticks, 0, 2 * S, 0, 5 * S)
    assert r is not None and r.counter_mj == 200 and r.gaps == 0 and r.boundary_ns == 2 * S
    assert len(r.segments) == 1 and r.segments[0][-1].t_ns == 2 * S

    bad = list(ticks)
    bad[5] = Tick(bad[5].t_ns, None)  # failed read: intervals 4-5 and 5-6 unmeasured
    bad[12] = Tick(bad[12].t_ns, (3,))  # reset: interval 11-12 unmeasured, 12-13 measured again from 3
    r = epoch_readings(bad, 0, 2 * S, 0, 5 * S)
    assert r is not None
    assert r.gaps == 2
    assert [len(s) for s in r.segments] == [5, 6, 9]  # 0..4, 6..11, 12..20
    assert r.counter_mj == 40 + 50 + (200 - 3)

    # With lag, the readings that belong to [0, 2 s) are those taken in [lag, 2 s + lag).
    r = epoch_readings(ticks, 0, 2 * S, 300 * MS, 5 * S)
    assert r is not None and r.first_reading_ns == 300 * MS and r.boundary_ns == 2300 * MS


def test_a_long_pause_is_a_gap() -> None:
    ticks = [Tick(0, (0,)), Tick(100 * MS, (10,)), Tick(9 * S, (900,)), Tick(9 * S + 100 * MS, (910,))]
    r = epoch_readings(ticks, 0, 10 * S, 0, 5 * S)
    assert r is None  # no reading at/after 10 s
    r = epoch_readings([*ticks, Tick(10 * S, (1000,))], 0, 10 * S, 0, 5 * S)
    assert r is not None and r.gaps == 1 and r.counter_mj == 10 + 10 + 90


@st.composite
def tick_histories(draw: st.DrawFn) -> list[Tick]:
    n = draw(st.integers(2, 120))
    t = draw(st.integers(0, 10 * S))
    energy = draw(st.integers(0, 10**6))
    out = []
    for _ in range(n):
        t += draw(st.sampled_from([97 * MS, 100 * MS, 103 * MS, 1 * MS, 800 * MS, 7 * S]))
        kind = draw(st.sampled_from(["ok"] * 8 + ["fail", "reset", "still"]))
        if kind == "fail":
            out.append(Tick(t, None))
            continue
        if kind == "reset":
            energy = draw(st.integers(0, 1000))
        elif kind == "ok":
            energy += draw(st.integers(0, 100_000))
        out.append(Tick(t, (energy, 7)))
    return out


@settings(max_examples=150, deadline=None)
@given(
    ticks=tick_histories(),
    epoch_ns=st.sampled_from([300 * MS, 1 * S, 2500 * MS, 10 * S]),
    lag_ns=st.sampled_from([0, 100 * MS, 350 * MS]),
    drop_stale=st.booleans(),
)
def test_epochs_partition_every_measured_interval_exactly(
    ticks: list[Tick], epoch_ns: int, lag_ns: int, drop_stale: bool
) -> None:
    max_interval_ns = 5 * S
    start = epoch_bounds(ticks[0].t_ns - lag_ns, epoch_ns)[0]
    total = 0
    gaps = 0
    covered_until = start
    while True:
        end = start + epoch_ns
        r = epoch_readings(ticks, start, end, lag_ns, max_interval_ns, drop_stale=drop_stale)
        if r is None:
            break
        for seg in r.segments:
            assert len(seg) >= 2
            assert all(a.t_ns < b.t_ns and a.energy_mj <= b.energy_mj for a, b in itertools.pairwise(seg))
            assert seg[0].t_ns - lag_ns >= start  # a segment starts in its epoch
        assert r.counter_mj == sum(seg[-1].energy_mj - seg[0].energy_mj for seg in r.segments)
        total += r.counter_mj
        gaps += r.gaps
        covered_until = end
        start = end
    # The same energy, interval by interval: every measured interval whose first reading lies in a covered epoch.
    expected = 0
    expected_gaps = 0
    for a, b in itertools.pairwise(ticks):
        if a.t_ns - lag_ns >= covered_until:
            break
        if a.energies_mj is None:
            expected_gaps += 1
        elif b.energies_mj is None:
            pass
        elif b.energy_mj < a.energy_mj or b.t_ns - a.t_ns > max_interval_ns:
            expected_gaps += 1
        else:
            expected += b.energy_mj - a.energy_mj
    assert total == expected
    assert gaps == expected_gaps


@settings(max_examples=100, deadline=None)
@given(
    offsets=st.lists(st.integers(0, 15 * MS), min_size=3, max_size=3),
    n=st.integers(5, 40),
    cut=st.integers(0, 100),
    drop=st.integers(0, 1000),
)
def test_grouping_does_not_depend_on_where_the_samples_start(offsets: list[int], n: int, cut: int, drop: int) -> None:
    devices = ("a", "b", "c")
    samples = []
    for k in range(n):
        for d, off in zip(devices, offsets, strict=True):
            if (k * 3 + devices.index(d)) != drop:
                samples.append((d, k * 100 * MS + off, k))
    samples.sort(key=lambda s: (s[1], s[0]))
    whole = group_ticks(samples, devices, 40 * MS)
    tail = group_ticks(samples[cut % len(samples) :], devices, 40 * MS)
    # Past the first (maybe partial) tick of the shorter run, both agree.
    if len(tail) > 1:
        assert tail[1:] == [t for t in whole if t.t_ns >= tail[1].t_ns]
