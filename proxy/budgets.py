"""Energy budgets per tenant (``[budgets]``): soft and hard limits in Wh per UTC calendar month or day, checked before
the rate limits and the shaping queue.

What counts: a tenant's *used* energy in a period is its attributed energy from the ledger — what ``GetUsage`` with
``group_by: TENANT`` over ``[period start, period end)`` reports as ``total`` (prefill + decode + its idle share
under the stored billing settings' idle policy), final and provisional figures alike. The request path never reads
the database itself: ``app`` hands in a ``UsageReader`` (``app.metering.budget_usage_reader``), called every
``refresh_s`` off the event loop; the figures of every tenant are kept in memory and every check reads them there.
All gateways on one database read the same ledger, so they agree (each within its own refresh).

The figure lags the energy: a request counts only once the metering engine has attributed the epochs it ran in
(after it ended: an open request holds its backend's attribution back), plus up to ``refresh_s``. A tenant can
therefore overrun its hard budget by what it uses in that lag.

When the usage cannot be read (the database is away), the last figures read are kept and used (logged once per
outage); until a first read succeeds every tenant counts as having used nothing: a budget never refuses everyone
because the database is down. A new period starts at 0 for everyone at its first instant, before the next read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import structlog
from prometheus_client import Counter, Gauge

from common.config import BudgetConfig, TenantBudget
from common.errors import Overloaded
from proxy.metrics import REGISTRY, tenant_label

log = structlog.get_logger(__name__)

HEADER = "x-joulegate-budget"  # HTTP response header and gRPC initial metadata
J_PER_WH = 3600.0
NS = 10**9

# (period start ns, period end ns) -> the used energy of every tenant that has any, in millijoules. Blocking.
UsageReader = Callable[[int, int], Mapping[str, int]]

USED = Gauge(
    "joulegate_budget_used_wh",
    "Energy a tenant used in the current budget period, as this gateway last read it from the ledger.",
    ["tenant"],
    registry=REGISTRY,
)
LIMIT = Gauge(
    "joulegate_budget_limit_wh", "A tenant's energy budget for the period, by kind (soft, hard).", ["tenant", "kind"],
    registry=REGISTRY,
)  # fmt: skip
REFUSED = Counter(
    "joulegate_budget_refused",
    "Requests refused because their tenant is over its hard energy budget (RESOURCE_EXHAUSTED / 429).",
    ["tenant"],
    registry=REGISTRY,
)
OVER_SOFT = Counter(
    "joulegate_budget_over_soft",
    "Requests served while their tenant is over its soft energy budget (moved to over_soft_class if set).",
    ["tenant"],
    registry=REGISTRY,
)
READ_AT = Gauge(
    "joulegate_budget_read_timestamp_seconds",
    "When this gateway last read the tenants' usage from the database (Unix time); stale while it is away.",
    registry=REGISTRY,
)


class BudgetExhausted(Overloaded):
    """A tenant is over its hard energy budget; ``retry_after_s`` is when its period ends."""


class Verdict(StrEnum):
    WITHIN = "within"
    SOFT = "soft-exceeded"
    HARD = "hard-exceeded"


def period_bounds(period: str, now_ns: int) -> tuple[int, int]:
    """``[start, end)`` in ns of the UTC calendar ``period`` ("month" or "day") holding ``now_ns``."""
    now = datetime.fromtimestamp(now_ns // NS, tz=UTC)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + timedelta(days=1)
    else:
        start = start.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return int(start.timestamp()) * NS, int(end.timestamp()) * NS


def _iso(ns: int) -> str:
    return datetime.fromtimestamp(ns // NS, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Usage:
    """What one read of the ledger found."""

    period_start_ns: int
    used_mj: Mapping[str, int]
    read_ns: int


class Budgets:
    def __init__(
        self, config: BudgetConfig, read_usage: UsageReader, *, clock_ns: Callable[[], int] = time.time_ns
    ) -> None:
        self.config = config
        self._read_usage = read_usage
        self._clock_ns = clock_ns
        self.usage: Usage | None = None  # the last successful read
        self.failing = False  # the last read failed (the database is away): the figures are the last known ones
        self.reads = 0
        self._labelled: set[str] = set()
        self._limits: dict[str, TenantBudget] = {}  # for_tenant's answers (the config is frozen)
        self._period = (0, 0)  # the last period computed: most checks fall in it

    def limits(self, tenant: str) -> TenantBudget:
        """``tenant``'s budgets: its own keys, else the defaults."""
        found = self._limits.get(tenant)
        if found is None:
            if len(self._limits) > 10_000:  # tenants come from keys, but stay bounded whatever happens
                self._limits.clear()
            found = self._limits[tenant] = self.config.for_tenant(tenant)
        return found

    def period(self, now_ns: int) -> tuple[int, int]:
        """``[start, end)`` of the budget period holding ``now_ns``."""
        start, end = self._period
        if not start <= now_ns < end:
            start, end = self._period = period_bounds(self.config.period, now_ns)
        return start, end

    # -- the figures ---------------------------------------------------------------------------------------------
    def used_wh(self, tenant: str, now_ns: int | None = None) -> float:
        """The energy ``tenant`` used in the current period, as last read (0 in a period not read yet)."""
        start, _ = self.period(self._clock_ns() if now_ns is None else now_ns)
        usage = self.usage
        if usage is None or usage.period_start_ns != start:
            return 0.0
        return usage.used_mj.get(tenant, 0) / 1000.0 / J_PER_WH

    def verdict(self, tenant: str, now_ns: int | None = None) -> Verdict:
        limits = self.limits(tenant)
        if limits.soft_wh is None and limits.hard_wh is None:
            return Verdict.WITHIN
        used = self.used_wh(tenant, now_ns)
        if limits.hard_wh is not None and used >= limits.hard_wh:
            return Verdict.HARD
        if limits.soft_wh is not None and used >= limits.soft_wh:
            return Verdict.SOFT
        return Verdict.WITHIN

    def note(self, tenant: str) -> str | None:
        """The value of the ``x-joulegate-budget`` header for ``tenant``'s calls; None within its budgets."""
        verdict = self.verdict(tenant)
        return None if verdict is Verdict.WITHIN else verdict.value

    # -- the check -----------------------------------------------------------------------------------------------
    def admit(self, tenant: str) -> str | None:
        """Check ``tenant``'s budgets: raise ``BudgetExhausted`` over the hard one; over the soft one, the class its
        call moves to (None: it keeps its own). No I/O: the figures are in memory."""
        now_ns = self._clock_ns()
        verdict = self.verdict(tenant, now_ns)
        if verdict is Verdict.WITHIN:
            return None
        limits = self.limits(tenant)
        if verdict is Verdict.SOFT:
            OVER_SOFT.labels(tenant_label(tenant)).inc()
            return limits.over_soft_class
        start, end = self.period(now_ns)
        retry_s = max(1.0, (end - now_ns) / NS)
        REFUSED.labels(tenant_label(tenant)).inc()
        raise BudgetExhausted(
            f"tenant {tenant!r} is over its hard energy budget: used {self.used_wh(tenant, now_ns):.4f} Wh of "
            f"hard_wh {limits.hard_wh:g} Wh this {self.config.period} (since {_iso(start)}); it renews at "
            f"{_iso(end)}, in {retry_s:.0f} s",
            retry_after_s=retry_s,
        )

    # -- reading the ledger --------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read every tenant's usage in the current period (blocking: run it on a thread). False when the read
        failed: the last figures stay."""
        now_ns = self._clock_ns()
        start, end = self.period(now_ns)
        try:
            used = dict(self._read_usage(start, end))
        except Exception as exc:  # the database is away (or the read failed): keep the last known figures
            if not self.failing:
                log.warning(
                    "budget_usage_unread",
                    error=(str(exc).splitlines() or [""])[0][:300],
                    kept="the last figures read" if self.usage is not None else "none: every tenant counts 0",
                )
            self.failing = True
            return False
        if self.failing:
            log.info("budget_usage_read_again")
        self.failing = False
        self.reads += 1
        self.usage = Usage(start, used, now_ns)
        self._export(used)
        READ_AT.set(now_ns / NS)
        return True

    def _export(self, used_mj: Mapping[str, int]) -> None:
        """The gauges: every tenant with a budget that used energy this period or has budgets of its own (and those
        shown before, back to 0 in a new period)."""
        for tenant in set(used_mj) | set(self.config.tenants) | self._labelled:
            limits = self.limits(tenant)
            if limits.soft_wh is None and limits.hard_wh is None:
                continue
            label = tenant_label(tenant)
            self._labelled.add(tenant)
            USED.labels(label).set(used_mj.get(tenant, 0) / 1000.0 / J_PER_WH)
            for kind, value in (("soft", limits.soft_wh), ("hard", limits.hard_wh)):
                if value is not None:
                    LIMIT.labels(label, kind).set(value)

    async def run(self) -> None:
        """Read the usage again every ``refresh_s`` until cancelled (call ``refresh`` once first)."""
        while True:
            await asyncio.sleep(self.config.refresh_s)
            await asyncio.to_thread(self.refresh)
