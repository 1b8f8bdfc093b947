"""Which new epochs are due, and which request rows each needs. Pure.

An epoch [a, b) of a backend is due (the *horizon*) when, in order: every device of the backend has a sample with
work time (t - lag) at or after b; no request of the backend that is still open was released before b (unless it
has been open longer than ``open_request_timeout_ns``); and now >= b + ``settle_ns``, so that timelines the ledger
writes in batches have arrived.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from meter.engine import sql
from meter.engine.readings import EpochReadings
from meter.engine.settings import EngineSettings

__all__ = ["due_epochs", "split_rows"]


def due_epochs(
    s: EngineSettings, until_ns: int, last_samples_ns: Sequence[int], now_ns: int, open_since_ns: int | None
) -> list[tuple[int, int]]:
    """The epochs (start, end) due now from ``until_ns`` on, in order, at most ``max_epochs_per_pass``.
    ``last_samples_ns``: the latest sample of each of the backend's devices; ``open_since_ns``: the earliest release
    of an open request that still holds attribution back."""
    horizon = min(min(last_samples_ns) - s.lag_ns - 2 * s.tick_gap_ns, now_ns - s.settle_ns)
    if open_since_ns is not None:
        horizon = min(horizon, open_since_ns)
    epochs = []
    start = until_ns
    for _ in range(s.max_epochs_per_pass):
        end = start - start % s.epoch_ns + s.epoch_ns
        if end > horizon:
            break
        epochs.append((start, end))
        start = end
    return epochs


def split_rows(
    s: EngineSettings, epochs: Sequence[tuple[int, int, EpochReadings]], rows: Sequence[sql.RequestRow]
) -> list[list[sql.RequestRow]]:
    """The request rows each of a backend's consecutive epochs needs (as ``sql.epoch_requests`` selects them)."""
    reach = s.reach_ns
    starts = [e[0] for e in epochs]
    his = [max(end, r.boundary_ns - s.min_lag_ns) for _s, end, r in epochs]  # non-decreasing
    out: list[list[sql.RequestRow]] = [[] for _ in epochs]
    for row in rows:
        released, done = row.released_ns, row.done_ns
        k_lo = bisect_right(his, released)  # the first epoch whose readings reach past the release
        k_hi = bisect_right(starts, done + reach)  # past the last epoch whose readings start before done
        for k in range(k_lo, k_hi):  # they overlap; the release bound only skips over-long requests
            start, end, _r = epochs[k]
            if released >= start - s.open_request_timeout_ns or done < end:
                out[k].append(row)
        if k_lo >= k_hi > 0 and done < epochs[k_hi - 1][1]:
            out[k_hi - 1].append(row)  # an over-long request, in the epoch where it ended (its home)
    return out
