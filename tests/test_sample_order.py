"""Samples in read order (``meter.samples.in_read_order``) under any wall-clock path, through the engine's own
reading code: the energy it counts is never more than the counter rose.

The engine orders a device's readings by their stamps and counts each rise between neighbours
(``meter.engine.readings``). Stamped by a clock that steps back (NTP), raw samples interleave later, higher counter
values with earlier ones and the same energy is counted again; ``test_raw_stamps_can_count_energy_twice`` shows that
the property below fails without the restamping, so it is a property that can fail.
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from meter.engine.readings import epoch_readings, group_ticks
from meter.engine.settings import EngineSettings
from meter.samples import MAX_RESTAMP_NS, Sample, in_read_order

MS = 1_000_000
T0 = 1_700_000_000_000_000_000
DEVICE = "gpu0"
SETTINGS = EngineSettings()

# per read: how much the counter rose since the previous read (mJ), and how far the wall clock stepped (ms; mostly 0)
reads = st.lists(
    st.tuples(st.integers(0, 500), st.one_of(st.just(0), st.just(0), st.just(0), st.integers(-3000, 3000))),
    min_size=2,
    max_size=60,
)


def _stamped(path: list[tuple[int, int]]) -> list[Sample]:
    """The sampler's raw reads: every 100 ms of real time, stamped by the stepping wall clock."""
    out, energy, offset = [], 10**9, 0
    for i, (rise, step_ms) in enumerate(path):
        energy += rise if i else 0
        offset += step_ms * MS if i else 0
        out.append(Sample(DEVICE, T0 + i * 100 * MS + offset, energy))
    return out


def _in_order(samples: list[Sample]) -> list[Sample]:
    out: list[Sample] = []
    last: int | None = None
    for s in samples:
        s = in_read_order(s, last)
        last = s.t_ns
        out.append(s)
    return out


def _counted_mj(samples: list[Sample]) -> int:
    """What the engine counts: samples sorted by time (its SQL's ORDER BY), ticks, one epoch over all of them."""
    by_time = sorted(((s.device, s.t_ns, s.energy_mj) for s in samples), key=lambda r: (r[1], r[0]))
    ticks = group_ticks(by_time, [DEVICE], SETTINGS.tick_gap_ns)
    if len(ticks) < 2:
        return 0
    got = epoch_readings(ticks, ticks[0].t_ns, ticks[-1].t_ns, 0, SETTINGS.max_interval_ns)
    return 0 if got is None else got.counter_mj


@given(reads)
def test_in_read_order_the_engine_never_counts_more_than_the_counter_rose(path: list[tuple[int, int]]) -> None:
    raw = _stamped(path)
    ordered = _in_order(raw)
    assert all(a.t_ns < b.t_ns for a, b in itertools.pairwise(ordered))  # read order is time order
    rose = raw[-1].energy_mj - raw[0].energy_mj  # type: ignore[operator]
    assert _counted_mj(ordered) <= rose
    last = None
    for r, o in zip(raw, ordered, strict=True):  # a read keeps its time unless it is at or before the last one's
        if last is None or r.t_ns > last:
            assert o == r
        else:
            assert o.t_ns == last + 1 and (o.energy_mj is None) == (last - r.t_ns > MAX_RESTAMP_NS)
        last = o.t_ns


def test_raw_stamps_can_count_energy_twice() -> None:
    """The control: 100 mJ a read, the clock stepped back 250 ms after the third read. Sorted raw, the engine counts
    900 mJ where the counter rose 500 (rises across the interleaving counted again); in read order, exactly 500."""
    path = [(0, 0), (100, 0), (100, 0), (100, -250), (100, 0), (100, 0)]
    raw = _stamped(path)
    assert raw[-1].energy_mj - raw[0].energy_mj == 500  # type: ignore[operator]
    assert _counted_mj(raw) == 900
    assert _counted_mj(_in_order(raw)) == 500
