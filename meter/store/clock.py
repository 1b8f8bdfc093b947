"""How far this process's clock is from the database server's, measured over one round trip.

Requests are stamped with the clock of the gateway that served them and counter samples with the clock of the meter
that read them; attribution lines the two up, so the bill is only as fair as those clocks agree. Each ledger measures
its offset against the one clock every writer shares, the PostgreSQL server's, with its how-far mark
(``ledger_writers.clock_offset_ns``); the meter compares its own against theirs. The error of one measurement is at
most half the round trip, so a slow one is dropped (the mark keeps the last good offset). SQLite has no server clock
of its own (every writer is on the database's host): None.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import sqlalchemy as sa

_PG_NOW_US = sa.text("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")


MAX_ROUND_TRIP_NS = 10_000_000  # a slower answer is no measurement (its error could reach half of it)


def clock_offset_ns(conn: sa.Connection, clock_ns: Callable[[], int] = time.time_ns) -> int | None:
    """``clock_ns()`` minus the database server's clock, in ns, taken at the middle of one query's round trip;
    None on SQLite, and when the round trip took longer than ``MAX_ROUND_TRIP_NS`` (a busy host or network)."""
    if conn.dialect.name != "postgresql":
        return None
    before = clock_ns()
    server_us = conn.execute(_PG_NOW_US).scalar_one()
    after = clock_ns()
    if after - before > MAX_ROUND_TRIP_NS:
        return None
    return (before + after) // 2 - int(server_us) * 1000
