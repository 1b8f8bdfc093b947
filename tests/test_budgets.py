"""proxy.budgets without a server: UTC calendar periods, soft and hard budgets, per-tenant overrides, the refusal
(code, retry hint to the period's end, message), the reader over a real database (the ledger's usage), and a
database that goes away (the last figures are kept; none known: nobody is refused)."""

from __future__ import annotations

from collections.abc import Collection
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.config import ConfigError, load_config
from app.metering import budget_usage_reader
from common.config import BudgetConfig, TenantBudget
from meter.store import make_engine
from proxy.budgets import HEADER, BudgetExhausted, Budgets, LedgerFigures, Verdict, period_bounds

NS = 10**9
WH_MJ = 3_600_000  # one Wh in millijoules


def _ns(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp()) * NS  # type: ignore[misc]


class Clock:
    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


class Ledger:
    """Figures as the ledger would report them, per period start; ``away`` makes reads fail like a lost database.
    ``until``: each backend's attribution frontier; ``rates``: per model, (mJ per prompt token, per generated token)."""

    def __init__(self) -> None:
        self.used: dict[int, dict[str, int]] = {}
        self.away: Exception | None = None
        self.reads: list[tuple[int, int]] = []
        self.until: dict[str, int] = {}
        self.rates: dict[str, tuple[float, float]] = {}
        self.asked: list[frozenset[str]] = []

    def __call__(self, start_ns: int, end_ns: int, backends: Collection[str]) -> LedgerFigures:
        self.reads.append((start_ns, end_ns))
        self.asked.append(frozenset(backends))
        if self.away is not None:
            raise self.away
        return LedgerFigures(
            used_mj=dict(self.used.get(start_ns, {})),
            attributed_until_ns={b: t for b, t in self.until.items() if b in backends},
            mj_per_token=dict(self.rates),
        )


def test_periods_are_utc_calendar_months_and_days() -> None:
    assert period_bounds("month", _ns(2026, 12, 5, 23, 59)) == (_ns(2026, 12, 1), _ns(2027, 1, 1))
    assert period_bounds("month", _ns(2027, 2, 28, 12)) == (_ns(2027, 2, 1), _ns(2027, 3, 1))
    assert period_bounds("month", _ns(2028, 2, 29)) == (_ns(2028, 2, 1), _ns(2028, 3, 1))  # leap year
    assert period_bounds("day", _ns(2026, 12, 31, 23, 59, 59)) == (_ns(2026, 12, 31), _ns(2027, 1, 1))
    assert period_bounds("day", _ns(2026, 12, 5)) == (_ns(2026, 12, 5), _ns(2026, 12, 6))  # the first instant


def test_soft_then_hard_with_overrides_and_tenants_without_budgets() -> None:
    cfg = BudgetConfig(
        period="month",
        soft_wh=1.0,
        hard_wh=2.0,
        over_soft_class="batch",
        tenants={"big": TenantBudget(hard_wh=10.0), "free": TenantBudget(soft_wh=1.5, over_soft_class="bulk")},
    )
    assert cfg.for_tenant("big") == TenantBudget(soft_wh=1.0, hard_wh=10.0, over_soft_class="batch")
    assert cfg.for_tenant("free") == TenantBudget(soft_wh=1.5, hard_wh=2.0, over_soft_class="bulk")
    assert cfg.for_tenant("anyone") == TenantBudget(soft_wh=1.0, hard_wh=2.0, over_soft_class="batch")
    clock = Clock(_ns(2026, 12, 5, 12))
    ledger = Ledger()
    start = _ns(2026, 12, 1)
    ledger.used[start] = {"small": int(0.5 * WH_MJ), "mid": int(1.5 * WH_MJ), "big": int(3 * WH_MJ)}
    budgets = Budgets(cfg, ledger, clock_ns=clock)
    assert budgets.refresh()
    assert ledger.reads == [(start, _ns(2027, 1, 1))]
    assert budgets.verdict("small") is Verdict.WITHIN and budgets.admit("small") is None
    assert budgets.note("small") is None
    assert budgets.verdict("mid") is Verdict.SOFT and budgets.admit("mid") == "batch"
    assert budgets.note("mid") == "soft-exceeded"
    assert budgets.admit("big") == "batch"  # over 2 Wh but its own hard budget is 10 Wh: only soft
    assert budgets.admit("nobody-yet") is None  # no energy used
    ledger.used[start]["mid"] = 2 * WH_MJ  # exactly at the hard budget: spent
    budgets.refresh()
    assert budgets.verdict("mid") is Verdict.HARD and budgets.note("mid") == "hard-exceeded"
    with pytest.raises(BudgetExhausted):
        budgets.admit("mid")

    # a config without defaults: only the named tenant has a budget
    only = Budgets(BudgetConfig(tenants={"x": TenantBudget(hard_wh=1.0)}), ledger, clock_ns=clock)
    only.refresh()
    assert only.admit("big") is None and only.note("big") is None


def test_a_refusal_says_which_budget_how_much_and_retries_at_the_end_of_the_period() -> None:
    clock = Clock(_ns(2026, 12, 31, 23, 0))  # an hour before the month and the day end
    ledger = Ledger()
    for period in ("month", "day"):
        start, _ = period_bounds(period, clock.now_ns)
        ledger.used[start] = {"acme": int(2.5 * WH_MJ)}
        budgets = Budgets(BudgetConfig(period=period, hard_wh=2.0), ledger, clock_ns=clock)  # type: ignore[arg-type]
        budgets.refresh()
        with pytest.raises(BudgetExhausted) as refused:
            budgets.admit("acme")
        exc = refused.value
        assert exc.grpc_code.name == "RESOURCE_EXHAUSTED" and exc.http_status == 429
        assert exc.retry_after_s == pytest.approx(3600.0)
        assert f"used 2.5000 Wh of hard_wh 2 Wh this {period}" in exc.message
        assert "renews at 2027-01-01T00:00:00Z" in exc.message


def test_a_new_period_starts_at_zero_before_the_next_read() -> None:
    clock = Clock(_ns(2026, 12, 5, 23, 59, 59))
    ledger = Ledger()
    ledger.used[_ns(2026, 12, 5)] = {"acme": 3 * WH_MJ}
    budgets = Budgets(BudgetConfig(period="day", soft_wh=1.0, hard_wh=2.0), ledger, clock_ns=clock)
    budgets.refresh()
    assert budgets.verdict("acme") is Verdict.HARD
    clock.now_ns = _ns(2026, 12, 6)  # midnight: yesterday's figures are not today's
    assert budgets.verdict("acme") is Verdict.WITHIN and budgets.used_wh("acme") == 0.0
    ledger.used[_ns(2026, 12, 6)] = {"acme": int(1.2 * WH_MJ)}
    budgets.refresh()
    assert budgets.verdict("acme") is Verdict.SOFT


def test_a_database_that_goes_away_keeps_the_last_figures_and_none_known_refuses_nobody(tmp_path: Path) -> None:
    clock = Clock(_ns(2026, 12, 5, 12))
    ledger = Ledger()
    ledger.used[_ns(2026, 12, 1)] = {"acme": 3 * WH_MJ, "globex": int(1.5 * WH_MJ)}
    # the failure a real unreachable database raises
    lost = make_engine(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")  # the directory does not exist
    with pytest.raises(sa.exc.OperationalError) as away:
        budget_usage_reader(load_config(environ={}), lost)(0, 1, ())
    lost.dispose()

    cold = Budgets(BudgetConfig(hard_wh=2.0), ledger, clock_ns=clock)
    ledger.away = away.value
    assert not cold.refresh() and cold.failing
    assert cold.admit("acme") is None  # nothing was ever read: nobody is refused

    ledger.away = None
    budgets = Budgets(BudgetConfig(soft_wh=1.0, hard_wh=2.0), ledger, clock_ns=clock)
    assert budgets.refresh()
    ledger.away = away.value
    assert not budgets.refresh() and budgets.failing  # away: the last known figures stay
    with pytest.raises(BudgetExhausted):
        budgets.admit("acme")
    assert budgets.verdict("globex") is Verdict.SOFT
    ledger.away = None
    ledger.used[_ns(2026, 12, 1)]["globex"] = 0  # (a recompute moved it; whatever the ledger says now counts)
    assert budgets.refresh() and not budgets.failing
    assert budgets.verdict("globex") is Verdict.WITHIN


def test_the_reader_reads_the_ledger_usage_of_the_period(db: sa.Engine) -> None:
    """Over a real (empty, migrated) database: the reader answers through GetUsage's query, no tenant yet."""
    cfg = load_config(environ={})
    read = budget_usage_reader(cfg, db)
    start, end = period_bounds("month", _ns(2026, 12, 5))
    assert read(start, end, ("b1",)) == LedgerFigures(used_mj={})


def test_config_rules() -> None:
    with pytest.raises(ConfigError, match=r"soft_wh .* is above hard_wh .* for tenants\.acme"):
        load_config(environ={}, overrides={"budgets": {"hard_wh": 1.0, "tenants": {"acme": {"soft_wh": 2.0}}}})
    model = {"model_id": "m", "backends": [{"url": "http://tgi:80"}]}
    with pytest.raises(ConfigError, match="over_soft_class 'batch' is not a traffic class of model 'm'"):
        load_config(environ={}, overrides={"budgets": {"soft_wh": 1.0, "over_soft_class": "batch"}, "models": [model]})
    cfg = load_config(
        environ={"JOULEGATE_BUDGETS__HARD_WH": "5", "JOULEGATE_BUDGETS__PERIOD": "day"},
        overrides={"models": [{**model, "shaping": {"classes": {"default": {}, "batch": {"policy": "batch"}}}}]},
    )
    assert cfg.budgets.enabled and cfg.budgets.hard_wh == 5.0 and cfg.budgets.period == "day"
    assert not load_config(environ={}).budgets.enabled
    assert HEADER == "x-joulegate-budget"


def test_calls_in_flight_hold_their_estimate_until_the_ledger_holds_them() -> None:
    """A tenant 0.5 Wh short of its hard budget opens calls of 1,000 prompt and 4,000 new tokens (at 1 mJ and 100 mJ
    a token: 0.1114 Wh each) faster than the ledger can count them: five pass, the sixth is refused. A call that ends
    holds its tokens until a read finds its backend attributed past its end; one that reached no backend, nothing."""
    clock = Clock(_ns(2026, 12, 5, 12))
    ledger = Ledger()
    start = _ns(2026, 12, 1)
    ledger.used[start] = {"acme": int(0.5 * WH_MJ)}
    ledger.rates = {"m": (1.0, 100.0)}
    budgets = Budgets(BudgetConfig(hard_wh=1.0), ledger, clock_ns=clock)
    assert budgets.refresh()
    call_mj = 1000 * 1.0 + 4000 * 100.0
    admitted = []
    refusal = None
    for i in range(10):
        try:
            budgets.admit("acme", f"r{i}", model_id="m", prompt_tokens=1000, max_new_tokens=4000)
        except BudgetExhausted as exc:
            refusal = exc
            break
        admitted.append(i)
    assert admitted == [0, 1, 2, 3, 4]
    assert refusal is not None and f"holds {5 * call_mj / WH_MJ:.4f} Wh for calls in flight" in refusal.message
    assert budgets.verdict("acme") is Verdict.HARD and budgets.note("acme") == "hard-exceeded"
    assert budgets.admit("globex", "g0", model_id="m", prompt_tokens=1000, max_new_tokens=4000) is None  # own

    done = clock.now_ns - 5 * NS
    budgets.ended("r0", "b1", done, prompt_tokens=1000, generated_tokens=100)  # now its tokens: 11,000 mJ
    budgets.ended("r1", None, done, prompt_tokens=0, generated_tokens=0)  # never reached a backend
    budgets.ended("r1", "b1", done, prompt_tokens=1000, generated_tokens=4000)  # (ended once only)
    budgets.ended("never-admitted", "b1", done, prompt_tokens=1, generated_tokens=1)
    assert budgets.reserved_wh("acme") == pytest.approx((3 * call_mj + 11_000) / WH_MJ)
    assert budgets.waiting_backends() == {"b1"}

    ledger.until["b1"] = done - 1  # attributed up to just before r0's end: r0 is not in the figure yet
    assert budgets.refresh() and ledger.asked[-1] == {"b1"}
    assert budgets.reserved_wh("acme") == pytest.approx((3 * call_mj + 11_000) / WH_MJ)
    ledger.until["b1"] = done + 1
    assert budgets.refresh()  # just past r0's end, but ended calls are summed by the second after their end
    assert budgets.reserved_wh("acme") == pytest.approx((3 * call_mj + 11_000) / WH_MJ)
    ledger.until["b1"] = done + NS
    ledger.used[start]["acme"] += 11_000  # ...and now it is in the figure
    assert budgets.refresh()
    assert budgets.reserved_wh("acme") == pytest.approx(3 * call_mj / WH_MJ)
    assert budgets.verdict("acme") is Verdict.WITHIN  # 0.5 + 0.003 + 0.334 Wh
    assert budgets.admit("acme", "r9", model_id="m", prompt_tokens=1000, max_new_tokens=4000) is None


def test_without_known_rates_calls_reserve_nothing_and_a_new_period_forgets_the_old() -> None:
    clock = Clock(_ns(2026, 12, 31, 23, 59))
    ledger = Ledger()
    ledger.used[_ns(2026, 12, 31)] = {"acme": int(0.5 * WH_MJ)}
    budgets = Budgets(BudgetConfig(period="day", soft_wh=0.6, hard_wh=1.0), ledger, clock_ns=clock)
    budgets.refresh()
    for i in range(100):  # no tokens with energy read yet: nothing to estimate by
        assert budgets.admit("acme", f"a{i}", model_id="m", prompt_tokens=1000, max_new_tokens=4000) is None
    assert budgets.reserved_wh("acme") == 0.0
    for i in range(100):
        budgets.ended(f"a{i}", "b1", clock.now_ns, prompt_tokens=1000, generated_tokens=4000)
    assert budgets.waiting_backends() == frozenset()  # nothing held: nothing kept
    ledger.rates = {"m": (1.0, 100.0), "small": (0.1, 10.0)}
    budgets.refresh()
    assert budgets.verdict("acme") is Verdict.WITHIN
    budgets.admit("globex", "g0", model_id="small", prompt_tokens=1000, max_new_tokens=4000)
    budgets.admit("initech", "i0", model_id="not-seen-yet", prompt_tokens=1000, max_new_tokens=4000)
    assert budgets.reserved_wh("globex") == pytest.approx(40_100 / WH_MJ)  # its model's rates
    assert budgets.reserved_wh("initech") == pytest.approx(401_000 / WH_MJ)  # the dearest model's
    assert budgets.admit("acme", "b0", model_id="m", prompt_tokens=1000, max_new_tokens=4000) is None
    assert budgets.verdict("acme") is Verdict.SOFT  # 0.5 Wh used + 0.1114 Wh held: past the soft 0.6 Wh
    budgets.ended("b0", "b1", clock.now_ns, prompt_tokens=1000, generated_tokens=4000)
    clock.now_ns = _ns(2027, 1, 1)  # a new day: yesterday's calls count in yesterday
    assert budgets.reserved_wh("acme") == 0.0
    budgets.refresh()
    assert budgets.waiting_backends() == frozenset()
