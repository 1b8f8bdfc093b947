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

import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from meter.attribution import CounterReading

__all__ = ["IdleEstimate", "busy_windows", "estimate_idle", "split_idle"]

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


def split_idle(idle_mj: int, weights: dict[str, float]) -> dict[str, int]:
    """``idle_mj`` shared in proportion to ``weights`` as integers that sum to it exactly (largest remainder, ties to
    the smaller key); every key gets 0 when the weights sum to 0 (the idle then stays unshared). Pure and
    independent of the order of ``weights``.

    This is how an epoch's idle bucket becomes the requests' stored idle shares (``request_energy.idle_time_mj``,
    ``idle_tokens_mj``): computed once, from each request's own weight, so that no report ever splits idle again.
    """
    total_w = sum(w for w in weights.values() if w > 0)
    if idle_mj <= 0 or total_w <= 0:
        return dict.fromkeys(weights, 0)
    exact = {k: idle_mj * w / total_w if w > 0 else 0.0 for k, w in weights.items()}
    out = {k: math.floor(v) for k, v in exact.items()}
    left = idle_mj - sum(out.values())
    if left > 0:
        order = sorted((k for k in exact if weights[k] > 0), key=lambda k: (out[k] - exact[k], k))
        for step in range(left):  # more than one round only if the floats drifted by a whole unit per key
            out[order[step % len(order)]] += 1
    elif left < 0:  # floats rounded a share above its exact value: take back from the smallest remainders
        order = sorted((k for k in exact if out[k] > 0), key=lambda k: (exact[k] - out[k], k))
        for step in range(-left):
            out[order[step % len(order)]] -= 1
    return out
