"""The raw part of a usage report (the edges of its range) finds each request's seal, or its energy rows when it
has none, however the request's row changed since it was sealed: on PostgreSQL seals are found by a range of the
``(backend, done_ns)`` index and the rest by key (``meter.reports.usage._per_request_probed``), on SQLite by key."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from meter.engine.rollup import Rollup
from meter.reports import GroupBy, IdlePolicy, ReportOptions, get_usage
from meter.reports.settings import settings_history
from meter.reports.usage import _rollup_plan
from meter.store.models import Request, RequestSeal
from tests.test_reports_oracle import Epoch, Req, Row, insert, open_store, seal

S = 1_000_000_000
HOUR = 3600 * S
BASE = 472_222 * HOUR
RQ = Request.__table__
RS = RequestSeal.__table__


@pytest.fixture
def store(db_url: str) -> Iterator[sa.Engine]:
    yield from open_store(db_url)


def _req(rid: str, at: int, done: int | None, backend: str | None = "b1", tenant: str = "t0") -> Req:
    return Req(rid, tenant=tenant, backend=backend, received_ns=BASE + at, released_ns=BASE + at if backend else None,
               first_token_ns=BASE + at + S if backend else None, done_ns=None if done is None else BASE + done,
               prompt_tokens=10, generated_tokens=3, ingested_ns=BASE + at)  # fmt: skip


def test_edges_read_each_requests_seal_or_its_rows_however_its_row_changed(store: sa.Engine) -> None:
    reqs = [
        _req("plain", 100 * S, 102 * S),  # sealed
        _req("rewritten", 10 * S, 13 * S),  # sealed, then its row rewritten: its seal ended before all the others
        _req("long", 300 * S, 5 * HOUR, tenant="t1"),  # sealed, ended hours after the range
        _req("unsealed", 400 * S, 420 * S, backend="b2"),  # ended, rows in two epochs, one before the range
        _req("open", 500 * S, None, tenant="t1"),  # still running: its rows so far
        _req("queued", 600 * S, 601 * S, backend=None),  # never reached a backend: final, 0 J
        _req("outside", 2 * HOUR, 2 * HOUR + 5 * S),  # received after the range
    ]
    rows = {  # (epoch start, prefill, decode, idle time, idle tokens) per request
        "plain": [(0, 11, 12, 1, 2)],
        "rewritten": [(0, 21, 22, 3, 4)],
        "long": [(0, 31, 32, 5, 6), (HOUR, 33, 34, 7, 8)],
        "unsealed": [(-HOUR, 41, 42, 9, 10), (0, 43, 44, 11, 12)],
        "open": [(0, 51, 52, 13, 14)],
        "outside": [(2 * HOUR, 61, 62, 15, 16)],
    }
    backend_of = {r.request_id: r.backend or "b1" for r in reqs}
    epochs: dict[tuple[str, int], Epoch] = {}
    for rid, rs in rows.items():
        b = backend_of[rid]
        for start, p, d, it, ik in rs:
            e = epochs.setdefault((b, start), Epoch(BASE + start, BASE + start + HOUR, idle_mj=0, backend=b))
            e.rows.append(Row(rid, BASE + start, p, d, S, backend=b, idle_time_mj=it, idle_tokens_mj=ik))
    insert(store, reqs, epochs.values())
    seal(store, ["plain", "rewritten", "long", "outside"])
    with store.begin() as conn:
        # What a report must take for a sealed request is its seal, not its rows: make them differ.
        conn.execute(sa.update(RS).where(RS.c.request_id == "rewritten").values(prefill_mj=1000, decode_mj=2000))
        conn.execute(sa.update(RQ).where(RQ.c.request_id == "rewritten").values(done_ns=BASE + 3 * HOUR, backend="b9"))
    want = {  # tenant -> requests, prefill, decode, idle (time), provisional
        "t0": (4, 11 + 1000 + 41 + 43, 12 + 2000 + 42 + 44, 1 + 3 + 9 + 11, 1),
        "t1": (2, 31 + 33 + 51, 32 + 34 + 52, 5 + 7 + 13, 1),
    }
    options = ReportOptions(idle_policy=IdlePolicy.TIME)
    with store.connect() as conn:
        for start in (0, 5 * S):
            got = get_usage(conn, options, start_ns=BASE + start, end_ns=BASE + HOUR, rollups=False)
            assert {r.key: (r.requests, r.prefill_mj, r.decode_mj, r.idle_mj, r.provisional_requests)
                    for r in got.rows} == want  # fmt: skip
        by_backend = get_usage(
            conn, options, start_ns=BASE, end_ns=BASE + HOUR, group_by=GroupBy.BACKEND, rollups=False
        )
    assert {r.key: r.requests for r in by_backend.rows} == {"b1": 3, "b2": 1, "b9": 1, "(none)": 1}


def test_an_edge_hour_covered_for_more_than_half_is_its_rollup_minus_the_rest(store: sa.Engine) -> None:
    """Every request sealed, every hour rolled: a range that starts 10 minutes into an hour and ends 10 minutes before
    one reads those two hours from the rollup minus the raw rows of the 10 minutes outside, and gives the raw rows'
    integers; a group whose requests all lie outside the range (tenant t2, in the first 10 minutes) is not shown."""
    minute = 60 * S
    at = [0, 5, 12, 40, 61, 125, 170, 175, 179]  # minutes after BASE
    reqs = [_req(f"q{i}", m * minute, m * minute + 2 * S, tenant="t2" if m < 10 else f"t{i % 2}")
            for i, m in enumerate(at)]  # fmt: skip
    epochs = [Epoch(r.received_ns, r.received_ns + 10 * S, idle_mj=5, rows=[Row(r.request_id, r.received_ns, 100 + i,
              7 * i, S, idle_time_mj=i, idle_tokens_mj=2 * i)]) for i, r in enumerate(reqs)]  # fmt: skip
    insert(store, reqs, epochs)
    seal(store, [r.request_id for r in reqs])
    now = BASE + 4 * HOUR
    assert Rollup().run(store, now, now).rolled_hours >= 3
    start, end = BASE + 10 * minute, BASE + 3 * HOUR - 10 * minute
    options = ReportOptions(idle_policy=IdlePolicy.TOKENS)
    with store.connect() as conn:
        plan = _rollup_plan(conn, start, end, settings_history(conn, options))
        assert plan is not None
        assert (plan.rolled, plan.raw, plan.minus) == (
            [(BASE, BASE + 3 * HOUR)],
            [],
            [(BASE, start), (end, BASE + 3 * HOUR)],
        )
        for group_by in GroupBy:
            got = get_usage(conn, options, start_ns=start, end_ns=end, group_by=group_by)
            want = get_usage(conn, options, start_ns=start, end_ns=end, group_by=group_by, rollups=False)
            ints = ("key", "requests", "prompt_tokens", "generated_tokens", "prefill_mj", "decode_mj", "idle_mj",
                    "provisional_requests", "estimated_prompt_requests")  # fmt: skip
            assert [[getattr(r, k) for k in ints] for r in got.rows] == [
                [getattr(r, k) for k in ints] for r in want.rows
            ]
        by_tenant = get_usage(conn, options, start_ns=start, end_ns=end)
    assert [r.key for r in by_tenant.rows] == ["t0", "t1"] and by_tenant.total.requests == 4
