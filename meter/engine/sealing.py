"""Which requests became final (``meter.engine.finality``). Pure.

A request is sealed once its backend is attributed until ``done + seal_margin_ns``, no epoch that may hold its
energy is stale, and each such epoch was computed after the request's row was last written. The engine also looks
only at requests whose epochs end before every ledger heard from lately has written (``ledger_writers``): a request
another writer has not written yet may share them.
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
    reach = s.reach_ns  # settings' properties, computed once: this loop runs per candidate and epoch
    # Per epoch: (end of its span, start less reach, attributed at), the terms of the test below.
    marks = [(span_end_ns(s, e), e.epoch_start_ns - reach, e.attributed_at_ns) for e in epochs]
    stale_starts = sorted(stale)
    max_interval = s.max_interval_ns
    ok: set[str] = set()
    waiting: set[str] = set()
    for rid, released, done, ingested in cands:
        first = max(0, bisect_right(ends, released) - 1)
        last = bisect_right(starts, done + reach)
        final = True
        for span_end, reach_start, attributed_at in marks[first:last]:
            if released < span_end and done >= reach_start and attributed_at < ingested:
                final = False
                break
        if final and stale_starts:
            k = bisect_right(stale_starts, done + reach)
            final = not any(stale[st] + max_interval > released for st in stale_starts[:k])
        (ok if final else waiting).add(rid)
    return ok, waiting
