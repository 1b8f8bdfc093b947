"""Idle power, measured: the board's draw over reading intervals during which no request was on it. Pure.

Why it matters. An interval that is partly idle holds two kinds of power: the idle floor (~80 W on the simulator,
~73-120 W on an H100) and the work (250-650 W). Split by time alone, the idle piece would take the interval's
*average* power and the request would lose the difference. Given the idle power, ``attribute`` books only
``idle_power_w x idle time`` to idle and the rest to the requests, which is what the simulator's truth does.

The floor is estimated from the same counter, over intervals whose work-time window, widened by ``margin_ns`` on both
sides (the lag is only known to about one counter update), touches no request: total energy over total time, which
averages out the counter's 100 ms quantisation better than a per-interval median would.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from meter.attribution import CounterReading

__all__ = ["IdleEstimate", "busy_windows", "estimate_idle"]

_MJ_PER_W_NS = 1e-6


@dataclass(frozen=True, slots=True)
class IdleEstimate:
    energy_mj: int
    duration_ns: int

    @property
    def power_w(self) -> float | None:
        return self.energy_mj / (self.duration_ns * _MJ_PER_W_NS) if self.duration_ns > 0 else None


def busy_windows(windows: Iterable[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """The union of [start, end] windows as sorted, disjoint (starts, ends)."""
    starts: list[int] = []
    ends: list[int] = []
    for s, e in sorted(windows):
        if ends and s <= ends[-1]:
            if e > ends[-1]:
                ends[-1] = e
        else:
            starts.append(s)
            ends.append(e)
    return starts, ends


def estimate_idle(
    segments: Sequence[Sequence[CounterReading]],
    busy: tuple[list[int], list[int]],
    lag_ns: int,
    margin_ns: int,
) -> IdleEstimate:
    """Energy and duration of the reading intervals that no busy window comes near."""
    starts, ends = busy
    energy = 0
    duration = 0
    for seg in segments:
        for a, b in pairwise(seg):
            lo = a.t_ns - lag_ns - margin_ns
            hi = b.t_ns - lag_ns + margin_ns
            k = bisect_right(starts, hi) - 1  # the last window starting at or before hi
            if k >= 0 and ends[k] >= lo:
                continue
            energy += b.energy_mj - a.energy_mj
            duration += b.t_ns - a.t_ns
    return IdleEstimate(energy, duration)
