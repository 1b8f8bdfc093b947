"""Rows for report tests, and property tests that hold the reports to the stored figures on random ledgers.

The helpers here build the metering tables by hand (``requests``, ``request_energy``, ``backend_epochs``,
``request_seals``: the contract between the attribution engine and the reports); other report tests import them.
The hypothesis tests at the bottom hold every report to the one rule that makes them agree: a request's figures
are its own stored integers (its seal's once sealed, else the sums of its rows), whatever else is asked for at the
same time, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.reports import (
    GroupBy,
    IdlePolicy,
    ReportOptions,
    RequestFilter,
    fetch_reports,
    get_request_energy,
    get_usage,
    list_requests,
)
from meter.store import ensure_schema, make_engine
from meter.store.models import BackendEpoch, Request, RequestEnergy, RequestSeal

S = 1_000_000_000
MS = 1_000_000
ATTRIBUTED_AT = 2**62  # year 2116: epochs computed after every row was written, unless a test says else


@dataclass
class Req:
    request_id: str
    tenant: str = "tenant-a"
    model_id: str = "m1"
    backend: str | None = "b1"
    received_ns: int = 0
    released_ns: int | None = None
    first_token_ns: int | None = None
    done_ns: int | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ingested_ns: int = 0
    status: str | None = "OK"
    traffic_class: str | None = "default"
    api: str | None = "grpc"
    correlation_id: str | None = None
    prompt_tokens_estimated: bool = False


@dataclass
class Row:
    request_id: str
    epoch_start_ns: int
    prefill_mj: int
    decode_mj: int
    active_ns: int
    backend: str = "b1"
    idle_time_mj: int = 0
    idle_tokens_mj: int = 0


@dataclass
class Epoch:
    epoch_start_ns: int
    epoch_end_ns: int
    idle_mj: int
    backend: str = "b1"
    samples: int = 10
    gaps: int = 0
    attributed_at_ns: int = ATTRIBUTED_AT
    rows: list[Row] = field(default_factory=list)
    last_reading_ns: int | None = None  # default: the epoch's end
    adjustment_mj: int = 0

    def record(self) -> dict[str, object]:
        prefill = sum(r.prefill_mj for r in self.rows)
        decode = sum(r.decode_mj for r in self.rows)
        return {
            "backend": self.backend,
            "epoch_start_ns": self.epoch_start_ns,
            "epoch_end_ns": self.epoch_end_ns,
            "first_reading_ns": self.epoch_start_ns,
            "last_reading_ns": self.epoch_end_ns if self.last_reading_ns is None else self.last_reading_ns,
            "counter_mj": prefill + decode + self.idle_mj + self.adjustment_mj,
            "attributed_mj": prefill + decode,
            "prefill_mj": prefill,
            "decode_mj": decode,
            "idle_mj": self.idle_mj,
            "samples": self.samples,
            "gaps": self.gaps,
            "active_ns_total": sum(r.active_ns for r in self.rows),
            "attributed_at_ns": self.attributed_at_ns,
            "adjustment_mj": self.adjustment_mj,
        }


def insert(engine: sa.Engine, requests: Iterable[Req] = (), epochs: Iterable[Epoch] = ()) -> None:
    """Write requests, epochs and their rows (epochs' totals are the sums of their rows, as the engine writes)."""
    reqs = [asdict(r) for r in requests]
    eps = list(epochs)
    with engine.begin() as conn:
        if reqs:
            conn.execute(sa.insert(Request.__table__), reqs)
        if eps:
            conn.execute(sa.insert(BackendEpoch.__table__), [e.record() for e in eps])
            rows = [
                {**asdict(r), "backend": e.backend, "epoch_start_ns": e.epoch_start_ns} for e in eps for r in e.rows
            ]
            if rows:
                conn.execute(sa.insert(RequestEnergy.__table__), rows)


def seal(engine: sa.Engine, ids: Iterable[str], sealed_ns: int = 1) -> None:
    """Seal requests as the engine does: their figures are the sums of their rows now."""
    with engine.begin() as conn:
        for rid in ids:
            sums = conn.execute(
                sa.text(
                    "SELECT COALESCE(SUM(prefill_mj), 0), COALESCE(SUM(decode_mj), 0), COALESCE(SUM(idle_time_mj), "
                    "0), COALESCE(SUM(idle_tokens_mj), 0) FROM request_energy WHERE request_id = :r"
                ),
                {"r": rid},
            ).one()
            req = conn.execute(sa.select(Request.__table__).where(Request.__table__.c.request_id == rid)).one()
            conn.execute(
                sa.insert(RequestSeal.__table__),
                {"request_id": rid, "backend": req.backend or "", "done_ns": req.done_ns or 0, "sealed_ns": sealed_ns,
                 "prefill_mj": sums[0], "decode_mj": sums[1], "idle_time_mj": sums[2], "idle_tokens_mj": sums[3]},
            )  # fmt: skip


def clear(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for table in (RequestSeal.__table__, RequestEnergy.__table__, BackendEpoch.__table__, Request.__table__):
            conn.execute(sa.delete(table))


def open_store(db_url: str) -> Iterator[sa.Engine]:
    """A migrated engine on ``db_url`` (for a fixture: ``yield from open_store(db_url)``)."""
    engine = make_engine(db_url)
    ensure_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[sa.Engine]:
    yield from open_store(db_url)


# -- the property ----------------------------------------------------------------------------------------------


@st.composite
def random_ledger(draw: st.DrawFn) -> tuple[list[Req], list[Epoch], list[str]]:
    """Requests with rows in random epochs (stored idle shares included), some of them sealed."""
    n_requests = draw(st.integers(1, 6))
    requests = [
        Req(
            request_id=f"r{i}",
            tenant=draw(st.sampled_from(["t0", "t1"])),
            received_ns=i,
            released_ns=i,
            done_ns=10 * S,
            prompt_tokens=draw(st.integers(0, 500)),
            generated_tokens=draw(st.integers(0, 500)),
        )
        for i in range(n_requests)
    ]
    epochs = []
    for k in range(draw(st.integers(1, 5))):
        members = draw(st.lists(st.sampled_from([r.request_id for r in requests]), unique=True, max_size=n_requests))
        money = st.integers(0, 5000)
        rows = [
            Row(rid, k * S, draw(money), draw(money), draw(st.integers(0, S)), idle_time_mj=draw(money),
                idle_tokens_mj=draw(money))
            for rid in members
        ]  # fmt: skip
        epochs.append(Epoch(k * S, (k + 1) * S, idle_mj=draw(st.integers(0, 100_000)), rows=rows))
    sealed = draw(st.lists(st.sampled_from([r.request_id for r in requests]), unique=True))
    return requests, epochs, sealed


def _stored(epochs: list[Epoch], rid: str) -> tuple[int, int, int, int]:
    rows = [row for e in epochs for row in e.rows if row.request_id == rid]
    return (
        sum(r.prefill_mj for r in rows),
        sum(r.decode_mj for r in rows),
        sum(r.idle_time_mj for r in rows),
        sum(r.idle_tokens_mj for r in rows),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ledger=random_ledger(), policy=st.sampled_from(list(IdlePolicy)), data=st.data())
def test_every_report_shows_each_request_its_own_stored_figures(
    store: sa.Engine, ledger: tuple[list[Req], list[Epoch], list[str]], policy: IdlePolicy, data: st.DataObject
) -> None:
    """GetRequestEnergy, ListRequests (any page size), a fetch of any subset and GetUsage give every request the
    same figures: its stored integers, never a share recomputed from its neighbours. A sealed request shows its
    seal even after its rows changed."""
    requests, epochs, sealed = ledger
    clear(store)
    insert(store, requests, epochs)
    seal(store, sealed)
    if sealed:  # rows of a sealed request changed afterwards (the engine never does this): the seal still shows
        with store.begin() as conn:
            conn.execute(sa.text("UPDATE request_energy SET prefill_mj = prefill_mj + 7 WHERE request_id = :r"),
                         {"r": sealed[0]})  # fmt: skip
    options = ReportOptions(idle_policy=policy)
    pick = {IdlePolicy.NONE: lambda f: 0, IdlePolicy.TIME: lambda f: f[2], IdlePolicy.TOKENS: lambda f: f[3]}[policy]
    want = {r.request_id: _stored(epochs, r.request_id) for r in requests}
    ids = [r.request_id for r in requests]
    subset = data.draw(st.lists(st.sampled_from(ids), unique=True, min_size=1))
    page_size = data.draw(st.integers(1, 7))
    with store.connect() as conn:
        every = fetch_reports(conn, ids, options)
        some = fetch_reports(conn, subset, options)
        one = {rid: get_request_energy(conn, rid, options) for rid in ids}
        listed: dict[str, object] = {}
        token = ""
        while True:
            page = list_requests(conn, RequestFilter(), options, page_size=page_size, page_token=token)
            listed.update((r.request_id, r) for r in page.requests)
            token = page.next_page_token
            if not token:
                break
        usage = get_usage(conn, options, end_ns=20 * S, group_by=GroupBy.TENANT)
    assert set(every) == set(listed) == set(ids)
    for rid in ids:
        r = every[rid]
        assert one[rid] == r == listed[rid]
        if rid in some:
            assert some[rid] == r
        assert (r.prefill_mj, r.decode_mj, r.idle_mj) == (want[rid][0], want[rid][1], pick(want[rid]))
        assert r.final is (rid in sealed)
    totals = [sum(every[rid].total_j for rid in ids if every[rid].tenant == row.key) for row in usage.rows]
    assert all(math.isclose(row.total_j, t, abs_tol=1e-9) for row, t in zip(usage.rows, totals, strict=True))
    assert usage.total.provisional_requests == len(ids) - len(sealed)
