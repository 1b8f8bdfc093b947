"""The hourly rollup of final figures (``usage_final_hourly``), for usage reports over long ranges.

What it holds. For an hour all of whose requests are final (``meter.engine.finality``: sealed, or ended without GPU
work), one row per (tenant, model, backend) with the sums of their counts and final figures, idle shares under both
policies included. Final figures never change, so an hour's rollup is written once (``usage_rollup_hours`` lists
the hours rolled, also those that held no request) and its totals are published for good. An hour still holding a
provisional request is not rolled: reports read its raw rows.

Late rows. A request row of a rolled hour written after the hour was rolled (a gateway replica replaying its journal
after an outage, a timeline rewritten) reopens the hour: each pass looks at the rows ingested since
``usage_rollup_state.checked_ns`` (the ``ingested_ns`` index), deletes the rollup of the hours they fall in and moves
``checked_ns`` on; the hour is rolled again once its requests are final. Readers treat a rolled hour holding a row
ingested after ``checked_ns`` as not rolled, and retry when ``version`` (bumped by every change) moved under them, so
a report reads the same numbers from rollups as from raw rows (``meter.reports.usage``).

Cost. Rolling an hour reads its requests once (an index range on ``received_ns``: the sums and whether any is still
provisional, in one query); an hour that is not final yet is looked at again from its first provisional request
(kept in memory), at most once per ``recheck_ns``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sqlalchemy as sa
import structlog

from meter.engine import sql
from meter.engine.finality import final_expr
from meter.engine.usage import HOUR_NS, hour_of
from meter.store.models import Request, RequestSeal, UsageFinalHourly, UsageRollupHour, UsageRollupState, table_of

log = structlog.get_logger(__name__)

__all__ = ["ROLLUP_LOCK", "Rollup", "RollupReport"]

ROLLUP_LOCK = "usage_rollup"  # the engine's lock name (``sql.locked_transaction``) for changes to the rollup
_RQ = table_of(Request)
_RS = table_of(RequestSeal)
_UF = table_of(UsageFinalHourly)
_UH = table_of(UsageRollupHour)
_US = table_of(UsageRollupState)


@dataclass(slots=True)
class RollupReport:
    rolled_hours: int = 0
    reopened_hours: int = 0


@dataclass(slots=True)
class Rollup:
    """Rolls final hours up and reopens those late rows reached; one per engine (its memory is only a cache)."""

    max_hours_per_pass: int = 24
    recheck_ns: int = 60_000_000_000  # an hour not final yet is looked at again after this long
    _waiting: dict[int, tuple[int, int]] = field(default_factory=dict)  # hour -> (first provisional, recheck at)

    def run(self, db: sa.Engine, now_ns: int, checked_ns: int) -> RollupReport:
        """Reopen rolled hours that rows ingested since the last check fall in, then roll hours that ended before
        ``checked_ns`` (rows ingested before it are visible) and are final."""
        report = RollupReport()
        report.reopened_hours = self._reopen(db, checked_ns)
        with db.connect() as conn:
            earliest = conn.execute(sa.select(sa.func.min(_RQ.c.received_ns))).scalar()
            if earliest is None:
                return report
            first_hour = hour_of(earliest)
            rolled = set(
                conn.execute(sa.select(_UH.c.hour_start_ns).where(_UH.c.hour_start_ns >= first_hour)).scalars()
            )
        looked = 0
        for hour in range(first_hour, hour_of(checked_ns), HOUR_NS):  # hours that ended by checked_ns
            if hour in rolled:
                self._waiting.pop(hour, None)
                continue
            if looked >= self.max_hours_per_pass:
                break
            cursor, recheck_at = self._waiting.get(hour, (hour, now_ns))
            if recheck_at > now_ns:
                continue
            looked += 1
            if hour in self._waiting:  # not final when last looked at: look on from there first, without the lock
                with db.connect() as conn:
                    provisional = _first_provisional(conn, cursor, hour + HOUR_NS)
                if provisional is not None:
                    self._waiting[hour] = (provisional, now_ns + self.recheck_ns)
                    continue
            done, provisional = self._roll(db, hour, checked_ns)
            if provisional is not None:
                self._waiting[hour] = (provisional, now_ns + self.recheck_ns)
                continue
            if done:
                report.rolled_hours += 1
            self._waiting.pop(hour, None)
        if report.rolled_hours or report.reopened_hours:
            log.info("engine_usage_rollup", rolled_hours=report.rolled_hours, reopened_hours=report.reopened_hours)
        return report

    def _reopen(self, db: sa.Engine, checked_ns: int) -> int:
        with sql.locked_transaction(db, ROLLUP_LOCK) as conn:
            state = conn.execute(sa.select(_US.c.checked_ns, _US.c.version).where(_US.c.id == 1)).one_or_none()
            if state is None:
                conn.execute(sa.insert(_US).values(id=1, checked_ns=checked_ns, version=0))
                return 0
            since, version = state
            hour = _RQ.c.received_ns - _RQ.c.received_ns % HOUR_NS
            late = set(conn.execute(sa.select(hour).distinct().where(_RQ.c.ingested_ns > since)).scalars())
            hours = (
                sorted(
                    conn.execute(sa.select(_UH.c.hour_start_ns).where(_UH.c.hour_start_ns.in_(sorted(late)))).scalars()
                )
                if late
                else []
            )
            if hours:
                conn.execute(sa.delete(_UF).where(_UF.c.hour_start_ns.in_(hours)))
                conn.execute(sa.delete(_UH).where(_UH.c.hour_start_ns.in_(hours)))
                for h in hours:
                    self._waiting.pop(h, None)
            conn.execute(
                sa.update(_US)
                .where(_US.c.id == 1)
                .values(checked_ns=max(since, checked_ns), version=version + (1 if hours else 0))
            )
            return len(hours)

    def _roll(self, db: sa.Engine, hour: int, checked_ns: int) -> tuple[bool, int | None]:
        """Roll ``hour`` up if it is final and nobody rolled it meanwhile (in one transaction, reading the hour's
        requests once): (rolled, ``received_ns`` of its first provisional request or None)."""
        end = hour + HOUR_NS
        with sql.locked_transaction(db, ROLLUP_LOCK) as conn:
            if conn.execute(sa.select(_UH.c.hour_start_ns).where(_UH.c.hour_start_ns == hour)).first() is not None:
                return False, None
            backend = sa.func.coalesce(_RQ.c.backend, "")
            sums = (
                sa.select(
                    _RQ.c.tenant,
                    _RQ.c.model_id,
                    backend,
                    sa.func.count(),
                    sa.func.sum(_RQ.c.prompt_tokens),
                    sa.func.sum(_RQ.c.generated_tokens),
                    sa.func.sum(sa.case((_RQ.c.prompt_tokens_estimated, 1), else_=0)),
                    *(sa.func.sum(sa.func.coalesce(_RS.c[c], 0)) for c in _FIGURES),
                    sa.func.sum(sa.case((final_expr(_RQ, _RS), 0), else_=1)),
                )
                .select_from(_RQ.outerjoin(_RS, _RS.c.request_id == _RQ.c.request_id))
                .where(_RQ.c.received_ns >= hour, _RQ.c.received_ns < end)
                .group_by(_RQ.c.tenant, _RQ.c.model_id, backend)
            )
            groups = conn.execute(sums).all()
            if any(g[-1] for g in groups):
                return False, _first_provisional(conn, hour, end)
            cols = ["tenant", "model_id", "backend", "requests", "prompt_tokens", "generated_tokens",
                    "estimated_prompt_requests", *_FIGURES]  # fmt: skip
            if groups:
                conn.execute(
                    sa.insert(_UF),
                    [{"hour_start_ns": hour, **{c: int(v) for c, v in zip(cols[3:], g[3:-1], strict=True)},
                      **dict(zip(cols[:3], g[:3], strict=True))} for g in groups],
                )  # fmt: skip
            n = sum(int(g[3]) for g in groups)
            conn.execute(sa.insert(_UH).values(hour_start_ns=hour, rolled_at_ns=checked_ns, requests=n))
            conn.execute(sa.update(_US).where(_US.c.id == 1).values(version=_US.c.version + 1))
        return True, None


# A final request's figures: its seal's, or 0 J when it did no GPU work (``meter.engine.finality``).
_FIGURES = ("prefill_mj", "decode_mj", "idle_time_mj", "idle_tokens_mj")


def _first_provisional(conn: sa.Connection, lo_ns: int, hi_ns: int) -> int | None:
    """``received_ns`` of the first request received in [lo, hi) whose figures are not final yet."""
    return conn.execute(
        sa.select(_RQ.c.received_ns)
        .select_from(_RQ.outerjoin(_RS, _RS.c.request_id == _RQ.c.request_id))
        .where(_RQ.c.received_ns >= lo_ns, _RQ.c.received_ns < hi_ns, sa.not_(final_expr(_RQ, _RS)))
        .order_by(_RQ.c.received_ns)
        .limit(1)
    ).scalar()
