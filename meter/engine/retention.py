"""Retention of raw samples, as the engine sees it: what may go without taking an unattributed epoch's readings."""

from __future__ import annotations

from collections.abc import Iterable

from meter.engine.settings import LOOKBEHIND_NS, EngineSettings

__all__ = ["prune_cutoff_ns"]


def prune_cutoff_ns(s: EngineSettings, now_ns: int, attributed_until_ns: Iterable[int | None]) -> int | None:
    """Samples before this may be deleted: older than the retention, and never what an epoch not attributed yet (of
    any backend) still needs. None: retention is off."""
    if s.sample_retention_ns is None:
        return None
    cutoff = now_ns - s.sample_retention_ns
    for until in attributed_until_ns:
        if until is not None:
            cutoff = min(cutoff, until + s.lag_ns - LOOKBEHIND_NS)
    return cutoff
