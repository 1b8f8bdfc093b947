"""The engine's writes, each one locked transaction (``sql.locked_transaction``): nothing is half written.

Each (backend, epoch) is written as a whole: its ``request_energy`` rows and its ``backend_epochs`` row (or, for a
recompute, deleted and written again) together with the change to ``usage_hourly`` (``meter.engine.usage``), so
running twice, or recomputing, never double counts. A new epoch that another meter wrote first fails with an
``IntegrityError`` (its primary key) and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from meter.engine import sql
from meter.engine.epoch import EpochResult, Final
from meter.engine.readings import epoch_bounds
from meter.engine.usage import UsageDeltas, hour_of

__all__ = ["replace_epoch", "write_new_epochs", "write_seals", "write_seals_of", "write_unrouted"]


def write_new_epochs(
    db: sa.Engine, backends: Sequence[str], results: Sequence[EpochResult], maybe_sealed: Sequence[str]
) -> list[Final]:
    """Write epochs attributed for the first time, of ``backends``, in one transaction (COPY on PostgreSQL).
    ``maybe_sealed``: ids that ended before the latest sealed request of their backend."""
    with sql.locked_transaction(db, sorted(backends)) as conn:
        # A new epoch never holds a sealed request (sealing waits until epochs past its reach are attributed); should
        # settings have changed since, its rows stay pinned all the same.
        sealed = sql.sealed_among(conn, maybe_sealed) if maybe_sealed else set()
        finals = [r.finish((), sealed) for r in results]
        sql.insert_request_energy(conn, [row for f in finals for row in f.request_rows])
        sql.insert_backend_epochs(conn, [f.epoch_row for f in finals])
        usage = UsageDeltas()
        for f in finals:
            usage.merge(f.usage)
        sql.add_usage(conn, usage.rows())
    return finals


def replace_epoch(db: sa.Engine, result: EpochResult) -> Final:
    """Write one epoch, replacing what is stored of it (sealed requests' rows stay as they are) and adding the usage
    change; the pins are read inside the locked transaction, so that no seal can appear before the write."""
    name, start, end = result.backend, result.start, result.end
    with sql.locked_transaction(db, name) as conn:
        usage = UsageDeltas()
        exists = sql.epoch_attributed_at(conn, name, start) is not None
        pinned = sql.pinned_rows(conn, name, start) if exists else []
        sealed = {r.request_id for r in pinned} | sql.sealed_among(conn, result.request_ids)
        final = result.finish(pinned, sealed)
        usage.merge(final.usage)
        if exists:
            for c in sql.old_epoch_contribution(conn, name, start):
                home = c.done_ns is not None and start <= c.done_ns < end
                usage.add(
                    (hour_of(c.received_ns), c.tenant, c.model_id, name),
                    (int(home), c.prompt_tokens * home, c.generated_tokens * home, c.prefill_mj, c.decode_mj,
                     c.active_ns),
                    sign=-1,
                )  # fmt: skip
            sql.delete_epoch(conn, name, start)
        sql.insert_request_energy(conn, final.request_rows)
        sql.insert_backend_epoch(conn, final.epoch_row)
        sql.add_usage(conn, usage.rows())
    return final


def write_unrouted(db: sa.Engine, rows: Sequence[sql.IngestedRow], epoch_ns: int) -> int:
    """Requests that never reached a backend: a zero marker row (backend '') for each new one, counted in
    usage_hourly, exactly once. Returns how many were new."""
    epoch_of = {r.request_id: epoch_bounds(r.done_ns, epoch_ns)[0] for r in rows if r.done_ns is not None}
    if not epoch_of:
        return 0
    by_id = {r.request_id: r for r in rows}
    lo, hi = min(epoch_of.values()), max(epoch_of.values())
    with sql.locked_transaction(db, "") as conn:
        seen = sql.unrouted_markers(conn, lo, hi)
        new = [rid for rid in epoch_of if rid not in seen]
        if not new:
            return 0
        usage = UsageDeltas()
        markers = []
        for rid in new:
            r = by_id[rid]
            markers.append(sql.RequestEnergyRow(rid, epoch_of[rid], "", 0, 0, 0, 0, 0))
            usage.add(
                (hour_of(r.received_ns), r.tenant, r.model_id, ""), (1, r.prompt_tokens, r.generated_tokens, 0, 0, 0)
            )
        sql.insert_request_energy(conn, markers)
        sql.add_usage(conn, usage.rows())
    return len(new)


def write_seals(db: sa.Engine, backend: str, done_ns: dict[str, int], sealed_ns: int) -> None:
    """Seal the requests of ``done_ns`` (id -> done_ns) of one backend (``write_seals_of``)."""
    write_seals_of(db, {backend: done_ns}, sealed_ns)


def write_seals_of(db: sa.Engine, done_ns: dict[str, dict[str, int]], sealed_ns: int) -> None:
    """Seal the requests of several backends (backend -> id -> done_ns) in ONE transaction holding each backend's
    lock: their figures, the sums of their rows, go to ``request_seals``; one another meter sealed already stays as
    it is. On PostgreSQL the sums are taken and inserted by one statement (no rows travel back and forth)."""
    seals = [(rid, backend, done) for backend, of in done_ns.items() for rid, done in of.items()]
    if not seals:
        return
    with sql.locked_transaction(db, sorted(done_ns)) as conn:
        sql.seal_requests(conn, seals, sealed_ns)
