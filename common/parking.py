"""How many backends the load needs: the parking signal an autoscaler acts on (``joulegate_backends_needed{model}``).

A model's load needs ``ceil(requests in flight / pack_target)`` backends, at least one (a model stays served) and at
most the backends it has: what ``pack`` placement would keep busy. The signal holds its peak for ``hold_s``
(hysteresis): it rises at once when the load rises, and falls only once the load has stayed lower for ``hold_s``, so
an autoscaler (KEDA or an HPA on Prometheus) neither parks a backend between two bursts nor flaps. Pure: the caller
records (time, in flight) at every change and asks at any time.
"""

from __future__ import annotations

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
    """The highest value of a step function (set by ``record``) over the last ``hold_s``, in O(1) amortized time and
    memory bounded by the number of distinct values (a gateway records at every lease and release).

    Kept as steps ``(since, value)`` with strictly decreasing values: a new value pops every step at the back whose
    value is not higher and takes over the earliest popped step's start. That is exact for every window that ends at
    or after the new record (all queries do: time does not go back): a window that reaches into a popped step also
    reaches the new value's own time, or starts after it."""

    def __init__(self, hold_s: float) -> None:
        if hold_s < 0:
            raise ValueError(f"hold_s must be >= 0, got {hold_s}")
        self.hold_s = hold_s
        self._steps: deque[tuple[float, int]] = deque()
        self._last_t = float("-inf")

    def record(self, t: float, value: int) -> None:
        """The function is ``value`` from ``t`` on (times must not go back)."""
        if t < self._last_t:
            raise ValueError("times must not go back")
        self._last_t = t
        since = t
        while self._steps and self._steps[-1][1] <= value:
            since = self._steps.pop()[0]
        self._steps.append((since, value))

    def peak(self, now: float) -> int:
        """max over [now - hold_s, now] (0 before the first record); ``now`` at or after the last record."""
        start = now - self.hold_s
        # a step that ended before the window (the next one began at or before its start) can no longer matter
        while len(self._steps) >= 2 and self._steps[1][0] <= start:
            self._steps.popleft()
        return self._steps[0][1] if self._steps else 0
