"""Usage reports: requests received in ``[start, end)`` with their whole energy, grouped, plus a total row.

Range semantics: a request belongs to the range (and to the hour/day) in which the gateway *received* it, and it
brings all of its energy along, including epochs after ``end``. So a request is billed once, in full, and the rows
of consecutive ranges add up to the rows of their union. ``GetBackendEnergy`` selects by time the other way round
(epochs that start in the range, since a backend's counter has no notion of requests); over a range that no request
straddles, e.g. the whole history, the two reconcile exactly: the usage total's ``prefill + decode`` equals the
backends' ``prefill + decode``; under TIME or TOKENS, the usage total's ``idle`` is what the requests carry of the
backends' ``idle`` (the rest stayed unshared: epochs with no request on the GPU, or a recompute that kept sealed
requests' shares as they were).
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from meter.reports.energy import (
    MAX_EPOCH_NS,
    READING_OVERHANG_NS,
    RQ,
    RS,
    backend_names,
    by_settings,
    energy_columns,
    energy_sums,
    final_expr,
    idle_column,
    tune_for_reports,
)
from meter.reports.settings import settings_history
from meter.reports.types import (
    NO_BACKEND,
    NS_PER_DAY,
    NS_PER_HOUR,
    GroupBy,
    IdlePolicy,
    InvalidQuery,
    ReportOptions,
    UsageReport,
    UsageRow,
)

OPEN_END_NS = 2**62  # stands for "not ended yet" when bounding the epochs of the requests


def rfc3339(ns: int) -> str:
    """``ns`` since the epoch as RFC 3339 in UTC with a ``Z``; whole seconds stay without a fraction."""
    seconds, rest = divmod(ns, 1_000_000_000)
    text = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{rest:09d}".rstrip("0") + "Z" if rest else text + "Z"


def check_range(start_ns: int | None, end_ns: int) -> None:
    if start_ns is not None and start_ns >= end_ns:
        raise InvalidQuery("end", "must be after start")


def _key(sel: sa.CTE, group_by: GroupBy) -> sa.ColumnElement[object]:
    match group_by:
        case GroupBy.TENANT:
            return sel.c.tenant
        case GroupBy.MODEL:
            return sel.c.model_id
        case GroupBy.BACKEND:
            return sa.func.coalesce(sel.c.backend, NO_BACKEND)
        case GroupBy.HOUR:
            return sel.c.received_ns - sel.c.received_ns % NS_PER_HOUR
        case GroupBy.DAY:
            return sel.c.received_ns - sel.c.received_ns % NS_PER_DAY
    raise InvalidQuery("group_by", f"unknown grouping {group_by!r}")


def get_usage(
    conn: sa.Connection,
    options: ReportOptions,
    *,
    end_ns: int,
    start_ns: int | None = None,
    group_by: GroupBy = GroupBy.TENANT,
    tenant: str | None = None,
) -> UsageReport:
    """Requests received in ``[start_ns, end_ns)`` (optionally of one tenant), grouped; rows sorted by key.

    Each request brings its own stored figures (``meter.reports.energy``) under the settings in force when it was
    received (or the idle policy the reader asked for), so the groups add up to the total and to the requests.
    """
    check_range(start_ns, end_ns)
    tune_for_reports(conn)
    history = settings_history(conn, options)
    conditions = [RQ.c.received_ns < end_ns]
    if start_ns is not None:
        conditions.append(RQ.c.received_ns >= start_ns)
    if tenant:
        conditions.append(RQ.c.tenant == tenant)
    sel = (
        sa.select(
            RQ.c.request_id,
            RQ.c.tenant,
            RQ.c.model_id,
            RQ.c.backend,
            RQ.c.status,
            RQ.c.received_ns,
            RQ.c.released_ns,
            RQ.c.first_token_ns,
            RQ.c.done_ns,
            RQ.c.prompt_tokens,
            RQ.c.prompt_tokens_estimated,
            RQ.c.generated_tokens,
        )
        .where(*conditions)
        .cte("sel")
    )
    backends = backend_names(conn)
    # Bounds of the epochs that may hold these requests' energy, so that rows are found by index ranges. A request
    # received at or after start was released then too: its epochs start at most an epoch (and the reach of a
    # boundary reading) earlier. The last one starts no later than the requests' latest end.
    bounds = sa.select(sa.func.max(sa.func.coalesce(RQ.c.done_ns, OPEN_END_NS))).where(*conditions)
    latest_end = conn.execute(bounds).scalar_one_or_none()
    since_ns = None if start_ns is None else start_ns - MAX_EPOCH_NS - READING_OVERHANG_NS
    sums = energy_sums(
        sa.select(sel.c.request_id),
        rows_since=None if since_ns is None else (backends, since_ns),
        rows_until=None if latest_end is None else sa.literal(latest_end),
    )
    cols = energy_columns(sums, RS)
    asked = options.idle_policy

    def idle_of(policy: IdlePolicy) -> sa.ColumnElement[int]:
        return idle_column(policy, cols["idle_time_mj"], cols["idle_tokens_mj"])

    idle = (
        idle_of(asked)
        if asked is not None
        else by_settings(sel.c.received_ns, history, lambda p: idle_of(p.idle_policy))
    )
    factor = by_settings(sel.c.received_ns, history, lambda p: sa.literal(p.co2e_g_per_mj, sa.Float))
    per = (
        sa.select(
            _key(sel, group_by).label("k"),
            sel.c.prompt_tokens,
            sel.c.generated_tokens,
            cols["prefill_mj"].label("prefill_mj"),
            cols["decode_mj"].label("decode_mj"),
            idle.label("idle_mj"),
            (sa.cast(cols["prefill_mj"] + cols["decode_mj"] + idle, sa.Float) * factor).label("co2e_g"),
            sa.case((final_expr(sel, RS), 0), else_=1).label("provisional"),
            sa.case((sel.c.prompt_tokens_estimated, 1), else_=0).label("estimated"),
        )
        .outerjoin(sums, sums.c.request_id == sel.c.request_id)
        .outerjoin(RS, RS.c.request_id == sel.c.request_id)
        .subquery("per")
    )
    stmt = (
        sa.select(
            per.c.k,
            sa.func.count(),
            sa.func.sum(per.c.prompt_tokens),
            sa.func.sum(per.c.generated_tokens),
            sa.func.sum(per.c.prefill_mj),
            sa.func.sum(per.c.decode_mj),
            sa.func.sum(per.c.idle_mj),
            sa.func.sum(per.c.provisional),
            sa.func.sum(per.c.co2e_g),
            sa.func.sum(per.c.estimated),
        )
        .group_by(per.c.k)
        .order_by(per.c.k)
    )
    rows = tuple(
        UsageRow(
            key=rfc3339(int(k)) if group_by in (GroupBy.HOUR, GroupBy.DAY) else str(k),
            requests=int(n),
            prompt_tokens=int(prompt or 0),
            generated_tokens=int(generated or 0),
            prefill_mj=int(prefill or 0),
            decode_mj=int(decode or 0),
            idle_mj=int(idle_mj or 0),
            provisional_requests=int(provisional or 0),
            co2e_g=float(co2e or 0.0),
            estimated_prompt_requests=int(estimated or 0),
        )
        for k, n, prompt, generated, prefill, decode, idle_mj, provisional, co2e, estimated in conn.execute(stmt)
    )
    total = UsageRow(
        key="total",
        requests=sum(r.requests for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        generated_tokens=sum(r.generated_tokens for r in rows),
        prefill_mj=sum(r.prefill_mj for r in rows),
        decode_mj=sum(r.decode_mj for r in rows),
        idle_mj=sum(r.idle_mj for r in rows),
        provisional_requests=sum(r.provisional_requests for r in rows),
        co2e_g=sum(r.co2e_g for r in rows),
        estimated_prompt_requests=sum(r.estimated_prompt_requests for r in rows),
    )
    stored_asked = (
        asked
        if asked is not None and any(p.idle_policy is not asked for p in history.overlapping(start_ns, end_ns))
        else None
    )
    return UsageReport(
        rows=rows,
        total=total,
        group_by=group_by,
        start_ns=start_ns,
        end_ns=end_ns,
        settings=history,
        idle_policy_asked=stored_asked,
    )
