"""Rows for report tests, and a plain-Python oracle of the idle policies that the SQL must agree with.

The helpers here build the metering tables by hand (``requests``, ``request_energy``, ``backend_epochs``: the
contract between the attribution engine and the reports); other report tests import them. The hypothesis test at
the bottom holds the SQL idle shares to the oracle on random epochs, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meter.reports import IdlePolicy, ReportSettings, fetch_reports
from meter.store import ensure_schema, make_engine
from meter.store.models import BackendEpoch, Request, RequestEnergy

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


@dataclass
class Row:
    request_id: str
    epoch_start_ns: int
    prefill_mj: int
    decode_mj: int
    active_ns: int
    backend: str = "b1"


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

    def record(self) -> dict[str, object]:
        prefill = sum(r.prefill_mj for r in self.rows)
        decode = sum(r.decode_mj for r in self.rows)
        return {
            "backend": self.backend,
            "epoch_start_ns": self.epoch_start_ns,
            "epoch_end_ns": self.epoch_end_ns,
            "first_reading_ns": self.epoch_start_ns,
            "last_reading_ns": self.epoch_end_ns if self.last_reading_ns is None else self.last_reading_ns,
            "counter_mj": prefill + decode + self.idle_mj,
            "attributed_mj": prefill + decode,
            "prefill_mj": prefill,
            "decode_mj": decode,
            "idle_mj": self.idle_mj,
            "samples": self.samples,
            "gaps": self.gaps,
            "active_ns_total": sum(r.active_ns for r in self.rows),
            "attributed_at_ns": self.attributed_at_ns,
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


def clear(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        for table in (RequestEnergy.__table__, BackendEpoch.__table__, Request.__table__):
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


# -- the oracle -------------------------------------------------------------------------------------------------


def oracle_idle_shares(requests: list[Req], epochs: list[Epoch], policy: IdlePolicy) -> dict[str, float]:
    """Each request's idle share in mJ, straight from the definitions in meter.reports.energy."""
    shares: dict[str, float] = defaultdict(float)
    if policy is IdlePolicy.NONE:
        return shares
    tokens = {r.request_id: r.prompt_tokens + r.generated_tokens for r in requests}
    active_total: dict[str, int] = defaultdict(int)
    for e in epochs:
        for row in e.rows:
            active_total[row.request_id] += row.active_ns
    for e in epochs:
        if policy is IdlePolicy.TIME:
            weights = {row.request_id: float(row.active_ns) for row in e.rows}
        else:
            weights = {
                row.request_id: tokens[row.request_id] * row.active_ns / active_total[row.request_id]
                for row in e.rows
                if active_total[row.request_id] > 0
            }
        total = sum(weights.values())
        if total > 0:
            for rid, w in weights.items():
                shares[rid] += e.idle_mj * w / total
    return shares


@st.composite
def random_ledger(draw: st.DrawFn) -> tuple[list[Req], list[Epoch]]:
    n_requests = draw(st.integers(1, 6))
    requests = [
        Req(
            request_id=f"r{i}",
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
        rows = [
            Row(rid, k * S, draw(st.integers(0, 5000)), draw(st.integers(0, 5000)), draw(st.integers(0, S)))
            for rid in members
        ]
        for row in rows:
            row.epoch_start_ns = k * S
        epochs.append(Epoch(k * S, (k + 1) * S, idle_mj=draw(st.integers(0, 100_000)), rows=rows))
    return requests, epochs


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ledger=random_ledger(), policy=st.sampled_from(list(IdlePolicy)))
def test_sql_idle_shares_match_the_oracle_and_conserve(
    store: sa.Engine, ledger: tuple[list[Req], list[Epoch]], policy: IdlePolicy
) -> None:
    requests, epochs = ledger
    clear(store)
    insert(store, requests, epochs)
    with store.connect() as conn:
        got = fetch_reports(conn, [r.request_id for r in requests], ReportSettings(idle_policy=policy))
    want = oracle_idle_shares(requests, epochs, policy)
    for r in requests:
        assert math.isclose(got[r.request_id].idle_mj, want.get(r.request_id, 0.0), rel_tol=1e-9, abs_tol=1e-6)
        rows = [row for e in epochs for row in e.rows if row.request_id == r.request_id]
        assert got[r.request_id].prefill_mj == sum(row.prefill_mj for row in rows)
        assert got[r.request_id].decode_mj == sum(row.decode_mj for row in rows)
    # Conservation: every epoch whose rows weigh something gives away exactly its idle energy.
    if policy is not IdlePolicy.NONE:
        shared = sum(want.values())
        assert math.isclose(sum(g.idle_mj for g in got.values()), shared, rel_tol=1e-9, abs_tol=1e-6)
        if policy is IdlePolicy.TIME:
            assert math.isclose(
                shared, sum(e.idle_mj for e in epochs if sum(r.active_ns for r in e.rows) > 0), abs_tol=1e-6
            )
