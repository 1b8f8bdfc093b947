"""Energy budgets per tenant (``[budgets]``): soft and hard limits in Wh per UTC calendar month or day, checked before
the rate limits and the shaping queue.

What counts: a tenant's *used* energy in a period is its attributed energy from the ledger — what ``GetUsage`` with
``group_by: TENANT`` over ``[period start, period end)`` reports as ``total`` (prefill + decode + its idle share
under the stored billing settings' idle policy), final and provisional figures alike. The request path never reads
the database itself: ``app`` hands in a ``UsageReader`` (``app.metering.budget_usage_reader``), called every
``refresh_s`` off the event loop; the figures of every tenant are kept in memory and every check reads them there.
All gateways on one database read the same ledger, so they agree (each within its own refresh).

The figure lags the energy: a request counts only once the metering engine has attributed the epochs it ran in (after
it ended: an open request holds its backend's attribution back), plus up to ``refresh_s``. So that a tenant cannot
spend that lag many times over (a thousand long streams opened at once all pass a check of the ledger's figure), every
call admitted holds a *reservation* on this gateway until the ledger's figure includes it: at admission its estimate
(estimated prompt tokens and ``max_new_tokens``, at its model's energy per prompt and per generated token over the
recent attributed requests of every tenant, as last read), at its end its prompt and generated tokens at the same
rates, dropped once a read finds its backend attributed past its end (the read takes the attribution's frontier before
the usage, so the usage holds what the frontier passed). A tenant is over a budget when its used energy plus what it
holds in reservations reaches it. Until a read has found tokens with energy, the rates are unknown and calls reserve
nothing. Reservations are per gateway: each replica counts its own calls in flight.

When the usage cannot be read (the database is away), the last figures read are kept and used (logged once per
outage); until a first read succeeds every tenant counts as having used nothing: a budget never refuses everyone
because the database is down. A new period starts at 0 for everyone at its first instant, before the next read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
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


@dataclass(frozen=True, slots=True)
class LedgerFigures:
    """What one read of the ledger gives the budgets."""

    used_mj: Mapping[str, int]  # per tenant, the period's energy so far
    # per backend asked for: the end (ns) of its attribution, read before ``used_mj`` (requests that ended before it
    # are in ``used_mj``); a backend with nothing attributed is left out
    attributed_until_ns: Mapping[str, int] = field(default_factory=dict)
    # per model: (mJ per prompt token, mJ per generated token) over every tenant's recent attributed requests
    mj_per_token: Mapping[str, tuple[float, float]] = field(default_factory=dict)


# (period start ns, period end ns, the backends whose attribution frontier to read) -> the figures. Blocking.
UsageReader = Callable[[int, int, Collection[str]], LedgerFigures]

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
RESERVED = Gauge(
    "joulegate_budget_reserved_wh",
    "Energy this gateway holds against a tenant's budget for calls in flight or not yet in the ledger's figure.",
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


@dataclass(frozen=True, slots=True)
class _Held:
    """A call in flight's reservation: its tenant, the period it counts in, its model, its estimate (mJ)."""

    tenant: str
    period_start_ns: int
    model_id: str
    mj: float


# Ended calls' reservations, summed by (period start, tenant, backend, the second after the end, in ns): a meter
# that lags (or is away) for an hour costs a gateway one entry per tenant, backend and second, not one per call.
_EndedKey = tuple[int, str, str, int]


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
        self.rates: dict[str, tuple[float, float]] = {}  # model -> (mJ per prompt token, per generated token)
        self._open: dict[str, _Held] = {}  # request id -> the reservation of a call in flight
        self._ended: dict[_EndedKey, float] = {}  # ended calls' reservations, until the ledger's figure holds them
        self._reserved: dict[tuple[int, str], float] = {}  # (period start, tenant) -> the sum of its reservations

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

    def reserved_wh(self, tenant: str, now_ns: int | None = None) -> float:
        """What this gateway holds against ``tenant``'s budget in the current period: its calls in flight, and ended
        calls the ledger's figure does not hold yet (estimates)."""
        start, _ = self.period(self._clock_ns() if now_ns is None else now_ns)
        return self._reserved.get((start, tenant), 0.0) / 1000.0 / J_PER_WH

    def verdict(self, tenant: str, now_ns: int | None = None) -> Verdict:
        limits = self.limits(tenant)
        if limits.soft_wh is None and limits.hard_wh is None:
            return Verdict.WITHIN
        used = self.used_wh(tenant, now_ns) + self.reserved_wh(tenant, now_ns)
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
    def admit(
        self,
        tenant: str,
        request_id: str | None = None,
        *,
        model_id: str = "",
        prompt_tokens: int = 0,
        max_new_tokens: int = 0,
    ) -> str | None:
        """Check ``tenant``'s budgets: raise ``BudgetExhausted`` over the hard one; over the soft one, the class its
        call moves to (None: it keeps its own). Admitted with a ``request_id``, the call holds a reservation of its
        estimate (``prompt_tokens`` estimated, ``max_new_tokens``, at ``model_id``'s rates) until ``ended`` and the
        ledger's figure hold it. No I/O: the figures are in memory."""
        now_ns = self._clock_ns()
        limits = self.limits(tenant)
        if limits.soft_wh is None and limits.hard_wh is None:
            return None
        verdict = self.verdict(tenant, now_ns)
        if verdict is Verdict.HARD:
            start, end = self.period(now_ns)
            retry_s = max(1.0, (end - now_ns) / NS)
            REFUSED.labels(tenant_label(tenant)).inc()
            held_wh = self.reserved_wh(tenant, now_ns)
            raise BudgetExhausted(
                f"tenant {tenant!r} is over its hard energy budget: used {self.used_wh(tenant, now_ns):.4f} Wh "
                + (f"and holds {held_wh:.4f} Wh for calls in flight or not yet attributed " if held_wh else "")
                + f"of hard_wh {limits.hard_wh:g} Wh this {self.config.period} (since {_iso(start)}); it renews at "
                f"{_iso(end)}, in {retry_s:.0f} s",
                retry_after_s=retry_s,
            )
        if request_id is not None and request_id not in self._open:
            start, _ = self.period(now_ns)
            held = _Held(tenant, start, model_id, self._estimate_mj(model_id, prompt_tokens, max_new_tokens))
            self._open[request_id] = held
            self._add(start, tenant, held.mj)
        if verdict is Verdict.SOFT:
            OVER_SOFT.labels(tenant_label(tenant)).inc()
            return limits.over_soft_class
        return None

    def ended(
        self, request_id: str, backend: str | None, done_ns: int, *, prompt_tokens: int, generated_tokens: int
    ) -> None:
        """A call admitted with ``request_id`` ended: its reservation becomes its tokens at the known rates, held
        until a read finds ``backend`` attributed past the second after ``done_ns`` (ended calls are summed by that
        second); a call that reached no backend (None) used no energy and holds nothing. An id never admitted (or
        already ended) is ignored."""
        held = self._open.pop(request_id, None)
        if held is None:
            return
        mj = self._estimate_mj(held.model_id, prompt_tokens, generated_tokens) if backend is not None else 0.0
        self._add(held.period_start_ns, held.tenant, mj - held.mj)
        if mj > 0:
            key = (held.period_start_ns, held.tenant, backend or "", (done_ns // NS + 1) * NS)
            self._ended[key] = self._ended.get(key, 0.0) + mj

    def _estimate_mj(self, model_id: str, prompt_tokens: int, generated_tokens: int) -> float:
        """The energy of so many tokens at the model's rates; a model not seen yet at the dearest model's; 0 while
        no rate is known."""
        rates = self.rates.get(model_id)
        if rates is None:
            if not self.rates:
                return 0.0
            rates = max(self.rates.values(), key=lambda r: r[0] + r[1])
        per_prompt, per_generated = rates
        return max(0, prompt_tokens) * per_prompt + max(0, generated_tokens) * per_generated

    def _add(self, period_start_ns: int, tenant: str, mj: float) -> None:
        key = (period_start_ns, tenant)
        total = self._reserved.get(key, 0.0) + mj
        if total > 1e-6:  # (a sum of non-negative estimates: below that, rounding)
            self._reserved[key] = total
        else:
            self._reserved.pop(key, None)

    # -- reading the ledger --------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Read every tenant's usage in the current period and apply it (blocking: where no call runs at the same
        time, as before serving; ``run`` reads on a thread and applies on the loop). False when the read failed: the
        last figures stay."""
        got = self.read(self.waiting_backends())
        if got is None:
            return False
        self.apply(got)
        return True

    def waiting_backends(self) -> frozenset[str]:
        """The backends of ended calls whose reservations wait for the ledger's figure."""
        return frozenset(backend for _, _, backend, _ in self._ended)

    def read(self, backends: Collection[str]) -> tuple[int, int, LedgerFigures] | None:
        """(when, the period's start, the figures) of one read of the ledger; None when it failed (the database is
        away: logged once per outage). Blocking, touches no reservation: safe on a thread."""
        now_ns = self._clock_ns()
        start, end = period_bounds(self.config.period, now_ns)  # not ``period``: its cache is the loop's
        try:
            figures = self._read_usage(start, end, backends)
        except Exception as exc:  # the database is away (or the read failed): keep the last known figures
            if not self.failing:
                log.warning(
                    "budget_usage_unread",
                    error=(str(exc).splitlines() or [""])[0][:300],
                    kept="the last figures read" if self.usage is not None else "none: every tenant counts 0",
                )
            self.failing = True
            return None
        if self.failing:
            log.info("budget_usage_read_again")
        self.failing = False
        return now_ns, start, figures

    def apply(self, got: tuple[int, int, LedgerFigures]) -> None:
        """Take one read's figures: the usage, the rates, and the reservations the usage now holds dropped (on the
        event loop: reservations change there)."""
        read_ns, start, figures = got
        self.reads += 1
        self.usage = Usage(start, dict(figures.used_mj), read_ns)
        self.rates.update(figures.mj_per_token)
        frontier = figures.attributed_until_ns
        for ended, mj in list(self._ended.items()):
            period_start, tenant, backend, done_by_ns = ended
            if period_start < start or (backend in frontier and done_by_ns <= frontier[backend]):
                del self._ended[ended]  # in the figure (every call of it ended before the frontier), or a period gone
                self._add(period_start, tenant, -mj)
        for gone in [k for k in self._reserved if k[0] < start]:
            del self._reserved[gone]
        self._export(figures.used_mj)
        READ_AT.set(read_ns / NS)

    def _export(self, used_mj: Mapping[str, int]) -> None:
        """The gauges: every tenant with a budget that used energy this period, holds reservations or has budgets of
        its own (and those shown before, back to 0 in a new period)."""
        holding = {tenant for _, tenant in self._reserved}
        for tenant in set(used_mj) | set(self.config.tenants) | holding | self._labelled:
            limits = self.limits(tenant)
            if limits.soft_wh is None and limits.hard_wh is None:
                continue
            label = tenant_label(tenant)
            self._labelled.add(tenant)
            USED.labels(label).set(used_mj.get(tenant, 0) / 1000.0 / J_PER_WH)
            RESERVED.labels(label).set(self.reserved_wh(tenant))
            for kind, value in (("soft", limits.soft_wh), ("hard", limits.hard_wh)):
                if value is not None:
                    LIMIT.labels(label, kind).set(value)

    async def run(self) -> None:
        """Read the usage again every ``refresh_s`` until cancelled (call ``refresh`` once first)."""
        while True:
            await asyncio.sleep(self.config.refresh_s)
            got = await asyncio.to_thread(self.read, self.waiting_backends())
            if got is not None:
                self.apply(got)
