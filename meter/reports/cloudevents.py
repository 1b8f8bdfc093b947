"""Final per-request energy as CloudEvents (v1.0, structured JSON), the format OpenMeter and similar metering
services ingest, so a billing pipeline takes energy beside tokens.

One event per request that did GPU work, sent once it is *final* (sealed: its figures never change again,
``meter.engine.finality``). The event id is the request id, so a sink that deduplicates by (source, id) — OpenMeter
does — counts a request once however often it is sent: exports are at-least-once and may overlap freely. The
subject is the tenant (OpenMeter's customer key); ``time`` is when the request was received, the instant the bill
dates it by. Requests that did no GPU work (refused, never released) are final at 0 J and are not sent.

Which requests: those sealed after a cursor ``(sealed_ns, request_id)``, in that order — a late row sealed today
for a request received last week is still sent, which a cursor on received time would miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from meter.reports.requests import fetch_reports
from meter.reports.types import ReportOptions, RequestReport
from meter.reports.usage import rfc3339
from meter.store.models import RequestSeal, table_of

EVENT_TYPE = "io.joulegate.request.energy"
SEALS = table_of(RequestSeal)


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """Everything sealed at or before (``sealed_ns``, ``request_id``) has been handed over."""

    sealed_ns: int = 0
    request_id: str = ""


def usage_event(r: RequestReport, source: str) -> dict[str, Any]:
    """The CloudEvent of one final request (``source``: who reports, e.g. ``joulegate/prod-eu``)."""
    return {
        "specversion": "1.0",
        "type": EVENT_TYPE,
        "source": source,
        "id": r.request_id,
        "time": rfc3339(r.received_ns),
        "subject": r.tenant,
        "datacontenttype": "application/json",
        "data": {
            "model": r.model_id,
            "backend": r.backend,
            "traffic_class": r.traffic_class,
            "status": r.status,
            "prompt_tokens": r.prompt_tokens,
            "prompt_tokens_estimated": r.prompt_tokens_estimated,
            "generated_tokens": r.generated_tokens,
            "prefill_j": r.prefill_j,
            "decode_j": r.decode_j,
            "idle_j": r.idle_j,
            "total_j": r.total_j,
            "total_wh": r.total_j / 3600,
            "co2e_g": r.co2e_g,
            "idle_policy": r.idle_policy.value,
        },
    }


def sealed_after(
    conn: sa.Connection, cursor: Cursor, options: ReportOptions, *, limit: int = 1000
) -> tuple[list[RequestReport], Cursor]:
    """Up to ``limit`` final requests sealed after ``cursor``, in seal order, and the cursor past them."""
    stmt = (
        sa.select(SEALS.c.sealed_ns, SEALS.c.request_id)
        .where(sa.tuple_(SEALS.c.sealed_ns, SEALS.c.request_id) > sa.tuple_(cursor.sealed_ns, cursor.request_id))
        .order_by(SEALS.c.sealed_ns, SEALS.c.request_id)
        .limit(limit)
    )
    keys = conn.execute(stmt).all()
    if not keys:
        return [], cursor
    reports = fetch_reports(conn, [k.request_id for k in keys], options)
    final = [reports[k.request_id] for k in keys if k.request_id in reports and reports[k.request_id].final]
    return final, Cursor(keys[-1].sealed_ns, keys[-1].request_id)
