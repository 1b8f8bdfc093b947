"""Retention of raw counter samples: they are kept for audit for a configured period, then deleted."""

from __future__ import annotations

import sqlalchemy as sa

from meter.store.models import Sample, table_of


def prune_samples(engine: sa.Engine, older_than_ns: int, *, chunk_rows: int = 50_000) -> int:
    """Delete samples with ``t_ns < older_than_ns``; returns how many rows went.

    Deletes in chunks of at most ``chunk_rows`` (one transaction each), so a first prune after weeks does not hold
    a write lock on SQLite, or bloat one PostgreSQL transaction, for long.
    """
    table = table_of(Sample)
    total = 0
    while True:
        with engine.begin() as conn:
            cutoff = conn.execute(
                sa.select(table.c.t_ns)
                .where(table.c.t_ns < older_than_ns)
                .order_by(table.c.t_ns)
                .offset(chunk_rows - 1)
                .limit(1)
            ).scalar()
            if cutoff is None:  # fewer than chunk_rows left: delete them all
                total += conn.execute(sa.delete(table).where(table.c.t_ns < older_than_ns)).rowcount
                return total
            total += conn.execute(sa.delete(table).where(table.c.t_ns <= cutoff)).rowcount
