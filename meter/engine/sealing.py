"""Which requests became final (``meter.engine.finality``). Pure.

A request is sealed once its backend is attributed until ``done + seal_margin_ns``, no epoch that may hold its
energy is stale, and each such epoch was computed after the request's row was last written.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence

from meter.engine import sql
from meter.engine.recompute import span_end_ns
from meter.engine.settings import EngineSettings

__all__ = ["sealable"]


def sealable(
    s: EngineSettings,
    cands: Sequence[sql.SealCandidate],
    epochs: Sequence[sql.EpochMark],
    stale: Mapping[int, int],
) -> tuple[set[str], set[str]]:
    """Split candidates into those that are final now and those that wait: an epoch that may hold their energy is
    stale (``stale``: start -> end), or was computed before their row arrived. ``epochs``: the backend's epochs
    (by start) from ``overlap_reach_ns`` before the earliest release to ``reach_ns`` past the latest end."""
    starts = [e.epoch_start_ns for e in epochs]
    ends = [e.epoch_end_ns for e in epochs]
    stale_starts = sorted(stale)
    ok: set[str] = set()
    waiting: set[str] = set()
    for rid, released, done, ingested in cands:
        first = max(0, bisect_right(ends, released) - 1)
        last = bisect_right(starts, done + s.reach_ns)
        final = not any(
            released < span_end_ns(s, e) and done >= e.epoch_start_ns - s.reach_ns and e.attributed_at_ns < ingested
            for e in epochs[first:last]
        )
        if final and stale_starts:
            k = bisect_right(stale_starts, done + s.reach_ns)
            final = not any(stale[st] + s.max_interval_ns > released for st in stale_starts[:k])
        (ok if final else waiting).add(rid)
    return ok, waiting
