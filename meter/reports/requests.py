"""Per-request reports: one request by id, and lists of requests, newest first, in stable keyset pages.

Paging. Requests are ordered by ``(received_ns, request_id)`` descending, a total order that never changes for
existing rows, and a page token is the last row's key plus a fingerprint of the filters: the next page starts
strictly after that key, so pages never repeat or skip a row that existed when the first page was read (rows that
arrive later and sort before the cursor are simply not in this walk). A token whose fingerprint does not match
the query's filters, or that does not decode, is an ``InvalidQuery`` on ``page_token``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from meter.engine.finality import final_expr
from meter.reports.energy import RQ, RS, energy_columns, energy_sums, tune_for_reports
from meter.reports.settings import SettingsHistory, settings_history
from meter.reports.types import IdlePolicy, InvalidQuery, ReportOptions, RequestPage, RequestReport

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_VERSION = 1


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which requests to list. ``None`` or "" means no restriction on that field; times bound ``received_ns``."""

    tenant: str | None = None
    model_id: str | None = None
    backend: str | None = None
    status: str | None = None
    start_ns: int | None = None  # received at or after
    end_ns: int | None = None  # received before

    def fingerprint(self) -> str:
        raw = json.dumps(
            [self.tenant, self.model_id, self.backend, self.status, self.start_ns, self.end_ns], separators=(",", ":")
        )
        return hashlib.sha256(raw.encode()).hexdigest()[:16]


def encode_page_token(received_ns: int, request_id: str, flt: RequestFilter) -> str:
    raw = json.dumps([_TOKEN_VERSION, received_ns, request_id, flt.fingerprint()], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(token: str, flt: RequestFilter) -> tuple[int, str]:
    """The ``(received_ns, request_id)`` cursor in ``token``; InvalidQuery if it is not one of ours for ``flt``."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, received_ns, request_id, fingerprint = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise InvalidQuery("page_token", "not a token from a previous ListRequests response") from None
    if version != _TOKEN_VERSION or not isinstance(received_ns, int) or not isinstance(request_id, str):
        raise InvalidQuery("page_token", "not a token from a previous ListRequests response")
    if fingerprint != flt.fingerprint():
        raise InvalidQuery("page_token", "the filters differ from those of the request that returned this token")
    return received_ns, request_id


def _report(row: Any, history: SettingsHistory, asked: IdlePolicy | None) -> RequestReport:
    settings = history.at(row.received_ns)
    policy = asked or settings.idle_policy
    prefill, decode = int(row.prefill_mj), int(row.decode_mj)
    idle = {IdlePolicy.NONE: 0, IdlePolicy.TIME: int(row.idle_time_mj), IdlePolicy.TOKENS: int(row.idle_tokens_mj)}
    idle_mj = idle[policy]
    return RequestReport(
        request_id=row.request_id,
        tenant=row.tenant,
        model_id=row.model_id,
        backend=row.backend,
        traffic_class=row.traffic_class,
        status=row.status,
        correlation_id=row.correlation_id,
        api=row.api,
        prompt_tokens=row.prompt_tokens,
        prompt_tokens_estimated=bool(row.prompt_tokens_estimated),
        generated_tokens=row.generated_tokens,
        received_ns=row.received_ns,
        released_ns=row.released_ns,
        first_token_ns=row.first_token_ns,
        done_ns=row.done_ns,
        prefill_mj=prefill,
        decode_mj=decode,
        idle_mj=idle_mj,
        final=bool(row.final),
        idle_policy=policy,
        idle_policy_asked=asked is not None and asked is not settings.idle_policy,
        co2e_g=(prefill + decode + idle_mj) * settings.co2e_g_per_mj,
    )


def fetch_reports(conn: sa.Connection, ids: Sequence[str], options: ReportOptions) -> dict[str, RequestReport]:
    """Reports for the requests ``ids`` (missing ids are absent from the answer). Each request's figures are read
    from its own rows (or seal) only, so any set of ids gives the same figures for the same request."""
    if not ids:
        return {}
    tune_for_reports(conn)
    history = settings_history(conn, options)
    mine = sa.select(RQ).where(RQ.c.request_id.in_(list(ids))).cte("mine")
    sums = energy_sums(sa.select(mine.c.request_id))
    cols = energy_columns(mine, sums, RS)
    stmt = (
        sa.select(mine, *(c.label(name) for name, c in cols.items()), final_expr(mine, RS).label("final"))
        .outerjoin(sums, sums.c.request_id == mine.c.request_id)
        .outerjoin(RS, RS.c.request_id == mine.c.request_id)
    )
    return {row.request_id: _report(row, history, options.idle_policy) for row in conn.execute(stmt)}


def get_request_energy(conn: sa.Connection, request_id: str, options: ReportOptions) -> RequestReport | None:
    """One request's energy and finality; None if no such request was recorded."""
    return fetch_reports(conn, [request_id], options).get(request_id)


def list_requests(
    conn: sa.Connection,
    flt: RequestFilter,
    options: ReportOptions,
    *,
    page_size: int = 0,
    page_token: str = "",
) -> RequestPage:
    """One page of requests matching ``flt``, newest first. ``page_size`` 0 means 100; more than 1000 is invalid."""
    if page_size < 0 or page_size > MAX_PAGE_SIZE:
        raise InvalidQuery("page_size", f"must be between 0 and {MAX_PAGE_SIZE}, got {page_size}")
    size = page_size or DEFAULT_PAGE_SIZE
    tune_for_reports(conn)
    stmt = sa.select(RQ.c.received_ns, RQ.c.request_id)
    for column, value in (
        (RQ.c.tenant, flt.tenant),
        (RQ.c.model_id, flt.model_id),
        (RQ.c.backend, flt.backend),
        (RQ.c.status, flt.status),
    ):
        if value:
            stmt = stmt.where(column == value)
    if flt.start_ns is not None:
        stmt = stmt.where(RQ.c.received_ns >= flt.start_ns)
    if flt.end_ns is not None:
        stmt = stmt.where(RQ.c.received_ns < flt.end_ns)
    if page_token:
        received_ns, request_id = decode_page_token(page_token, flt)
        stmt = stmt.where(
            RQ.c.received_ns <= received_ns,  # a plain bound the index can seek to; the OR below is exact
            sa.or_(
                RQ.c.received_ns < received_ns,
                sa.and_(RQ.c.received_ns == received_ns, RQ.c.request_id < request_id),
            ),
        )
    stmt = stmt.order_by(RQ.c.received_ns.desc(), RQ.c.request_id.desc()).limit(size + 1)
    keys = conn.execute(stmt).all()
    more = len(keys) > size
    keys = keys[:size]
    reports = fetch_reports(conn, [k.request_id for k in keys], options)
    page = tuple(reports[k.request_id] for k in keys if k.request_id in reports)
    token = encode_page_token(keys[-1].received_ns, keys[-1].request_id, flt) if more else ""
    return RequestPage(requests=page, next_page_token=token)
