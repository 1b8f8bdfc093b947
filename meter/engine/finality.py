"""When a request's energy is final: its backend's attribution covers its end, and none of its epochs is stale.

The engine attributes a backend's epochs strictly in order, so one timestamp per backend says how far it got:
``attributed_until`` (the end of its last attributed epoch, in work time). An epoch is attributed only once counter
readings with work time at or after its end exist, i.e. readings taken at least the counter lag after it; so a
request that ended (``done_ns``) before that timestamp has all the readings it needs. It is *final* when, in addition,
every epoch it overlaps was computed after its row arrived (``attributed_at_ns >= ingested_ns``); with ``strict``, no
other request row overlapping those epochs arrived later either (a late neighbour changes the shares).

A request that never reached a backend used no GPU: it is final (0 J) as soon as it is finished.
"""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa

from meter.engine.sql import fetch, marks, scalar

__all__ = ["attributed_until", "request_finality"]

_SLACK_NS = 3_600_000_000_000  # the longest epoch, and more than any span overhangs its epoch


def attributed_until(conn: sa.Connection, backend: str) -> int | None:
    """End (ns, work time) of the backend's last attributed epoch; None if nothing is attributed yet."""
    return scalar(
        conn,
        "SELECT epoch_end_ns FROM backend_epochs WHERE backend = ? ORDER BY epoch_start_ns DESC LIMIT 1",
        (backend,),
    )


def request_finality(conn: sa.Connection, request_ids: Iterable[str], *, strict: bool = False) -> dict[str, bool]:
    """Whether each request's energy is final. Unknown request ids are left out of the answer."""
    ids = list(dict.fromkeys(request_ids))
    rows: list[tuple] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        rows += fetch(
            conn,
            "SELECT request_id, backend, released_ns, done_ns, ingested_ns FROM requests "
            f"WHERE request_id IN ({marks(len(chunk))})",
            chunk,
        )
    until: dict[str, int | None] = {}
    out: dict[str, bool] = {}
    for rid, backend, released, done, ingested in rows:
        if done is None:
            out[rid] = False
            continue
        if backend is None or released is None:
            out[rid] = True
            continue
        if backend not in until:
            until[backend] = attributed_until(conn, backend)
        end = until[backend]
        if end is None or end <= done:
            out[rid] = False
            continue
        epochs = fetch(
            conn,
            "SELECT epoch_start_ns, epoch_end_ns, last_reading_ns, attributed_at_ns FROM backend_epochs "
            "WHERE backend = ? AND epoch_start_ns <= ? AND epoch_start_ns >= ?",
            (backend, done, released - _SLACK_NS),
        )
        final = True
        for start, e_end, last_reading, attributed_at in epochs:
            if max(e_end, last_reading or e_end) <= released:
                continue  # the epoch (and its readings) ended before the request began
            if attributed_at < ingested:
                final = False
                break
            if strict:
                later = fetch(
                    conn,
                    "SELECT request_id FROM requests WHERE backend = ? AND ingested_ns > ? AND done_ns >= ? "
                    "AND released_ns < ? LIMIT 1",
                    (backend, attributed_at, start, max(e_end, last_reading or e_end)),
                )
                if later:
                    final = False
                    break
        out[rid] = final
    return out
