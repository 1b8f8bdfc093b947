"""Late data: which attributed epochs a late request row makes stale, and which epochs hold a request's energy. Pure.

A request row that arrives after an epoch it overlaps was attributed (``ingested_ns`` > the epoch's
``attributed_at_ns``, e.g. a gateway replica replaying its journal after an outage) makes that epoch stale; the
engine recomputes it (``meter.engine.core``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from meter.engine import sql
from meter.engine.settings import EngineSettings

__all__ = ["overlap_reach_ns", "span_end_ns", "stale_epochs"]


def overlap_reach_ns(s: EngineSettings) -> int:
    """An epoch that overlaps a request released at t starts no earlier than t minus this."""
    return 2 * s.epoch_ns + s.lag_ns + s.max_interval_ns


def span_end_ns(s: EngineSettings, epoch: sql.EpochMark) -> int:
    """Where the epoch's readings end in work time (at or after its end)."""
    return max(epoch.epoch_end_ns, (epoch.last_reading_ns or epoch.epoch_end_ns) - s.min_lag_ns)


def stale_epochs(s: EngineSettings, epochs: Sequence[sql.EpochMark], rows: Sequence[sql.IngestedRow]) -> dict[int, int]:
    """The epochs (start -> end) among ``epochs`` (by start) that one of ``rows`` overlaps and is newer than."""
    starts = [e.epoch_start_ns for e in epochs]
    ends = [e.epoch_end_ns for e in epochs]
    stale: dict[int, int] = {}
    for r in rows:
        released, done, ingested = r.released_ns, r.done_ns, r.ingested_ns
        if released is None or done is None:
            continue
        # The epochs whose span can hold [released, done]: from the one before the epoch holding `released` (its
        # readings may reach past its end) to the last one starting at or before `done + reach_ns` (an epoch looks
        # at requests that ended up to `reach_ns` before its start: a calibrated lag moves its readings earlier).
        # The same epochs that sealing waits for (``meter.engine.sealing``): one left out would hold the row's
        # seal back forever.
        first = max(0, bisect_right(ends, released) - 1)
        for e in epochs[first : bisect_right(starts, done + s.reach_ns)]:
            late = ingested > e.attributed_at_ns
            if released < span_end_ns(s, e) and done >= e.epoch_start_ns - s.reach_ns and late:
                stale[e.epoch_start_ns] = e.epoch_end_ns
    return stale
