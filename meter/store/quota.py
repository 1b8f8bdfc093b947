"""Leases of a shared per-window limit: one atomic statement that takes ``amount`` of a window's ``limit`` unless
that would exceed it (``proxy.rate_limits`` decides how much to ask for)."""

from __future__ import annotations

import sqlalchemy as sa

from meter.store.models import RateWindow, table_of
from meter.store.upsert import dialect_insert

WINDOWS = table_of(RateWindow)


def lease(conn: sa.Connection, scope: str, window_start_ns: int, amount: int, limit: int) -> int | None:
    """Take ``amount`` (1..limit) of ``scope``'s window; the window's total taken afterwards, or None (nothing
    taken) when that would pass ``limit``. Concurrent callers on any number of processes never pass it together:
    the upsert's condition is checked under the row's lock (PostgreSQL) or the database lock (SQLite)."""
    if not 1 <= amount <= limit:
        raise ValueError(f"amount {amount} must be in [1, {limit}]")
    stmt = dialect_insert(conn)(WINDOWS).values(scope=scope, window_start_ns=window_start_ns, used=amount)
    stmt = stmt.on_conflict_do_update(
        index_elements=["scope", "window_start_ns"],
        set_={"used": WINDOWS.c.used + amount},
        where=WINDOWS.c.used + amount <= limit,
    ).returning(WINDOWS.c.used)
    row = conn.execute(stmt).first()
    return None if row is None else int(row[0])


def forget_before(conn: sa.Connection, window_start_ns: int) -> None:
    """Drop windows that ended (nothing reads them)."""
    conn.execute(sa.delete(WINDOWS).where(WINDOWS.c.window_start_ns < window_start_ns))
