"""SQL building blocks shared by the reports: a request's energy, its idle share, and whether it is final.

Everything here is SQLAlchemy Core that runs unchanged on SQLite and PostgreSQL and leaves the arithmetic to the
database, so a report over a million requests moves aggregates, not rows, into Python.

Energy of request ``r``: the sums of its ``request_energy`` rows (prefill, decode, and its idle shares under each
policy, ``idle_time_mj`` and ``idle_tokens_mj``), or, once it is sealed, the figures in its ``request_seals`` row
(equal to those sums: a sealed request's rows never change). Idle shares are integers the engine computed from the
request's own timeline when it wrote each epoch; a report only picks the column of the idle policy that applies
(``meter.reports.settings``) and adds up. No report ever splits idle among neighbours, so every reader, any subset
of requests, and any page of a list gets the same figure for the same request.

Finality (``meter.engine.finality.final_expr``): sealed, or ended without having done GPU work (the billing rule of
``meter.timeline.did_gpu_work`` in SQL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa

from meter.engine import attributed_until
from meter.engine.finality import ended_without_gpu_work_expr
from meter.reports.settings import BillingSettings, SettingsHistory
from meter.reports.types import IdlePolicy
from meter.store.models import BackendEpoch, Request, RequestEnergy, RequestSeal, table_of

# How far past its end an epoch's readings may reach: the boundary reading is taken at least the counter lag (<= 2 s)
# plus up to one reading interval (the engine splits longer ones off as gaps: 5 s by default) after the epoch's end.
READING_OVERHANG_NS = 60_000_000_000
# The engine's longest epoch (meter.engine: epochs are at most an hour).
MAX_EPOCH_NS = 3_600_000_000_000

RQ = table_of(Request)
RE = table_of(RequestEnergy)
BE = table_of(BackendEpoch)
RS = table_of(RequestSeal)


def tune_for_reports(conn: sa.Connection) -> None:
    """Per-transaction settings for report queries: no JIT on PostgreSQL.

    The planner's estimates for the grouped energy sums are large, which switches JIT compilation on, and compiling
    costs ~0.7 s per query while the queries themselves take milliseconds.
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


def energy_sums(
    ids: sa.Select[tuple[str]],
    *,
    rows_since: tuple[Sequence[str], int] | None = None,
    rows_until: sa.ColumnElement[int] | None = None,
) -> sa.CTE:
    """Per request in ``ids`` (a one-column select of request ids) with ``request_energy`` rows: the sums of
    ``prefill_mj``, ``decode_mj``, ``idle_time_mj`` and ``idle_tokens_mj``. Requests without rows are absent:
    outer-join and coalesce to 0 (``energy_columns`` does).

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
            sa.func.sum(RE.c.idle_time_mj).label("idle_time_mj"),
            sa.func.sum(RE.c.idle_tokens_mj).label("idle_tokens_mj"),
        )
        .join(mine, mine.c.request_id == RE.c.request_id)
        .group_by(RE.c.request_id)
    )
    if rows_since is not None:
        backends, since_ns = rows_since
        sums = sums.where(RE.c.backend.in_(list(backends)), RE.c.epoch_start_ns >= since_ns)
    if rows_until is not None:
        sums = sums.where(RE.c.epoch_start_ns <= rows_until)
    return sums.cte("energy")


FIGURES = ("prefill_mj", "decode_mj", "idle_time_mj", "idle_tokens_mj")


def energy_columns(
    request: sa.FromClause, sums: sa.FromClause, seal: sa.FromClause
) -> dict[str, sa.ColumnElement[int]]:
    """A request's four figures: its seal's when sealed; else 0 when it ended without GPU work; else the sums of its
    rows (0 without rows). ``request`` is its ``requests`` row, ``sums`` its ``energy_sums`` row, ``seal`` its
    ``request_seals`` row, each outer-joined."""
    return {c: sa.func.coalesce(seal.c[c], unsealed_figure(request, sums.c[c])) for c in FIGURES}


def unsealed_figure(request: sa.FromClause, rows_sum: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
    """An unsealed request's figure from the sum of its rows: 0 for one that ended without GPU work. Such a request
    is final at once and owns 0 J (``meter.engine.finality``), as the rollup counts it, even while its rows still
    hold what an earlier version of it was given (its row was rewritten, e.g. a replay that says the backend refused
    it, and the engine has not redone its epochs yet): reading those rows would publish a final figure that changes
    when the engine catches up."""
    return sa.case((ended_without_gpu_work_expr(request), 0), else_=sa.func.coalesce(rows_sum, 0))


def idle_column(
    policy: IdlePolicy, idle_time: sa.ColumnElement[int], idle_tokens: sa.ColumnElement[int]
) -> sa.ColumnElement[int]:
    if policy is IdlePolicy.TIME:
        return idle_time
    if policy is IdlePolicy.TOKENS:
        return idle_tokens
    return sa.literal(0, sa.BigInteger)


def by_settings(
    received: sa.ColumnElement[int],
    history: SettingsHistory,
    value: Callable[[BillingSettings], sa.ColumnElement[Any]],
) -> sa.ColumnElement[Any]:
    """``value(settings)`` of the settings in force when each request was received (``received``): a CASE over the
    history's periods, newest first (there are few)."""
    periods = history.periods
    if len(periods) == 1:
        return value(periods[0])
    whens = [(received >= p.effective_ns, value(p)) for p in reversed(periods[1:])]
    return sa.case(*whens, else_=value(periods[0]))
