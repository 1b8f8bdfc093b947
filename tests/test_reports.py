"""meter.reports over real databases (SQLite and PostgreSQL) with hand-built ledgers and hand-computed joules."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from meter.reports import (
    BillingSettings,
    GroupBy,
    IdlePolicy,
    InvalidQuery,
    ReportOptions,
    RequestFilter,
    UsageReport,
    add_settings,
    get_backend_energy,
    get_request_energy,
    get_usage,
    list_requests,
    seed_settings,
)

from .test_reports_oracle import MS, Epoch, Req, Row, S, insert, open_store, seal

# 2023-11-14T00:00:00Z: an hour and a day boundary. Epochs are 1 s: E0 [H-1s, H), E1 [H, H+1s), E2 [H+1s, H+2s).
H = 1_699_920_000 * S
E0, E1, E2 = H - S, H, H + S
LAG = 100 * MS


@pytest.fixture
def store(db_url: str) -> Iterator[sa.Engine]:
    yield from open_store(db_url)


def scenario() -> tuple[list[Req], list[Epoch]]:
    """Three requests on b1 across the boundary, one that never left the queue, one idle epoch.

    A (tenant-a, m1): 600 ms in E0, 400 ms in E1; 10 + 30 tokens.  B (tenant-b, m1): 200 ms in E0; 50 + 10 tokens.
    C (tenant-a, m2): 600 ms in E1; 20 + 20 tokens.  D (tenant-b, m1): rejected in the queue at H + 1 h.
    E0: idle 200 mJ, E1: idle 400 mJ, E2: idle 1000 mJ and no request.
    """
    requests = [
        Req("A", "tenant-a", "m1", "b1", H - 700 * MS, H - 600 * MS, H - 500 * MS, H + 400 * MS, 10, 30, H),
        Req("B", "tenant-b", "m1", "b1", H - 300 * MS, H - 250 * MS, H - 200 * MS, H - 50 * MS, 50, 10, H),
        Req("C", "tenant-a", "m2", "b1", H + 100 * MS, H + 400 * MS, H + 500 * MS, H + S, 20, 20, H + S),
        Req("D", "tenant-b", "m1", None, H + 3600 * S, None, None, H + 3600 * S, 5, 0, H + 3600 * S,
            status="RESOURCE_EXHAUSTED"),
    ]  # fmt: skip
    epochs = [
        Epoch(E0, E0 + S, 200, rows=[Row("A", E0, 300, 900, 600 * MS, idle_time_mj=150, idle_tokens_mj=57),
                                     Row("B", E0, 500, 100, 200 * MS, idle_time_mj=50, idle_tokens_mj=143)]),
        Epoch(E1, E1 + S, 400, rows=[Row("A", E1, 0, 800, 400 * MS, idle_time_mj=160, idle_tokens_mj=114),
                                     Row("C", E1, 200, 600, 600 * MS, idle_time_mj=240, idle_tokens_mj=286)]),
        Epoch(E2, E2 + S, 1000),
    ]  # fmt: skip
    return requests, epochs


# Idle shares as the engine stores them (integers, largest remainder per epoch). TIME: by active time in the epoch.
TIME_IDLE = {"A": 150 + 160, "B": 50, "C": 240}
# TOKENS: tokens x the part of the request's own window inside the epoch. E0: A 40 x 600/1000 = 24, B 60 x 200/200
# = 60 -> 200 x 24/84 = 57.1, 142.9; E1: A 40 x 400/1000 = 16, C 40 x 600/600 = 40 -> 400 x 16/56 = 114.3, 285.7.
TOKENS_IDLE = {"A": 57 + 114, "B": 143, "C": 286}
STORED = BillingSettings(IdlePolicy.NONE, grid_g_co2e_per_kwh=500.0, pue=1.5)


def settings(policy: IdlePolicy | None = None) -> ReportOptions:
    """The reader's options: another idle policy than the stored one (none stored in these tests: the fallback's,
    NONE), and a fallback with the carbon factors the tests check."""
    return ReportOptions(idle_policy=policy, fallback=STORED)


def test_request_energy_under_each_idle_policy(store: sa.Engine) -> None:
    requests, epochs = scenario()
    insert(store, requests, epochs)
    seal(store, "ABC")
    assert sum(TIME_IDLE.values()) == sum(TOKENS_IDLE.values()) == 600
    expected = {"A": (300, 1700), "B": (500, 100), "C": (200, 600)}
    for policy, idle in ((IdlePolicy.NONE, {}), (IdlePolicy.TIME, TIME_IDLE), (IdlePolicy.TOKENS, TOKENS_IDLE)):
        with store.connect() as conn:
            for rid, (prefill_mj, decode_mj) in expected.items():
                r = get_request_energy(conn, rid, settings(policy))
                assert r is not None and r.final, rid
                assert (r.prefill_mj, r.decode_mj, r.idle_mj) == (prefill_mj, decode_mj, idle.get(rid, 0))
                assert math.isclose(r.total_j, (prefill_mj + decode_mj + idle.get(rid, 0)) / 1000)
                assert r.idle_policy is policy and r.idle_policy_asked is (policy is not IdlePolicy.NONE)
                assert math.isclose(r.co2e_g, r.total_j * 1.5 * 500 / 3.6e6)
            d = get_request_energy(conn, "D", settings(policy))
            assert d is not None and d.final and d.backend is None and d.total_j == 0 and d.queued_ms is None
            assert d.status == "RESOURCE_EXHAUSTED"
            assert get_request_energy(conn, "nope", settings(policy)) is None
            a = get_request_energy(conn, "A", settings(policy))
            assert a is not None and a.queued_ms == 100.0 and a.first_token_ns == H - 500 * MS


@pytest.mark.parametrize(
    ("group_by", "keys"),
    [
        (GroupBy.TENANT, {"tenant-a": {"A", "C"}, "tenant-b": {"B", "D"}}),
        (GroupBy.MODEL, {"m1": {"A", "B", "D"}, "m2": {"C"}}),
        (GroupBy.BACKEND, {"b1": {"A", "B", "C"}, "(none)": {"D"}}),
        (GroupBy.HOUR, {"2023-11-13T23:00:00Z": {"A", "B"}, "2023-11-14T00:00:00Z": {"C"},
                        "2023-11-14T01:00:00Z": {"D"}}),
        (GroupBy.DAY, {"2023-11-13T00:00:00Z": {"A", "B"}, "2023-11-14T00:00:00Z": {"C", "D"}}),
    ],
)  # fmt: skip
def test_usage_groups_requests_by_received_time_with_their_whole_energy(
    store: sa.Engine, group_by: GroupBy, keys: dict[str, set[str]]
) -> None:
    insert(store, *scenario())
    seal(store, "ABC")
    for policy, idle in ((IdlePolicy.NONE, {}), (IdlePolicy.TIME, TIME_IDLE), (IdlePolicy.TOKENS, TOKENS_IDLE)):
        with store.connect() as conn:
            report = get_usage(conn, settings(policy), end_ns=H + 2 * 3600 * S, group_by=group_by)
        check_usage(report, keys, idle)


def check_usage(report: UsageReport, keys: dict[str, set[str]], idle: dict[str, float]) -> None:
    energy = {"A": (300, 1700), "B": (500, 100), "C": (200, 600), "D": (0, 0)}
    tokens = {"A": (10, 30), "B": (50, 10), "C": (20, 20), "D": (5, 0)}
    assert [r.key for r in report.rows] == sorted(keys)
    for row in report.rows:
        members = keys[row.key]
        assert row.requests == len(members)
        assert row.prompt_tokens == sum(tokens[m][0] for m in members)
        assert row.generated_tokens == sum(tokens[m][1] for m in members)
        assert row.prefill_mj == sum(energy[m][0] for m in members)
        assert row.decode_mj == sum(energy[m][1] for m in members)
        assert row.idle_mj == sum(idle.get(m, 0) for m in members)
        assert row.provisional_requests == 0 and row.estimated_prompt_requests == 0
    t = report.total
    assert (t.requests, t.prompt_tokens, t.generated_tokens, t.prefill_mj, t.decode_mj) == (4, 85, 60, 1000, 2400)
    total_j = (3400 + sum(idle.values())) / 1000
    assert math.isclose(t.total_j, total_j)
    assert math.isclose(t.j_per_generated_token, total_j / 60)
    assert math.isclose(t.idle_share, sum(idle.values()) / 1000 / total_j)
    assert math.isclose(t.co2e_g, total_j * 1.5 * 500 / 3.6e6)
    assert math.isclose(t.total_wh, total_j / 3600)


def test_usage_range_is_half_open_on_received_time_and_tenant_filter(store: sa.Engine) -> None:
    insert(store, *scenario())
    with store.connect() as conn:
        # [H - 300 ms, H + 100 ms): B is in (received at its start), C is not (received exactly at the end).
        report = get_usage(conn, settings(), start_ns=H - 300 * MS, end_ns=H + 100 * MS, group_by=GroupBy.TENANT)
        assert [(r.key, r.requests) for r in report.rows] == [("tenant-b", 1)]
        # C was received in the second hour but its energy is whole, though the range ends before its epoch does.
        report = get_usage(conn, settings(), start_ns=H, end_ns=H + 200 * MS)
        assert [(r.key, r.prefill_mj, r.decode_mj) for r in report.rows] == [("tenant-a", 200, 600)]
        report = get_usage(conn, settings(), end_ns=H + 7200 * S, tenant="tenant-a")
        assert [(r.key, r.requests) for r in report.rows] == [("tenant-a", 2)]
        empty = get_usage(conn, settings(), start_ns=0, end_ns=S)
        assert empty.rows == () and empty.total.requests == 0 and empty.total.j_per_generated_token == 0
        with pytest.raises(InvalidQuery, match=r"^end: must be after start"):
            get_usage(conn, settings(), start_ns=H, end_ns=H)


def test_backend_energy_conserves_and_reconciles_with_usage(store: sa.Engine) -> None:
    insert(store, *scenario())
    with store.connect() as conn:
        (b1,) = get_backend_energy(conn, end_ns=H + 3 * S)
        assert (b1.backend, b1.counter_mj, b1.prefill_mj, b1.decode_mj, b1.idle_mj) == ("b1", 5000, 1000, 2400, 1600)
        assert b1.conservation_error_mj == 0 and b1.attributed_mj == 3400 and b1.adjustment_mj == 0
        assert (b1.requests, b1.samples, b1.gaps, b1.epochs, b1.attributed_until_ns) == (3, 30, 0, 3, H + 2 * S)
        # Epochs starting in [H, H + 1 s): E1 only; its requests are A and C.
        (e1,) = get_backend_energy(conn, start_ns=H, end_ns=H + S)
        assert (e1.counter_mj, e1.prefill_mj, e1.decode_mj, e1.idle_mj, e1.requests, e1.epochs) == (
            2000, 200, 1400, 400, 2, 1,
        )  # fmt: skip
        assert get_backend_energy(conn, start_ns=0, end_ns=S) == ()
        # Over the whole history the usage total and the backends agree, idle included.
        for policy in IdlePolicy:
            usage = get_usage(conn, settings(policy), end_ns=H + 7200 * S)
            assert usage.total.prefill_mj + usage.total.decode_mj == b1.attributed_mj
            unshared_idle = 1000 if policy is not IdlePolicy.NONE else 1600  # E2 has no request
            assert usage.total.idle_mj + unshared_idle == b1.idle_mj


def test_backend_energy_shows_a_broken_ledger(store: sa.Engine) -> None:
    requests, epochs = scenario()
    insert(store, requests, epochs)
    with store.begin() as conn:  # a request_energy row lost: the counter no longer adds up
        conn.execute(sa.text("DELETE FROM request_energy WHERE request_id = 'B'"))
    with store.connect() as conn:
        (b1,) = get_backend_energy(conn, end_ns=H + 3 * S)
    assert b1.conservation_error_mj == 600 and b1.requests == 2


def test_backend_energy_books_the_adjustment_of_sealed_requests(store: sa.Engine) -> None:
    requests, epochs = scenario()
    epochs[1].adjustment_mj = -250  # a recompute would have taken 250 mJ from sealed requests: billed twice
    insert(store, requests, epochs)
    with store.connect() as conn:
        (b1,) = get_backend_energy(conn, end_ns=H + 3 * S)
    assert (b1.counter_mj, b1.idle_mj, b1.adjustment_mj, b1.adjusted_epochs) == (4750, 1600, -250, 1)
    assert b1.conservation_error_mj == 0  # counter = prefill + decode + idle + adjustment


def test_final_means_sealed_or_no_gpu_work_and_a_seal_is_what_reports_show(store: sa.Engine) -> None:
    requests = [
        Req("sealed", released_ns=H, first_token_ns=H + 10 * MS, done_ns=H + 500 * MS, received_ns=H),
        Req("unsealed", released_ns=H, first_token_ns=H + 10 * MS, done_ns=H + 500 * MS, received_ns=H),
        Req("open", released_ns=H, done_ns=None, status=None, received_ns=H),
        Req("queued", backend=None, done_ns=H, received_ns=H, status="RESOURCE_EXHAUSTED"),
        # refused by its backend (TGI validation): released, no first token, no GPU work: final at once
        Req("refused", released_ns=H, done_ns=H + MS, received_ns=H, status="INVALID_ARGUMENT"),
        # cancelled during its prefill: it made the GPU work, so it waits for its seal like any other
        Req("abandoned", released_ns=H, done_ns=H + 50 * MS, received_ns=H, status="CANCELLED"),
    ]
    rows = [Row(r.request_id, H, 100, 200, 500 * MS, idle_time_mj=30, idle_tokens_mj=40)
            for r in requests if r.request_id in ("sealed", "unsealed", "abandoned")]  # fmt: skip
    insert(store, requests, [Epoch(H, H + S, 100, rows=rows)])
    seal(store, ["sealed"])

    def report(rid: str) -> tuple[bool, int]:
        with store.connect() as conn:
            r = get_request_energy(conn, rid, settings(IdlePolicy.TIME))
            assert r is not None
            return r.final, r.prefill_mj + r.decode_mj + r.idle_mj

    assert {r.request_id: report(r.request_id) for r in requests} == {
        "sealed": (True, 330), "unsealed": (False, 330), "open": (False, 0), "queued": (True, 0),
        "refused": (True, 0), "abandoned": (False, 330),
    }  # fmt: skip
    # Whatever happens to its rows afterwards, a sealed request reads the same; a provisional one follows its rows.
    with store.begin() as conn:
        conn.execute(sa.text("UPDATE request_energy SET decode_mj = decode_mj + 1000"))
    assert report("sealed") == (True, 330) and report("unsealed") == (False, 1330)
    with store.connect() as conn:
        usage = get_usage(conn, settings(), end_ns=H + S)
    assert usage.total.requests == 6 and usage.total.provisional_requests == 3


def test_stored_settings_bill_whoever_reads_and_change_only_from_now_on(store: sa.Engine) -> None:
    """A bill does not depend on the reader's config: the stored settings apply, by the time each request was
    received; a change applies from when it is made; a reader asking for another policy is told it did."""
    now = time.time_ns()
    early = Req("early", released_ns=now - 10 * S, done_ns=now - 9 * S, received_ns=now - 10 * S, tenant="t")
    rows = [Row("early", now - 10 * S, 100, 200, S, idle_time_mj=40, idle_tokens_mj=60)]
    insert(store, [early], [Epoch(now - 10 * S, now, 0, rows=rows)])
    seal(store, ["early"])
    time_policy = BillingSettings(IdlePolicy.TIME, grid_g_co2e_per_kwh=300.0, pue=1.1)
    other = ReportOptions(fallback=BillingSettings(IdlePolicy.TOKENS, grid_g_co2e_per_kwh=900.0, pue=2.0))

    with store.connect() as conn:  # nothing stored yet: each reader's config stands in (and the report says so)
        assert not get_usage(conn, other, end_ns=now).settings.stored
    history = seed_settings(store, time_policy, source="config of a gateway")
    assert history.stored and history.periods[0].idle_policy is IdlePolicy.TIME
    assert seed_settings(store, other.fallback, source="config of another").periods == history.periods  # type: ignore[arg-type]
    with store.connect() as conn:
        a = get_request_energy(conn, "early", ReportOptions(fallback=STORED))
        b = get_request_energy(conn, "early", other)
        usage_a = get_usage(conn, ReportOptions(fallback=STORED), end_ns=now)
        usage_b = get_usage(conn, other, end_ns=now)
    assert a == b and a is not None and (a.idle_policy, a.idle_mj, a.idle_policy_asked) == (IdlePolicy.TIME, 40, False)
    assert math.isclose(a.co2e_g, 0.34 * 1.1 * 300 / 3.6e6)
    assert usage_a == usage_b and usage_a.total.idle_mj == 40 and usage_a.idle_policy_asked is None

    # Asked for another policy: the figure follows, and says so.
    with store.connect() as conn:
        asked = get_request_energy(conn, "early", ReportOptions(idle_policy=IdlePolicy.TOKENS))
        asked_usage = get_usage(conn, ReportOptions(idle_policy=IdlePolicy.TOKENS), end_ns=now)
    assert asked is not None and (asked.idle_mj, asked.idle_policy, asked.idle_policy_asked) == (
        60, IdlePolicy.TOKENS, True,
    )  # fmt: skip
    assert asked_usage.idle_policy_asked is IdlePolicy.TOKENS and asked_usage.total.idle_mj == 60

    # A change is never retroactive...
    with pytest.raises(InvalidQuery, match=r"^effective: must not lie in the past"):
        add_settings(store, BillingSettings(IdlePolicy.NONE), effective_ns=now - S, source="an operator")
    add_settings(store, BillingSettings(IdlePolicy.NONE, 100.0, 1.0), effective_ns=None, source="an operator")
    late = Req("late", released_ns=now + 60 * S, done_ns=now + 61 * S, received_ns=now + 60 * S, tenant="t")
    late_rows = [Row("late", now + 60 * S, 100, 200, S, idle_time_mj=40, idle_tokens_mj=60)]
    insert(store, [late], [Epoch(now + 60 * S, now + 70 * S, 0, rows=late_rows)])
    with store.connect() as conn:
        a2 = get_request_energy(conn, "early", other)
        l2 = get_request_energy(conn, "late", other)
        usage = get_usage(conn, other, end_ns=now + 100 * S)
    assert a2 == a  # ...the request received before it keeps the settings it was billed under
    assert l2 is not None and (l2.idle_policy, l2.idle_mj) == (IdlePolicy.NONE, 0)
    assert math.isclose(l2.co2e_g, 0.3 * 1.0 * 100 / 3.6e6)
    assert [p.idle_policy for p in usage.periods] == [IdlePolicy.TIME, IdlePolicy.NONE]
    assert usage.total.idle_mj == 40 and math.isclose(usage.total.co2e_g, a.co2e_g + l2.co2e_g)


@pytest.mark.parametrize("page_size", [1, 7, 100])
def test_list_requests_pages_without_gaps_or_repeats(store: sa.Engine, page_size: int) -> None:
    # 60 requests on 20 distinct received times (ties broken by id), two tenants, one model filter.
    requests = [
        Req(f"r{i:03d}", tenant=f"t{i % 2}", model_id="mx" if i % 3 else "my", received_ns=H + (i // 3) * MS,
            released_ns=None, backend=None, done_ns=H + S, ingested_ns=H)
        for i in range(60)
    ]  # fmt: skip
    insert(store, requests)
    want = [r.request_id for r in sorted(requests, key=lambda r: (r.received_ns, r.request_id), reverse=True)]
    flt = RequestFilter()
    seen: list[str] = []
    token = ""
    with store.connect() as conn:
        for _ in range(100):
            page = list_requests(conn, flt, settings(), page_size=page_size, page_token=token)
            assert len(page.requests) <= page_size
            seen += [r.request_id for r in page.requests]
            token = page.next_page_token
            if not token:
                break
            # a row written after the walk began, newer than the cursor, does not show up in it
            insert(store, [Req(f"new{len(seen)}", received_ns=H + S, backend=None, done_ns=H + S)])
        assert seen == want
        only = RequestFilter(tenant="t1", model_id="my", start_ns=H + 3 * MS, end_ns=H + 18 * MS)
        got = list_requests(conn, only, settings(), page_size=1000).requests
        assert [r.request_id for r in got] == [
            r.request_id
            for r in sorted(requests, key=lambda r: (r.received_ns, r.request_id), reverse=True)
            if r.tenant == "t1" and r.model_id == "my" and H + 3 * MS <= r.received_ns < H + 18 * MS
        ]
        assert got and all(r.final for r in got)


def test_list_requests_rejects_bad_paging(store: sa.Engine) -> None:
    insert(store, [Req(f"r{i}", received_ns=i, backend=None, done_ns=i) for i in range(5)])
    with store.connect() as conn:
        page = list_requests(conn, RequestFilter(), settings(), page_size=2)
        assert [r.request_id for r in page.requests] == ["r4", "r3"] and page.next_page_token
        assert list_requests(conn, RequestFilter(), settings(), page_size=0).next_page_token == ""
        with pytest.raises(InvalidQuery, match=r"^page_size"):
            list_requests(conn, RequestFilter(), settings(), page_size=1001)
        for bad in ("garbage!", "eyJ4IjogMX0", page.next_page_token[:-3]):
            with pytest.raises(InvalidQuery, match=r"^page_token"):
                list_requests(conn, RequestFilter(), settings(), page_token=bad)
        with pytest.raises(InvalidQuery, match=r"^page_token: the filters differ"):
            list_requests(conn, RequestFilter(tenant="x"), settings(), page_token=page.next_page_token)
        rest = list_requests(conn, RequestFilter(), settings(), page_size=1000, page_token=page.next_page_token)
        assert [r.request_id for r in rest.requests] == ["r2", "r1", "r0"] and rest.next_page_token == ""
