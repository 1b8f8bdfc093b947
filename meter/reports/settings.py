"""The settings that change a bill — idle policy, grid carbon intensity, PUE — stored with the data, with history.

Why stored. A bill must not depend on who prints it: two readers of one database with different config files
(a gateway and ``joulegate report`` run elsewhere) must print the same joules and grams. So the settings live in
``billing_settings`` and every reader uses them; a config file only *seeds* the table when it is empty (the first
gateway or meter daemon that starts on a database), and operators change them explicitly
(``joulegate report settings --set ...``).

History, never retroactive. Each row applies to the requests *received* from its ``effective_ns`` on, until the next
row's. A change takes effect at the time it is made or later, never earlier, so a figure already reported (final or
not) keeps the settings it was reported under. The first row is effective from the beginning.

A reader may ask for another idle policy than the stored one (to compare); its report then says that it did.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass

import sqlalchemy as sa
import structlog

from meter.reports.types import J_PER_KWH, MJ_PER_J, IdlePolicy, InvalidQuery, ReportOptions
from meter.store import audit
from meter.store.models import BillingSettings as BillingSettingsRow
from meter.store.models import table_of
from meter.store.upsert import dialect_insert

log = structlog.get_logger(__name__)

__all__ = [
    "BillingSettings",
    "SettingsHistory",
    "add_settings",
    "load_settings",
    "seed_settings",
    "settings_history",
]

BS = table_of(BillingSettingsRow)


@dataclass(frozen=True, slots=True)
class BillingSettings:
    """One period of settings: from ``effective_ns`` (requests received at or after it) to the next period's."""

    idle_policy: IdlePolicy = IdlePolicy.NONE
    grid_g_co2e_per_kwh: float = 400.0
    pue: float = 1.2
    effective_ns: int = 0
    recorded_ns: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        if not self.grid_g_co2e_per_kwh >= 0 or self.grid_g_co2e_per_kwh == float("inf"):
            raise InvalidQuery("grid_g_co2e_per_kwh", f"must be >= 0 and finite, got {self.grid_g_co2e_per_kwh}")
        if not 1.0 <= self.pue < float("inf"):
            raise InvalidQuery("pue", f"must be >= 1 and finite, got {self.pue}")

    @property
    def co2e_g_per_mj(self) -> float:
        """Grams CO2e per millijoule measured at the GPUs: scaled by PUE to facility energy, then by the grid."""
        return self.pue * self.grid_g_co2e_per_kwh / (J_PER_KWH * MJ_PER_J)

    def co2e_g(self, total_j: float) -> float:
        return total_j * MJ_PER_J * self.co2e_g_per_mj

    def same_terms(self, other: BillingSettings) -> bool:
        """Whether the two bill alike (ignoring when and by whom they were set)."""
        return (self.idle_policy, self.grid_g_co2e_per_kwh, self.pue) == (
            other.idle_policy,
            other.grid_g_co2e_per_kwh,
            other.pue,
        )


@dataclass(frozen=True, slots=True)
class SettingsHistory:
    """Every period, oldest first; the first is effective from 0. ``stored`` is False when the database holds none
    yet and the one period is the reader's fallback (its own config)."""

    periods: tuple[BillingSettings, ...]
    stored: bool = True

    def __post_init__(self) -> None:
        if not self.periods or self.periods[0].effective_ns != 0:
            raise ValueError("a settings history starts with a period effective from 0")

    def at(self, t_ns: int) -> BillingSettings:
        """The settings of a request received at ``t_ns``."""
        k = bisect_right([p.effective_ns for p in self.periods], t_ns) - 1
        return self.periods[max(k, 0)]

    def overlapping(self, start_ns: int | None, end_ns: int) -> tuple[BillingSettings, ...]:
        """The periods that apply to some time in ``[start_ns, end_ns)`` (start None: from the beginning)."""
        lo = 0 if start_ns is None else start_ns
        out = []
        for i, p in enumerate(self.periods):
            until = self.periods[i + 1].effective_ns if i + 1 < len(self.periods) else None
            if p.effective_ns < end_ns and (until is None or until > lo):
                out.append(p)
        return tuple(out) or (self.at(lo),)


def _row(r: sa.Row) -> BillingSettings:
    return BillingSettings(
        idle_policy=IdlePolicy(r.idle_policy),
        grid_g_co2e_per_kwh=float(r.grid_g_co2e_per_kwh),
        pue=float(r.pue),
        effective_ns=int(r.effective_ns),
        recorded_ns=int(r.recorded_ns),
        source=r.source,
    )


def load_settings(conn: sa.Connection, fallback: BillingSettings) -> SettingsHistory:
    """The stored history, or ``fallback`` alone (``stored`` False) when nothing is stored yet."""
    rows = conn.execute(sa.select(BS).order_by(BS.c.effective_ns)).all()
    if not rows:
        first = BillingSettings(fallback.idle_policy, fallback.grid_g_co2e_per_kwh, fallback.pue, 0, 0, "config")
        return SettingsHistory((first,), stored=False)
    periods = [_row(r) for r in rows]
    if periods[0].effective_ns != 0:  # written by hand: the earliest row also covers what came before it
        p = periods[0]
        periods[0] = BillingSettings(p.idle_policy, p.grid_g_co2e_per_kwh, p.pue, 0, p.recorded_ns, p.source)
    return SettingsHistory(tuple(periods))


def settings_history(conn: sa.Connection, options: ReportOptions) -> SettingsHistory:
    """The history a report uses: the stored one, or the reader's fallback (default settings without one)."""
    return load_settings(conn, options.fallback or BillingSettings())


def seed_settings(engine: sa.Engine, config: BillingSettings, source: str) -> SettingsHistory:
    """Store ``config`` as the settings from the beginning if none are stored yet; return what is stored.

    A config that differs from the settings in force now is logged: the stored settings bill, not the config.
    """
    now = time.time_ns()
    insert = dialect_insert(engine)
    with engine.begin() as conn:
        conn.execute(
            insert(BS)
            .values(
                effective_ns=0,
                idle_policy=config.idle_policy.value,
                grid_g_co2e_per_kwh=config.grid_g_co2e_per_kwh,
                pue=config.pue,
                recorded_ns=now,
                source=source,
            )
            .on_conflict_do_nothing(index_elements=["effective_ns"])
        )
    with engine.connect() as conn:
        history = load_settings(conn, config)
    current = history.at(now)
    if not current.same_terms(config):
        log.warning(
            "billing_settings_differ_from_config",
            stored_idle_policy=current.idle_policy.value,
            stored_grid_g_co2e_per_kwh=current.grid_g_co2e_per_kwh,
            stored_pue=current.pue,
            config_idle_policy=config.idle_policy.value,
            config_grid_g_co2e_per_kwh=config.grid_g_co2e_per_kwh,
            config_pue=config.pue,
            detail="bills use the stored settings; change them with `joulegate report settings --set`",
        )
    return history


def add_settings(
    engine: sa.Engine, new: BillingSettings, *, effective_ns: int | None, source: str, actor: str | None = None
) -> BillingSettings:
    """Add a period effective from ``effective_ns`` (None: now), which must not lie in the past: a change never
    touches requests already received; recorded in the audit log as done by ``actor`` (default: the process,
    ``process:<source>``). Returns the row written."""
    now = time.time_ns()
    effective = now if effective_ns is None else effective_ns
    if effective < now:
        raise InvalidQuery("effective", "must not lie in the past: settings are never changed retroactively")
    row = BillingSettings(new.idle_policy, new.grid_g_co2e_per_kwh, new.pue, effective, now, source)
    with engine.begin() as conn:
        taken = conn.execute(sa.select(BS.c.effective_ns).where(BS.c.effective_ns == effective)).first()
        if taken is not None:
            raise InvalidQuery("effective", f"a change effective at {effective} ns is already stored")
        if conn.execute(sa.select(sa.func.count()).select_from(BS)).scalar_one() == 0:
            # Nothing stored yet: what applied so far was each reader's config; record these from the beginning too,
            # rather than leave the past open to whoever reads it next.
            conn.execute(
                sa.insert(BS).values(
                    effective_ns=0,
                    idle_policy=new.idle_policy.value,
                    grid_g_co2e_per_kwh=new.grid_g_co2e_per_kwh,
                    pue=new.pue,
                    recorded_ns=now,
                    source=source,
                )
            )
        conn.execute(
            sa.insert(BS).values(
                effective_ns=effective,
                idle_policy=row.idle_policy.value,
                grid_g_co2e_per_kwh=row.grid_g_co2e_per_kwh,
                pue=row.pue,
                recorded_ns=now,
                source=source,
            )
        )
        audit.record(
            conn,
            actor or f"process:{source}",
            "settings.set",
            "billing_settings",
            idle_policy=row.idle_policy.value,
            grid_g_co2e_per_kwh=row.grid_g_co2e_per_kwh,
            pue=row.pue,
            effective_ns=effective,
        )
    log.info("billing_settings_added", effective_ns=effective, source=source, settings=str(row))
    return row
