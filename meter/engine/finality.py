"""When a request's energy is final, and how far a backend's attribution got.

A request's figures are *final* when they can never change again:

- it did no GPU work (it never reached a backend, or its backend refused it: ``meter.timeline.did_gpu_work``) and
  it has ended: it owns 0 J, whatever the engine does later;
- or the engine has *sealed* it (``request_seals``): its backend was attributed until at least its end plus the
  counter lag, the calibration reach and the settle time (``EngineSettings.seal_margin_ns``), and no epoch that may
  hold its energy was pending a recompute. From then on a recompute (a late timeline, a calibration change) writes
  its rows back exactly as they were and books any difference to the epoch's ``adjustment_mj``.

Everything else is provisional: its figures may still change.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from meter.engine.sql import fetch, marks, scalar
from meter.timeline import REFUSED_STATUSES, did_gpu_work

__all__ = ["attributed_until", "ended_without_gpu_work_expr", "final_expr", "gpu_work_expr", "request_finality"]


def attributed_until(conn: sa.Connection, backend: str) -> int | None:
    """End (ns, work time) of the backend's last attributed epoch; None if nothing is attributed yet."""
    return scalar(
        conn,
        "SELECT epoch_end_ns FROM backend_epochs WHERE backend = ? ORDER BY epoch_start_ns DESC LIMIT 1",
        (backend,),
    )


def request_finality(conn: sa.Connection, request_ids: Iterable[str]) -> dict[str, bool]:
    """Whether each request's energy is final. Unknown request ids are left out of the answer."""
    ids = list(dict.fromkeys(request_ids))
    out: dict[str, bool] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        for rid, backend, released, first, done, status, sealed in fetch(
            conn,
            "SELECT r.request_id, r.backend, r.released_ns, r.first_token_ns, r.done_ns, r.status, s.request_id "
            "FROM requests r LEFT JOIN request_seals s ON s.request_id = r.request_id "
            f"WHERE r.request_id IN ({marks(len(chunk))})",
            chunk,
        ):
            out[rid] = sealed is not None or (done is not None and not did_gpu_work(backend, released, first, status))
    return out


def gpu_work_expr(r: sa.FromClause) -> sa.ColumnElement[bool]:
    """``meter.timeline.did_gpu_work`` for the ``requests`` row ``r``: released to a backend, and it got a first token
    or ended with a status that is not a refusal (or has not ended yet)."""
    return sa.and_(
        r.c.released_ns.is_not(None),
        r.c.backend.is_not(None),
        sa.or_(r.c.first_token_ns.is_not(None), r.c.status.is_(None), r.c.status.not_in(sorted(REFUSED_STATUSES))),
    )


def ended_without_gpu_work_expr(r: sa.FromClause) -> sa.ColumnElement[bool]:
    """Whether the request row ``r`` ended without GPU work: final at once, and it owns 0 J whatever rows it has."""
    return sa.and_(r.c.done_ns.is_not(None), sa.not_(gpu_work_expr(r)))


def final_expr(r: sa.FromClause, seal: sa.FromClause) -> sa.ColumnElement[bool]:
    """Whether the request row ``r`` (outer-joined to its ``request_seals`` row ``seal``) is final."""
    return sa.or_(seal.c.request_id.is_not(None), ended_without_gpu_work_expr(r))
