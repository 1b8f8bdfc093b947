"""Usage reports: requests received in ``[start, end)`` with their whole energy, grouped, plus a total row.

Range semantics: a request belongs to the range (and to the hour/day) in which the gateway *received* it, and it
brings all of its energy along, including epochs after ``end``. So a request is billed once, in full, and the rows
of consecutive ranges add up to the rows of their union. ``GetBackendEnergy`` selects by time the other way round
(epochs that start in the range, since a backend's counter has no notion of requests); over a range that no request
straddles, e.g. the whole history, the two reconcile exactly: the usage total's ``prefill + decode`` equals the
backends' ``prefill + decode``; under TIME or TOKENS, the usage total's ``idle`` is what the requests carry of the
backends' ``idle`` (the rest stayed unshared: epochs with no request on the GPU, or a recompute that kept sealed
requests' shares as they were).

Where the numbers come from. Whole hours that the engine rolled up (``meter.engine.rollup``: every request of the
hour final, so its sums never change) are read from ``usage_final_hourly``; everything else from raw rows: the
partial hours at the edges of the range, hours still holding a provisional request, hours a late row reached since
the engine last looked (``usage_rollup_state.checked_ns``), and hours in which a billing setting changed. Both give
the same integers (a test compares them); ``co2e_g`` is a float sum and may differ in its last bits. A report over a
month therefore reads ~720 rollup hours per (tenant, model, backend) plus at most half an hour of raw rows at each
edge: an edge hour covered for more than half is its rollup minus the raw rows of the part outside the range.

Raw rows are read one range at a time, and on PostgreSQL by index ranges and key probes bounded by the range alone
(``_per_request_probed``): the cost of a month's edges is that of their requests, whatever the ledger's size
(``bench/reports.py``: a month of 100M requests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from meter.engine.finality import ended_without_gpu_work_expr, final_expr
from meter.reports.energy import (
    FIGURES,
    MAX_EPOCH_NS,
    RE,
    READING_OVERHANG_NS,
    RQ,
    RS,
    backend_names,
    by_settings,
    energy_columns,
    energy_sums,
    idle_column,
    tune_for_reports,
    unsealed_figure,
)
from meter.reports.settings import SettingsHistory, settings_history
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
from meter.store.models import UsageFinalHourly, UsageRollupHour, UsageRollupState, table_of

_LONG_NS = 600_000_000_000  # seals of requests that ended more than this after a raw range are found by key
OPEN_END_NS = 2**62  # stands for "not ended yet" when bounding the epochs of the requests
UF = table_of(UsageFinalHourly)
UH = table_of(UsageRollupHour)
US = table_of(UsageRollupState)
_ATTEMPTS = 3  # reads of the rollup that the engine changed under the reader are redone this many times at most
Range = tuple[int | None, int]  # [lo, hi) in received_ns; lo None: from the beginning


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
    rollups: bool = True,
) -> UsageReport:
    """Requests received in ``[start_ns, end_ns)`` (optionally of one tenant), grouped; rows sorted by key.

    Each request brings its own stored figures (``meter.reports.energy``) under the settings in force when it was
    received (or the idle policy the reader asked for), so the groups add up to the total and to the requests.
    ``rollups``: read rolled-up hours from ``usage_final_hourly`` (False: raw rows only, the reference).
    """
    check_range(start_ns, end_ns)
    tune_for_reports(conn)
    history = settings_history(conn, options)
    sums: dict[Any, list[Any]] | None = None
    for _attempt in range(_ATTEMPTS if rollups else 0):
        plan = _rollup_plan(conn, start_ns, end_ns, history)
        if plan is None:
            break  # nothing rolled up yet
        got: dict[Any, list[Any]] = {}
        _add_raw(conn, got, plan.raw, group_by, tenant, history, options.idle_policy)
        _add_rollup(conn, got, plan.rolled, group_by, tenant, history, options.idle_policy)
        _add_raw(conn, got, plan.minus, group_by, tenant, history, options.idle_policy, sign=-1)
        if _version(conn) == plan.version:  # the engine changed no rollup while we read
            sums = {k: v for k, v in got.items() if v[0]}  # a group only in a part subtracted is gone
            break
    if sums is None:
        sums = {}
        _add_raw(conn, sums, [(start_ns, end_ns)], group_by, tenant, history, options.idle_policy)
    rows = tuple(
        UsageRow(
            key=rfc3339(int(k)) if group_by in (GroupBy.HOUR, GroupBy.DAY) else str(k),
            requests=int(n),
            prompt_tokens=int(prompt),
            generated_tokens=int(generated),
            prefill_mj=int(prefill),
            decode_mj=int(decode),
            idle_mj=int(idle_mj),
            provisional_requests=int(provisional),
            co2e_g=float(co2e),
            estimated_prompt_requests=int(estimated),
        )
        for k, (n, prompt, generated, prefill, decode, idle_mj, provisional, co2e, estimated) in sorted(sums.items())
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
    asked = options.idle_policy
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


# -- which hours come from the rollup ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    version: int  # usage_rollup_state.version when the plan was made
    rolled: list[tuple[int, int]]  # [lo, hi) ranges of whole rolled hours, read from usage_final_hourly
    raw: list[Range]  # the rest of the range, read from raw rows
    minus: list[tuple[int, int]]  # parts of rolled hours outside the range: their raw rows are subtracted


def _version(conn: sa.Connection) -> int | None:
    return conn.execute(sa.select(US.c.version).where(US.c.id == 1)).scalar()


def _rollup_plan(conn: sa.Connection, start_ns: int | None, end_ns: int, history: SettingsHistory) -> _Plan | None:
    """Split ``[start_ns, end_ns)`` into whole rolled hours that a report may read from the rollup, and the rest;
    None when nothing was ever rolled.

    An edge hour that the range covers for more than half and that may be read from the rollup is read from it,
    minus the raw rows of its part outside the range (exact: every figure of a rolled hour is a final integer, the
    same in the rollup as in its rows). So a report reads at most half an hour of raw rows at each edge.
    """
    state = conn.execute(sa.select(US.c.checked_ns, US.c.version).where(US.c.id == 1)).one_or_none()
    if state is None:
        return None
    checked_ns, version = state
    first = None if start_ns is None else start_ns - start_ns % NS_PER_HOUR  # the hour of the first edge
    last = end_ns - end_ns % NS_PER_HOUR  # the hour of the last edge (whole hours end here)
    q = sa.select(UH.c.hour_start_ns).where(UH.c.hour_start_ns <= last)
    if first is not None:
        q = q.where(UH.c.hour_start_ns >= first)
    hours = set(conn.execute(q).scalars())
    if hours:
        lo, hi = min(hours), max(hours) + NS_PER_HOUR
        hour = RQ.c.received_ns - RQ.c.received_ns % NS_PER_HOUR
        late = sa.select(hour).distinct().where(RQ.c.ingested_ns > checked_ns, RQ.c.received_ns >= lo)
        hours -= set(conn.execute(late.where(RQ.c.received_ns < hi)).scalars())  # reopened soon: raw rows now
        hours -= {
            p.effective_ns - p.effective_ns % NS_PER_HOUR for p in history.periods if p.effective_ns % NS_PER_HOUR
        }
    minus: list[tuple[int, int]] = []
    whole = {h for h in hours if (start_ns is None or h >= start_ns) and h + NS_PER_HOUR <= end_ns}
    if (
        start_ns is not None
        and first is not None
        and first != last
        and first in hours
        and 0 < start_ns - first < (NS_PER_HOUR // 2)
    ):
        whole.add(first)
        minus.append((first, start_ns))
    if last < end_ns and last != first and last in hours and last + NS_PER_HOUR - end_ns < NS_PER_HOUR // 2:
        whole.add(last)
        minus.append((end_ns, last + NS_PER_HOUR))
    rolled: list[tuple[int, int]] = []
    for h in sorted(whole):
        if rolled and rolled[-1][1] == h:
            rolled[-1] = (rolled[-1][0], h + NS_PER_HOUR)
        else:
            rolled.append((h, h + NS_PER_HOUR))
    raw: list[Range] = []
    lo_ns: int | None = start_ns
    for a, b in rolled:
        a = a if lo_ns is None else max(a, lo_ns)
        if lo_ns is None or lo_ns < a:
            raw.append((lo_ns, a))
        lo_ns = b
    if lo_ns is None or lo_ns < end_ns:
        raw.append((lo_ns, end_ns))
    return _Plan(int(version), rolled, raw, minus)


def _in_ranges(col: sa.ColumnElement[int], ranges: list[Range] | list[tuple[int, int]]) -> sa.ColumnElement[bool]:
    return sa.or_(*(sa.and_(col >= lo, col < hi) if lo is not None else col < hi for lo, hi in ranges))


def _accumulate(sums: dict[Any, list[Any]], rows: Any, sign: int = 1) -> None:
    for k, *values in rows:
        acc = sums.get(k)
        if acc is None:
            sums[k] = [sign * (v or 0) for v in values]
        else:
            for i, v in enumerate(values):
                acc[i] += sign * (v or 0)


# -- raw rows ------------------------------------------------------------------------------------------------------


def _add_raw(
    conn: sa.Connection,
    sums: dict[Any, list[Any]],
    ranges: Sequence[Range],
    group_by: GroupBy,
    tenant: str | None,
    history: SettingsHistory,
    asked: IdlePolicy | None,
    sign: int = 1,
) -> None:
    """Add (``sign`` -1: subtract) the groups of the requests received in ``ranges``, each with its own stored
    figures; one query per range, so that what each reads is bounded by that range alone (the edges of a month are
    two hours a month apart)."""
    for lo, hi in ranges:
        conditions = [RQ.c.received_ns < hi if lo is None else sa.and_(RQ.c.received_ns >= lo, RQ.c.received_ns < hi)]
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
        per: sa.Subquery | None
        if conn.dialect.name == "postgresql":
            per = _per_request_probed(sel, hi, backend_names(conn), group_by, history, asked)
        else:
            per = _per_request_joined(conn, sel, lo, conditions, group_by, history, asked)
            if per is None:
                continue  # no request in the range
        stmt = sa.select(
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
        ).group_by(per.c.k)
        _accumulate(sums, conn.execute(stmt), sign)


def _per_request(
    sel: sa.CTE,
    joined: sa.FromClause,
    cols: Mapping[str, sa.ColumnElement[int]],
    final: sa.ColumnElement[bool],
    group_by: GroupBy,
    history: SettingsHistory,
    asked: IdlePolicy | None,
) -> sa.Subquery:
    """One row per request of ``sel``: its group key, counts, figures, CO2e, and whether it is provisional."""

    def idle_of(policy: IdlePolicy) -> sa.ColumnElement[int]:
        return idle_column(policy, cols["idle_time_mj"], cols["idle_tokens_mj"])

    idle = (
        idle_of(asked)
        if asked is not None
        else by_settings(sel.c.received_ns, history, lambda p: idle_of(p.idle_policy))
    )
    factor = by_settings(sel.c.received_ns, history, lambda p: sa.literal(p.co2e_g_per_mj, sa.Float))
    return (
        sa.select(
            _key(sel, group_by).label("k"),
            sel.c.prompt_tokens,
            sel.c.generated_tokens,
            cols["prefill_mj"].label("prefill_mj"),
            cols["decode_mj"].label("decode_mj"),
            idle.label("idle_mj"),
            (sa.cast(cols["prefill_mj"] + cols["decode_mj"] + idle, sa.Float) * factor).label("co2e_g"),
            sa.case((final, 0), else_=1).label("provisional"),
            sa.case((sel.c.prompt_tokens_estimated, 1), else_=0).label("estimated"),
        )
        .select_from(joined)
        .subquery("per")
    )


def _per_request_probed(
    sel: sa.CTE, hi: int, backends: list[str], group_by: GroupBy, history: SettingsHistory, asked: IdlePolicy | None
) -> sa.Subquery:
    """PostgreSQL: what each request of the range reads stays within the range, whatever the ledger's size.

    Seals are found by a range of the ``(backend, done_ns)`` index: those of the requests' backends that ended
    between the first and the last end of the requests, at most ``_LONG_NS`` after the range (a seal keeps its
    request's ``done_ns``), joined by key. A request whose seal is not among them (never sealed, ended later, or its
    row rewritten since) is probed by key; one without a seal gets the sums of its ``request_energy`` rows, probed
    by key too. So a range of final requests reads its requests and a slice of the seals that ended meanwhile, both
    contiguous, and no ``request_energy`` row at all.
    """
    near = (
        sa.select(RS.c.request_id, RS.c.prefill_mj, RS.c.decode_mj, RS.c.idle_time_mj, RS.c.idle_tokens_mj)
        .where(
            RS.c.backend.in_(backends),
            RS.c.done_ns >= sa.select(sa.func.min(sel.c.done_ns)).scalar_subquery(),
            # A request that ran on long after the range (or whose row says so) is probed by key instead of
            # stretching the slice of seals over everything that ended meanwhile.
            RS.c.done_ns <= sa.func.least(sa.select(sa.func.max(sel.c.done_ns)).scalar_subquery(), hi + _LONG_NS),
        )
        .subquery("near")
    )
    far = (
        sa.select(RS.c.request_id, RS.c.prefill_mj, RS.c.decode_mj, RS.c.idle_time_mj, RS.c.idle_tokens_mj)
        .where(RS.c.request_id == sel.c.request_id, near.c.request_id.is_(None))
        .limit(1)  # at most one anyway (the key); keeps the planner from turning the probe into a join of tables
        .lateral("far")
    )
    energy = (
        sa.select(
            sa.func.sum(RE.c.prefill_mj).label("prefill_mj"),
            sa.func.sum(RE.c.decode_mj).label("decode_mj"),
            sa.func.sum(RE.c.idle_time_mj).label("idle_time_mj"),
            sa.func.sum(RE.c.idle_tokens_mj).label("idle_tokens_mj"),
        )
        .where(RE.c.request_id == sel.c.request_id, near.c.request_id.is_(None), far.c.request_id.is_(None))
        .lateral("energy")
    )
    joined = (
        sel.outerjoin(near, near.c.request_id == sel.c.request_id)
        .outerjoin(far, sa.true())
        .outerjoin(energy, sa.true())
    )
    cols = {c: sa.func.coalesce(near.c[c], far.c[c], unsealed_figure(sel, energy.c[c])) for c in FIGURES}
    # final_expr, with the seal found either way
    final = sa.or_(
        near.c.request_id.is_not(None),
        far.c.request_id.is_not(None),
        ended_without_gpu_work_expr(sel),
    )
    return _per_request(sel, joined, cols, final, group_by, history, asked)


def _per_request_joined(
    conn: sa.Connection,
    sel: sa.CTE,
    lo: int | None,
    conditions: list[sa.ColumnElement[bool]],
    group_by: GroupBy,
    history: SettingsHistory,
    asked: IdlePolicy | None,
) -> sa.Subquery | None:
    """SQLite (whose joins are index probes anyway): the requests outer-joined to their energy sums and seals; None
    when the range holds no request."""
    backends = backend_names(conn)
    # Bounds of the epochs that may hold these requests' energy, so that rows are found by index ranges. A request
    # received at or after start was released then too: its epochs start at most an epoch (and the reach of a
    # boundary reading) earlier. The last one starts no later than the requests' latest end.
    bounds = sa.select(sa.func.max(sa.func.coalesce(RQ.c.done_ns, OPEN_END_NS))).where(*conditions)
    latest_end = conn.execute(bounds).scalar_one_or_none()
    if latest_end is None:
        return None
    since_ns = None if lo is None else lo - MAX_EPOCH_NS - READING_OVERHANG_NS
    energy = energy_sums(
        sa.select(sel.c.request_id),
        rows_since=None if since_ns is None else (backends, since_ns),
        rows_until=sa.literal(latest_end),
    )
    joined = sel.outerjoin(energy, energy.c.request_id == sel.c.request_id).outerjoin(
        RS, RS.c.request_id == sel.c.request_id
    )
    return _per_request(sel, joined, energy_columns(sel, energy, RS), final_expr(sel, RS), group_by, history, asked)


# -- rolled-up hours -----------------------------------------------------------------------------------------------


def _rollup_key(group_by: GroupBy) -> sa.ColumnElement[object]:
    match group_by:
        case GroupBy.TENANT:
            return UF.c.tenant
        case GroupBy.MODEL:
            return UF.c.model_id
        case GroupBy.BACKEND:
            return sa.case((UF.c.backend == "", NO_BACKEND), else_=UF.c.backend)
        case GroupBy.HOUR:
            return UF.c.hour_start_ns
        case GroupBy.DAY:
            return UF.c.hour_start_ns - UF.c.hour_start_ns % NS_PER_DAY
    raise InvalidQuery("group_by", f"unknown grouping {group_by!r}")


def _add_rollup(
    conn: sa.Connection,
    sums: dict[Any, list[Any]],
    ranges: list[tuple[int, int]],
    group_by: GroupBy,
    tenant: str | None,
    history: SettingsHistory,
    asked: IdlePolicy | None,
) -> None:
    """Add the groups of the rolled-up hours in ``ranges`` (no billing setting changes inside any of them, so the
    settings of an hour's start are those of each of its requests)."""
    if not ranges:
        return

    def idle_of(policy: IdlePolicy) -> sa.ColumnElement[int]:
        return idle_column(policy, UF.c.idle_time_mj, UF.c.idle_tokens_mj)

    hour = UF.c.hour_start_ns
    idle = idle_of(asked) if asked is not None else by_settings(hour, history, lambda p: idle_of(p.idle_policy))
    factor = by_settings(hour, history, lambda p: sa.literal(p.co2e_g_per_mj, sa.Float))
    k = _rollup_key(group_by).label("k")
    conditions = [_in_ranges(hour, ranges)]
    if tenant:
        conditions.append(UF.c.tenant == tenant)
    stmt = (
        sa.select(
            k,
            sa.func.sum(UF.c.requests),
            sa.func.sum(UF.c.prompt_tokens),
            sa.func.sum(UF.c.generated_tokens),
            sa.func.sum(UF.c.prefill_mj),
            sa.func.sum(UF.c.decode_mj),
            sa.func.sum(idle),
            sa.literal(0, sa.BigInteger),
            sa.func.sum(sa.cast(UF.c.prefill_mj + UF.c.decode_mj + idle, sa.Float) * factor),
            sa.func.sum(UF.c.estimated_prompt_requests),
        )
        .where(*conditions)
        .group_by(k)
    )
    _accumulate(sums, conn.execute(stmt))
