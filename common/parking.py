"""How many backends the load needs: the parking signal an autoscaler acts on (``joulegate_backends_needed{model}``).

A model's load needs ``ceil(requests in flight / pack_target)`` backends, at least one (a model stays served) and at
most the backends it has: what ``pack`` placement would keep busy. The signal holds its peak for ``hold_s``
(hysteresis): it rises at once when the load rises, and falls only once the load has stayed lower for ``hold_s``, so
an autoscaler (KEDA or an HPA on Prometheus) neither parks a backend between two bursts nor flaps. Pure: the caller
records (time, in flight) at every change and asks at any time.
"""

from __future__ import annotations

import bisect
import math
from collections import deque


def backends_needed(in_flight: int, pack_target: int, backends: int) -> int:
    """``ceil(in_flight / pack_target)`` within [1, backends] (0 when there are no backends)."""
    if pack_target < 1:
        raise ValueError(f"pack_target must be >= 1, got {pack_target}")
    if backends <= 0:
        return 0
    return min(backends, max(1, math.ceil(in_flight / pack_target)))


class PeakHold:
    """The highest value of a step function (set by ``record``) over the last ``hold_s``."""

    def __init__(self, hold_s: float) -> None:
        if hold_s < 0:
            raise ValueError(f"hold_s must be >= 0, got {hold_s}")
        self.hold_s = hold_s
        self._times: deque[float] = deque()
        self._values: deque[int] = deque()

    def record(self, t: float, value: int) -> None:
        """The function is ``value`` from ``t`` on (times must not go back)."""
        if self._times and t < self._times[-1]:
            raise ValueError("times must not go back")
        self._times.append(t)
        self._values.append(value)

    def peak(self, now: float) -> int:
        """max over [now - hold_s, now] (0 before the first record). Forgets what can no longer matter."""
        start = now - self.hold_s
        # the value in force at the window's start is the last one recorded at or before it: keep it, drop the older
        while len(self._times) >= 2 and self._times[1] <= start:
            self._times.popleft()
            self._values.popleft()
        end = bisect.bisect_right(self._times, now)
        values = [v for i, v in enumerate(self._values) if i < end]
        return max(values, default=0)
