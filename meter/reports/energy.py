"""SQL building blocks shared by the reports: a request's energy, its idle share, and whether it is final.

Everything here is SQLAlchemy Core that runs unchanged on SQLite and PostgreSQL and leaves the arithmetic to the
database, so a report over a million requests moves aggregates, not rows, into Python.

Idle shares (per epoch ``e`` of backend ``b``; only the epoch's ``request_energy`` rows take part):

- NONE: nothing is shared; idle energy stays in the backend's bucket.
- TIME: request ``r`` gets ``idle_e x active(r, e) / active_ns_total_e``.
- TOKENS: ``r``'s prompt + generated tokens are apportioned to its epochs by its active time,
  ``w(r, e) = tokens_r x active(r, e) / sum_e' active(r, e')``, and ``r`` gets ``idle_e x w(r, e) / sum_r' w(r', e)``.

An epoch whose rows weigh nothing in total (no rows, or only rows with zero active time) keeps its idle unshared.
Every other epoch gives away exactly its ``idle_mj`` (up to float rounding), so the shares plus the unshared idle
of the epochs always add up to the backends' idle buckets.

Finality of request ``r`` (see ``provisional_expr``): it never reached a backend (final, zero energy), or it has
ended, its backend is attributed until at least ``done_ns + lag``, and no epoch of its backend that may hold its
energy (starting at or before ``done_ns``, its readings reaching past ``released_ns`` in work time) was attributed
before the request row was last written (``attributed_at_ns < ingested_ns``: the row arrived or changed after that
epoch was computed). The overlap rule is the one by which the engine finds such epochs and recomputes them
(``MeteringEngine._stale_epochs``), so every request that is provisional for this reason becomes final after the
engine's next pass, and none is called final that the engine would still recompute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa

from meter.engine import attributed_until
from meter.reports.types import IdlePolicy
from meter.store.models import BackendEpoch, Request, RequestEnergy

# How far past its end an epoch's readings may reach: the boundary reading is taken at least the counter lag (<= 2 s)
# plus up to one reading interval (the engine splits longer ones off as gaps: 5 s by default) after the epoch's end.
READING_OVERHANG_NS = 60_000_000_000
# The engine's longest epoch (meter.engine: epochs are at most an hour).
MAX_EPOCH_NS = 3_600_000_000_000

RQ = Request.__table__
RE = RequestEnergy.__table__
BE = BackendEpoch.__table__


def tune_for_reports(conn: sa.Connection) -> None:
    """Per-transaction settings for report queries: no JIT on PostgreSQL.

    The planner's estimates for the correlated finality checks are large, which switches JIT compilation on, and
    compiling costs ~0.7 s per query while the queries themselves take milliseconds.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL jit = off")


def backend_names(conn: sa.Connection) -> list[str]:
    """Distinct backends of ``backend_epochs`` by a loose index scan of its primary key (one probe per backend)."""
    b = sa.select(sa.func.min(BE.c.backend).label("name")).cte("b", recursive=True)
    nxt = sa.select(sa.select(sa.func.min(BE.c.backend)).where(BE.c.backend > b.c.name).scalar_subquery()).where(
        b.c.name.is_not(None)
    )
    b = b.union_all(nxt)
    return [name for (name,) in conn.execute(sa.select(b.c.name).where(b.c.name.is_not(None)))]


def attributed_until_all(conn: sa.Connection) -> dict[str, int]:
    """``meter.engine.attributed_until`` (end of the last attributed epoch; the engine attributes epochs in order) of
    every backend that has epochs."""
    out: dict[str, int] = {}
    for name in backend_names(conn):
        until = attributed_until(conn, name)
        if until is not None:
            out[name] = until
    return out


def _f(x: sa.ColumnElement[int]) -> sa.ColumnElement[float]:
    return sa.cast(x, sa.Float)


def energy_by_request(
    ids: sa.Select[tuple[str]],
    policy: IdlePolicy,
    *,
    rows_since: tuple[Sequence[str], int] | None = None,
    rows_until: sa.ColumnElement[int] | None = None,
) -> sa.CTE:
    """Per request in ``ids`` (a one-column select of request ids): ``prefill_mj``, ``decode_mj`` (integer sums of
    its ``request_energy`` rows) and ``idle_mj`` (its float share under ``policy``). Requests without rows are
    absent: outer-join and coalesce to 0.

    ``rows_since = (backends, t_ns)`` promises that every energy row of these requests belongs to one of
    ``backends`` and to an epoch starting at or after ``t_ns``: the rows are then found by a range scan of the
    ``(backend, epoch_start_ns)`` index instead of a scan of the whole table (for requests received since a time);
    ``rows_until`` (an expression) likewise bounds the epochs' starts from above (the requests' latest end).
    """
    mine = ids.cte("ids")
    sums = (
        sa.select(
            RE.c.request_id,
            sa.func.sum(RE.c.prefill_mj).label("prefill_mj"),
            sa.func.sum(RE.c.decode_mj).label("decode_mj"),
        )
        .join(mine, mine.c.request_id == RE.c.request_id)
        .group_by(RE.c.request_id)
    )
    if rows_since is not None:
        backends, since_ns = rows_since
        sums = sums.where(RE.c.backend.in_(list(backends)), RE.c.epoch_start_ns >= since_ns)
    if rows_until is not None:
        sums = sums.where(RE.c.epoch_start_ns <= rows_until)
    if policy is IdlePolicy.NONE:
        return sums.add_columns(sa.literal(0.0, sa.Float).label("idle_mj")).cte("energy")
    if policy is IdlePolicy.TIME:
        share = sa.case(
            (BE.c.active_ns_total > 0, _f(BE.c.idle_mj) * RE.c.active_ns / _f(BE.c.active_ns_total)), else_=0.0
        )
        stmt = sums.add_columns(sa.func.sum(share).label("idle_mj")).outerjoin(
            BE, sa.and_(BE.c.backend == RE.c.backend, BE.c.epoch_start_ns == RE.c.epoch_start_ns)
        )
        return stmt.cte("energy")
    idle = _token_idle_shares(mine)
    s = sums.cte("sums")
    stmt = sa.select(
        s.c.request_id, s.c.prefill_mj, s.c.decode_mj, sa.func.coalesce(idle.c.idle_mj, 0.0).label("idle_mj")
    ).outerjoin(idle, idle.c.request_id == s.c.request_id)
    return stmt.cte("energy")


def _token_idle_shares(mine: sa.CTE) -> sa.CTE:
    """TOKENS policy: ``request_id, idle_mj`` for the requests in ``mine`` (see the module docstring)."""
    epochs = (
        sa.select(RE.c.backend, RE.c.epoch_start_ns)
        .join(mine, mine.c.request_id == RE.c.request_id)
        .distinct()
        .cte("tok_epochs")
    )
    rows = (
        sa.select(RE.c.request_id, RE.c.backend, RE.c.epoch_start_ns, RE.c.active_ns)
        .join(epochs, sa.and_(epochs.c.backend == RE.c.backend, epochs.c.epoch_start_ns == RE.c.epoch_start_ns))
        .cte("tok_rows")
    )
    re2 = RE.alias("re_all")
    active = (
        sa.select(re2.c.request_id, sa.func.sum(re2.c.active_ns).label("active_ns"))
        .where(re2.c.request_id.in_(sa.select(rows.c.request_id)))
        .group_by(re2.c.request_id)
        .cte("tok_active")
    )
    weights = (
        sa.select(
            rows.c.request_id,
            rows.c.backend,
            rows.c.epoch_start_ns,
            (_f(RQ.c.prompt_tokens + RQ.c.generated_tokens) * rows.c.active_ns / _f(active.c.active_ns)).label("w"),
        )
        .join(RQ, RQ.c.request_id == rows.c.request_id)
        .join(active, active.c.request_id == rows.c.request_id)
        .where(active.c.active_ns > 0)
        .cte("tok_w")
    )
    totals = (
        sa.select(weights.c.backend, weights.c.epoch_start_ns, sa.func.sum(weights.c.w).label("w_sum"))
        .group_by(weights.c.backend, weights.c.epoch_start_ns)
        .cte("tok_wsum")
    )
    return (
        sa.select(
            weights.c.request_id,
            sa.func.sum(_f(BE.c.idle_mj) * weights.c.w / totals.c.w_sum).label("idle_mj"),
        )
        .join(
            totals,
            sa.and_(totals.c.backend == weights.c.backend, totals.c.epoch_start_ns == weights.c.epoch_start_ns),
        )
        .join(BE, sa.and_(BE.c.backend == weights.c.backend, BE.c.epoch_start_ns == weights.c.epoch_start_ns))
        .join(mine, mine.c.request_id == weights.c.request_id)
        .where(totals.c.w_sum > 0)
        .group_by(weights.c.request_id)
        .cte("tok_idle")
    )


def longest_epoch_ns(conn: sa.Connection, backends: Sequence[str], since_ns: int | None, until_ns: int | None) -> int:
    """The longest epoch of ``backends`` starting in ``[since_ns, until_ns]`` (ends open when None); 0 if none."""
    stmt = sa.select(sa.func.max(BE.c.epoch_end_ns - BE.c.epoch_start_ns)).where(BE.c.backend.in_(list(backends)))
    if since_ns is not None:
        stmt = stmt.where(BE.c.epoch_start_ns >= since_ns)
    if until_ns is not None:
        stmt = stmt.where(BE.c.epoch_start_ns <= until_ns)
    return int(conn.execute(stmt).scalar_one_or_none() or 0)


def provisional_expr(
    r: sa.FromClause, until: Mapping[str, int], lag_ns: int, *, epoch_span_ns: int | None = None
) -> sa.ColumnElement[int]:
    """1 if the request row ``r`` (a selectable with the ``requests`` columns) is not final yet, else 0.

    ``until`` maps backend -> attributed_until (a backend missing from it has attributed nothing yet).
    ``epoch_span_ns``, when given, must be at least the length of every epoch that may overlap these requests
    (``longest_epoch_ns``): the overlap search then starts that far before ``released_ns`` (one index range scan
    per request). Without it, each request first looks up the epoch that holds its release (a second probe).
    """
    until_col: sa.ColumnElement[int] = (
        sa.case(*((r.c.backend == name, sa.literal(ns)) for name, ns in until.items()), else_=sa.literal(-1))
        if until
        else sa.literal(-1)
    )
    e = BE.alias("stale_e")
    lowest = r.c.released_ns - READING_OVERHANG_NS
    if epoch_span_ns is not None:
        first_start: sa.ColumnElement[int] = lowest - epoch_span_ns
    else:
        # From the epoch that holds released_ns - READING_OVERHANG_NS on (the latest epoch start at or before it),
        # which is right for epochs of any length.
        e0 = BE.alias("stale_e0")
        first_start = sa.func.coalesce(
            sa.select(sa.func.max(e0.c.epoch_start_ns))
            .where(e0.c.backend == r.c.backend, e0.c.epoch_start_ns <= lowest)
            .correlate(r)  # to the request row two levels up, not to the EXISTS around it
            .scalar_subquery(),
            lowest,
        )
    # An epoch's boundary reading comes after its end: the energy it measured reaches to that reading's work time
    # (its time less the lag). This is the overlap rule by which the engine recomputes epochs for late rows.
    boundary_work_ns = e.c.last_reading_ns - lag_ns
    reach = sa.case((boundary_work_ns > e.c.epoch_end_ns, boundary_work_ns), else_=e.c.epoch_end_ns)
    stale = (
        sa.exists()
        .where(
            e.c.backend == r.c.backend,
            e.c.epoch_start_ns >= first_start,
            e.c.epoch_start_ns <= r.c.done_ns,
            reach > r.c.released_ns,
            e.c.attributed_at_ns < r.c.ingested_ns,
        )
        .correlate(r)
    )
    return sa.case(
        (sa.or_(r.c.released_ns.is_(None), r.c.backend.is_(None)), 0),
        (r.c.done_ns.is_(None), 1),
        (r.c.done_ns + lag_ns > until_col, 1),
        (stale, 1),
        else_=0,
    )
