"""Backend energy: per backend, what its counters measured over the epochs that start in ``[start, end)``, what the
per-request ledger holds for those epochs, the idle bucket and the adjustment booked for sealed requests, so that
anyone can check conservation: ``counter = prefill + decode + idle + adjustment``, to the mJ.

Queries go backend by backend (a loose index scan finds the names), so every one is a range scan of a primary key
or of ``request_energy (backend, epoch_start_ns)``, never a scan of the whole table.
"""

from __future__ import annotations

import sqlalchemy as sa

from meter.reports.energy import BE, RE, attributed_until, backend_names, tune_for_reports
from meter.reports.types import BackendReport
from meter.reports.usage import check_range


def get_backend_energy(conn: sa.Connection, *, end_ns: int, start_ns: int | None = None) -> tuple[BackendReport, ...]:
    """One row per backend that has epochs starting in the range, sorted by backend name."""
    check_range(start_ns, end_ns)
    tune_for_reports(conn)
    out: list[BackendReport] = []
    for name in backend_names(conn):
        epoch_cond = [BE.c.backend == name, BE.c.epoch_start_ns < end_ns]
        row_cond = [RE.c.backend == name, RE.c.epoch_start_ns < end_ns]
        if start_ns is not None:
            epoch_cond.append(BE.c.epoch_start_ns >= start_ns)
            row_cond.append(RE.c.epoch_start_ns >= start_ns)
        epochs = conn.execute(
            sa.select(
                sa.func.count(),
                sa.func.coalesce(sa.func.sum(BE.c.counter_mj), 0),
                sa.func.coalesce(sa.func.sum(BE.c.idle_mj), 0),
                sa.func.coalesce(sa.func.sum(BE.c.samples), 0),
                sa.func.coalesce(sa.func.sum(BE.c.gaps), 0),
                sa.func.coalesce(sa.func.sum(BE.c.adjustment_mj), 0),
                sa.func.coalesce(sa.func.sum(sa.case((BE.c.adjustment_mj != 0, 1), else_=0)), 0),
            ).where(*epoch_cond)
        ).one()
        if not epochs[0]:
            continue
        ledger = conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(RE.c.prefill_mj), 0),
                sa.func.coalesce(sa.func.sum(RE.c.decode_mj), 0),
                sa.func.count(sa.distinct(RE.c.request_id)),
            ).where(*row_cond)
        ).one()
        out.append(
            BackendReport(
                backend=name,
                counter_mj=int(epochs[1]),
                prefill_mj=int(ledger[0]),
                decode_mj=int(ledger[1]),
                idle_mj=int(epochs[2]),
                adjustment_mj=int(epochs[5]),
                adjusted_epochs=int(epochs[6]),
                requests=int(ledger[2]),
                samples=int(epochs[3]),
                gaps=int(epochs[4]),
                epochs=int(epochs[0]),
                attributed_until_ns=attributed_until(conn, name),
            )
        )
    return tuple(out)
