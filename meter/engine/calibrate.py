"""Online calibration of the power model from the counter itself: the lag, and the power of each activity class.

Why. Two assumptions of ``attribute`` decide most of its per-request error (tests/integration/test_metering_*):

- the *lag*: a reading at t shows the energy up to about t - lag. With a counter that updates every 100 ms at its
  own phase (NVML; the simulator's wall-clock grid), the true lag is that phase plus the counter's own delay, fixed
  for a run but unknown: anywhere in [0, 100 ms) + delay. A wrong lag shifts every request's window against the power
  it drew;
- the *prefill/decode power ratio*, which splits an interval that holds a prefill step and other work. It depends on
  the GPU, the model and the batch (the simulator: 650 W vs 250 + 4 W/request; an H100 near its 700 W limit in
  prefill).

How. Over reading intervals i with energy E_i, the model says E_i = P_idle t_idle,i + P_prefill t_prefill,i +
P_tokens k_prefill,i + P_active t_active,i, where the t are the time each activity class held the GPU inside the
interval's work-time window [t_i - L, t_(i+1) - L] (prefill steps first, then decode or waiting requests, else idle:
the precedence ``attribute`` uses) and k_prefill,i is the integral over the interval's prefill time of the step's
prompt tokens, in thousands (a prefill step's power grows with its tokens: a small step does not fill the GPU). The
token term is fitted only when the steps' sizes vary enough to tell it from the flat prefill power, and kept only
when it comes out positive with a positive power at zero tokens and makes at least 10 % of a mean-size step's power
(less is what misplaced steps fake under a flat power); otherwise prefill power is flat (P_tokens = 0). For
each candidate lag L on a grid, least squares gives the powers and a residual; the lag with the smallest residual,
pooled over recent epochs, wins, and its powers give the ratio (and an idle floor). The fit is refused, and the
configured values stay, when the pool is too small, a class has too little time to be measured, the residual hardly
depends on the lag (nothing to tell lags apart by), or the powers come out implausible (not positive, ratio outside
0.5..10).

Cost: building a class timeline is one sort of the epoch's request boundaries; each lag costs 4 bisections per
interval. The engine feeds an epoch in only while the pool is small, then once every ``refresh_ns`` of epochs.
"""

from __future__ import annotations

import copy
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from meter.attribution import CounterReading, RequestPhases
from meter.engine.idle import busy_windows

__all__ = ["ClassTimeline", "LagCalibrator", "PowerModel", "solve_least_squares"]

_NS_PER_S = 1e9
_MJ_PER_J = 1e3
_DISTINCT = 0.8  # the best lag's residual must be at most this share of the median lag's
_COLLINEAR = 0.995  # the token term is left out when cos^2 between it and prefill time across intervals is above this
# ...and when it makes less than this share of a mean-size step's power: a smaller slope is within what misplaced
# steps fake under a flat power (the simulator's flat 650 W prefill fits up to ~+30 W per 1,000 tokens, ~4 %)
_MIN_TOKEN_SHARE = 0.1
_N = 4  # regressors: prefill time, active time, idle time, prefill thousand-token time
assert _N == 4  # LagCalibrator.add spells the 4 columns out
_TOKENS = 3

# (released, prefill step start, prefill step end, done, prompt tokens); no step: start and end None
_Phases = tuple[int, int | None, int | None, int, int]


@dataclass(frozen=True, slots=True)
class PowerModel:
    """The calibrated model of one backend."""

    lag_ns: int
    prefill_w: float
    active_w: float  # decode, or requests held while waiting for their prefill
    idle_w: float | None  # None when too little idle time was seen
    intervals: int  # reading intervals the fit used
    residual_w: float  # root-mean-square misfit, as average power over an interval
    # Prefill power rises by this much per 1,000 prompt tokens in the step; ``prefill_w`` is the power of a step of
    # ``prefill_mean_tokens`` (the steps' mean size, weighted by their time): the flat model's prefill power.
    prefill_w_per_1k_tokens: float = 0.0
    prefill_mean_tokens: float = 0.0

    @property
    def prefill_power_ratio(self) -> float:
        """Prefill power against active power for a step of the mean size: the ratio of a flat prefill model."""
        return self.prefill_w / self.active_w

    @property
    def prefill_ratio_per_1k_tokens(self) -> float:
        """How much the ratio rises per 1,000 prompt tokens in the step (``AttributionPolicy``'s)."""
        return self.prefill_w_per_1k_tokens / self.active_w

    @property
    def prefill_ratio_at_no_tokens(self) -> float:
        """The ratio of an (empty) step of 0 tokens: ``AttributionPolicy.prefill_power_ratio`` when the per-token
        term is used too (``prefill_ratio_at_no_tokens + prefill_ratio_per_1k_tokens x tokens / 1000``)."""
        return (self.prefill_w - self.prefill_w_per_1k_tokens * self.prefill_mean_tokens / 1000) / self.active_w


class ClassTimeline:
    """When prefill steps, other active work, or nothing ran, from request timelines (the ``attribute`` model).

    ``requests`` are (released_ns, first_token_ns or None, done_ns, prompt_tokens). The prefill step of a request ends
    at its first token and lasts ``overhead + tokens / tokens_per_s`` for the prompt tokens of every request whose
    first token came within ``tolerance_ns`` of it (one batched step), but never starts before its release. Besides
    the classes' durations it integrates the prompt tokens of the steps running (``prefill_token_ns``).
    """

    def __init__(
        self,
        requests: Iterable[tuple[int, int | None, int, int]],
        tokens_per_s: float,
        overhead_ns: int,
        tolerance_ns: int,
    ) -> None:
        reqs = list(requests)
        firsts = sorted((f, p) for _r, f, _d, p in reqs if f is not None)
        first_ns = [f for f, _ in firsts]
        prefix = [0]
        for _, p in firsts:
            prefix.append(prefix[-1] + p)
        phases: list[_Phases] = []
        for released, first, done, p in reqs:
            if first is None:
                phases.append((released, None, None, done, p))
                continue
            lo = bisect_left(first_ns, first - tolerance_ns)
            hi = bisect_right(first_ns, first + tolerance_ns)
            est = overhead_ns + round((prefix[hi] - prefix[lo]) * _NS_PER_S / tokens_per_s)
            phases.append((released, max(released, first - est), first, done, p))
        self._build(phases)
        self._uncertain: tuple[list[int], list[int]] = ([], [])

    @classmethod
    def from_phases(cls, phases: Iterable[RequestPhases], uncertain: Iterable[tuple[int, int]] = ()) -> ClassTimeline:
        """The classes of requests whose phases ``meter.attribution.request_phases`` placed: the very model that
        ``attribute`` splits energy by. ``uncertain``: windows whose classes the model only guesses (abandoned
        prefills taken as cut at their leaving: when their step began is not known); the calibrator leaves the
        intervals that touch them out, since misplaced classes would bias the fitted powers (towards a smaller
        prefill/decode ratio)."""
        out = cls.__new__(cls)
        out._build([(p.released_ns, p.prefill_start_ns, p.prefill_end_ns, p.done_ns, p.prompt_tokens) for p in phases])
        out._uncertain = busy_windows(uncertain)
        return out

    def uncertain(self, a_ns: int, b_ns: int) -> bool:
        """Whether [a, b] touches a window whose classes are guessed."""
        starts, ends = self._uncertain
        k = bisect_right(starts, b_ns) - 1
        return k >= 0 and ends[k] >= a_ns

    def _build(self, phases: Iterable[_Phases]) -> None:
        """From (released, prefill step start, prefill step end, done, prompt tokens); a request without a step is
        active (it waits) over its whole window; time after its step is active (decode) until it is done."""
        events: list[tuple[int, int, int, int]] = []  # (t, change of prefilling, of active, of prefill tokens)
        add = events.append
        for released, step_start, step_end, done, tokens in phases:
            if step_start is None or step_end is None:
                if done > released:
                    add((released, 0, 1, 0))
                    add((done, 0, -1, 0))
                continue
            if step_end > step_start:
                add((step_start, 1, 0, tokens))
                add((step_end, -1, 0, -tokens))
            if step_start > released:  # waiting for its prefill: active
                add((released, 0, 1, 0))
                add((step_start, 0, -1, 0))
            if done > step_end:
                add((step_end, 0, 1, 0))
                add((done, 0, -1, 0))
        events.sort()
        times: list[int] = []
        classes: list[int] = []  # class of the piece starting at times[k]: 0 prefill, 1 active, 2 idle
        step_tokens: list[int] = []  # prompt tokens of the prefill steps running in the piece
        cum_prefill: list[int] = []
        cum_active: list[int] = []
        cum_tokens: list[int] = []  # token x ns
        prefilling = active = tokens = 0
        cum_p = cum_a = cum_t = 0
        for t, dp, da, dt_ in events:
            if times and t == times[-1]:
                prefilling += dp
                active += da
                tokens += dt_
                classes[-1] = 0 if prefilling else 1 if active else 2
                step_tokens[-1] = tokens
                continue
            if times:
                dt = t - times[-1]
                if classes[-1] == 0:
                    cum_p += dt
                    cum_t += step_tokens[-1] * dt
                elif classes[-1] == 1:
                    cum_a += dt
            prefilling += dp
            active += da
            tokens += dt_
            times.append(t)
            classes.append(0 if prefilling else 1 if active else 2)
            step_tokens.append(tokens)
            cum_prefill.append(cum_p)
            cum_active.append(cum_a)
            cum_tokens.append(cum_t)
        self._times = times
        self._cls = classes
        self._step_tokens = step_tokens
        self._cum_prefill = cum_prefill
        self._cum_active = cum_active
        self._cum_tokens = cum_tokens

    def _cum(self, t: int) -> tuple[int, int, int]:
        k = bisect_right(self._times, t) - 1
        if k < 0:
            return 0, 0, 0
        dt = t - self._times[k]
        if self._cls[k] == 0:
            return self._cum_prefill[k] + dt, self._cum_active[k], self._cum_tokens[k] + self._step_tokens[k] * dt
        return self._cum_prefill[k], self._cum_active[k] + (dt if self._cls[k] == 1 else 0), self._cum_tokens[k]

    def durations(self, a_ns: int, b_ns: int) -> tuple[int, int, int]:
        """(prefill, active, idle) ns inside [a, b]."""
        pa, aa, _ta = self._cum(a_ns)
        pb, ab, _tb = self._cum(b_ns)
        prefill, active = pb - pa, ab - aa
        return prefill, active, (b_ns - a_ns) - prefill - active

    def prefill_token_ns(self, a_ns: int, b_ns: int) -> int:
        """The integral over [a, b] of the prompt tokens of the prefill steps running (token x ns)."""
        return self._cum(b_ns)[2] - self._cum(a_ns)[2]


@dataclass(slots=True)
class _Sums:
    """Normal equations of one lag: X'X (4x4), X'y, y'y, the count, and the sum of each regressor (the total time
    of each class in s; for the token term, thousand-token s)."""

    xx: list[float]
    xy: list[float]
    time_s: list[float]
    yy: float = 0.0
    n: int = 0

    @classmethod
    def zero(cls) -> _Sums:
        return cls([0.0] * _N * _N, [0.0] * _N, [0.0] * _N)

    def add(self, other: _Sums) -> None:
        for i in range(_N * _N):
            self.xx[i] += other.xx[i]
        for i in range(_N):
            self.xy[i] += other.xy[i]
            self.time_s[i] += other.time_s[i]
        self.yy += other.yy
        self.n += other.n


def solve_least_squares(xx: Sequence[float], xy: Sequence[float], use: Sequence[int]) -> list[float] | None:
    """Solve the normal equations (``xx`` row-major, n x n for n = ``len(xy)``) restricted to the columns ``use``
    (Gaussian elimination with pivoting)."""
    m = len(use)
    n = len(xy)
    a = [[xx[n * i + j] for j in use] + [xy[i]] for i in use]
    for col in range(m):
        pivot = max(range(col, m), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-12:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(m):
            if r != col:
                f = a[r][col] / a[col][col]
                for c in range(col, m + 1):
                    a[r][c] -= f * a[col][c]
    return [a[i][m] / a[i][i] for i in range(m)]


class LagCalibrator:
    """Pooled least-squares fits of one backend, one per candidate lag, over its most recent epochs."""

    def __init__(
        self,
        lags_ns: Sequence[int],
        *,
        window_epochs: int = 30,
        min_intervals: int = 50,
        min_class_s: tuple[float, float, float] = (0.2, 1.0, 0.5),
    ) -> None:
        self.lags_ns = tuple(lags_ns)
        self._epochs: deque[list[_Sums]] = deque(maxlen=window_epochs)
        self._starts: deque[int | None] = deque(maxlen=window_epochs)  # each pooled epoch's start, if given
        self._min_intervals = min_intervals
        self._min_class_s = min_class_s
        self.model: PowerModel | None = None

    def copy(self) -> LagCalibrator:
        """An independent copy: its own deques, sharing the pooled epochs' sums (never mutated: an epoch pooled again
        replaces its entry in the deque of the copy it is added to)."""
        twin = copy.copy(self)
        twin._epochs = deque(self._epochs, maxlen=self._epochs.maxlen)
        twin._starts = deque(self._starts, maxlen=self._starts.maxlen)
        return twin

    def pooled(self, start_ns: int) -> bool:
        """Whether the epoch starting at ``start_ns`` is in the pool."""
        return start_ns in self._starts

    @property
    def intervals(self) -> int:
        return sum(e[0].n for e in self._epochs)

    @property
    def warming(self) -> bool:
        """Too few intervals pooled for a fit yet."""
        return self.intervals < self._min_intervals

    def add(
        self,
        segments: Sequence[Sequence[CounterReading]],
        timeline: ClassTimeline,
        idle_w: float | None = None,
        *,
        start_ns: int | None = None,
    ) -> PowerModel | None:
        """Add one epoch's intervals, refit, and return the model (also kept in ``model``).

        ``idle_w``: the idle floor when it is measured directly (``meter.engine.idle``); the fit then solves only for
        the prefill and active powers, which makes it steadier when idle time is scarce. ``start_ns``: the epoch's
        start; an epoch already pooled under it is replaced (its rows as they are now: a late timeline), not added
        twice."""
        per_lag = []
        first_lag, last_lag = min(self.lags_ns), max(self.lags_ns)
        # The same intervals for every lag, or the residuals could not be compared across lags: chosen once.
        intervals = [
            (a.t_ns, b.t_ns, (b.energy_mj - a.energy_mj) / _MJ_PER_J)
            for seg in segments
            for a, b in pairwise(seg)
            if not timeline.uncertain(a.t_ns - last_lag, b.t_ns - first_lag)
        ]
        cum = timeline._cum
        for lag in self.lags_ns:
            sums = _Sums.zero()
            xx, xy, time_s = sums.xx, sums.xy, sums.time_s
            for a_ns, b_ns, y in intervals:
                # As durations() and prefill_token_ns() compute them, from one lookup per end instead of two.
                pa, aa, ta = cum(a_ns - lag)
                pb, ab, tb = cum(b_ns - lag)
                p, act = pb - pa, ab - aa
                idle = ((b_ns - lag) - (a_ns - lag)) - p - act
                k_tok = (tb - ta) / 1000
                x = (p / _NS_PER_S, act / _NS_PER_S, idle / _NS_PER_S, k_tok / _NS_PER_S)
                for i in range(_N):
                    xi = x[i]
                    time_s[i] += xi
                    xy[i] += xi * y
                    row = _N * i
                    xx[row] += xi * x[0]
                    xx[row + 1] += xi * x[1]
                    xx[row + 2] += xi * x[2]
                    xx[row + 3] += xi * x[3]
                sums.yy += y * y
                sums.n += 1
            per_lag.append(sums)
        if start_ns is not None and start_ns in self._starts:
            self._epochs[self._starts.index(start_ns)] = per_lag
        else:
            self._epochs.append(per_lag)
            self._starts.append(start_ns)
        self.model = self._fit(idle_w)
        return self.model

    def _fit(self, idle_w: float | None) -> PowerModel | None:
        if self.intervals < self._min_intervals:
            return None
        best: tuple[float, int, dict[int, float], _Sums] | None = None
        residuals: list[float] = []
        for k, lag in enumerate(self.lags_ns):
            pooled = _Sums.zero()
            for epoch in self._epochs:
                pooled.add(epoch[k])
            use = [i for i in range(3) if pooled.time_s[i] >= self._min_class_s[i]]  # classes seen long enough
            if 0 not in use or 1 not in use:
                return None  # prefill and active work must both be seen to fit their ratio
            xx, xy, yy = pooled.xx, pooled.xy, pooled.yy
            if idle_w is not None:  # fit y - idle_w * t_idle on the active classes
                use = [0, 1]
                xy = [pooled.xy[i] - idle_w * xx[_N * i + 2] for i in range(_N)]
                yy = pooled.yy - 2 * idle_w * pooled.xy[2] + idle_w * idle_w * xx[_N * 2 + 2]
            fit = self._solve(xx, xy, use, pooled.time_s[_TOKENS] / pooled.time_s[0])
            if fit is None:
                continue
            powers, rss = fit
            residuals.append(yy - rss)
            if best is None or yy - rss < best[0]:
                best = (yy - rss, lag, powers, pooled)
        if best is None:
            return None
        rss, lag, powers, pooled = best
        if len(residuals) > 2 and rss > _DISTINCT * sorted(residuals)[len(residuals) // 2]:
            return None  # the residual hardly depends on the lag (e.g. a flat power draw): the lag is not identifiable
        # The prefill power of a step of the mean size (time-weighted), and its rise per 1,000 tokens.
        per_1k_w = powers.get(_TOKENS, 0.0)
        mean_tokens = 1000 * pooled.time_s[_TOKENS] / pooled.time_s[0]
        prefill_w, active_w = powers[0] + per_1k_w * mean_tokens / 1000, powers[1]
        idle_w = idle_w if idle_w is not None else powers.get(2)
        if not (prefill_w > 0 and active_w > 0 and 0.5 <= prefill_w / active_w <= 10):
            return None
        if idle_w is not None and not 0 < idle_w < active_w:
            idle_w = None
        mean_interval_s = sum(pooled.time_s[:3]) / pooled.n
        return PowerModel(
            lag_ns=lag,
            prefill_w=prefill_w,
            active_w=active_w,
            idle_w=idle_w,
            intervals=pooled.n,
            residual_w=(max(rss, 0.0) / pooled.n) ** 0.5 / mean_interval_s,
            prefill_w_per_1k_tokens=per_1k_w,
            prefill_mean_tokens=mean_tokens if per_1k_w else 0.0,
        )

    @staticmethod
    def _solve(
        xx: list[float], xy: list[float], use: list[int], mean_k_tokens: float
    ) -> tuple[dict[int, float], float] | None:
        """Powers by regressor, and the explained sum of squares, over the columns ``use``, plus the token term
        when it can be told from the flat prefill power (the steps' sizes vary) and comes out physical and material:
        a positive slope, a positive power at zero tokens, and at least ``_MIN_TOKEN_SHARE`` of the power of a step
        of the mean size (``mean_k_tokens`` thousand tokens). Without it, prefill power is flat."""
        p_tok_tt = xx[_N * _TOKENS + _TOKENS]
        cross = xx[_N * 0 + _TOKENS]
        if p_tok_tt > 0 and xx[0] > 0 and cross * cross / (xx[0] * p_tok_tt) < _COLLINEAR:
            with_tokens = [*use, _TOKENS]
            p = solve_least_squares(xx, xy, with_tokens)
            if p is not None:
                powers = dict(zip(with_tokens, p, strict=True))
                by_tokens_w = powers[_TOKENS] * mean_k_tokens
                if powers[0] > 0 and by_tokens_w >= _MIN_TOKEN_SHARE * (powers[0] + by_tokens_w):
                    return powers, sum(pi * xy[i] for i, pi in powers.items())
        p = solve_least_squares(xx, xy, use)
        if p is None:
            return None
        powers = dict(zip(use, p, strict=True))
        return powers, sum(pi * xy[i] for i, pi in powers.items())
