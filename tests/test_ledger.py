"""meter.ledger over real databases: idempotency, ordering, outages (a real TCP cut), crash recovery, speed."""

from __future__ import annotations

import gc
import itertools
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from meter.journal import Journal, JournalLockedError
from meter.ledger import Ledger
from meter.samples import Sample
from meter.store import make_engine, upgrade
from meter.store.models import Request as RequestRow
from meter.store.models import Sample as SampleRow
from meter.timeline import Api, RequestStart, Timeline
from tests.conftest import REPO_ROOT, _postgres_database
from tests.tcp_cut import TcpCut

T0 = 1_700_000_000_000_000_000
_DATA_COLUMNS = [c.name for c in RequestRow.__table__.c if c.name != "ingested_ns"]


def start_of(i: int, *, backend: str = "b1", tenant: str = "acme") -> RequestStart:
    return RequestStart(f"r{i}", tenant, "m", backend, T0 + i, T0 + i + 5)


def timeline_of(i: int, *, tokens: int = 20, backend: str = "b1", tenant: str = "acme", status: str = "OK") -> Timeline:
    return Timeline(
        request_id=f"r{i}",
        tenant=tenant,
        model_id="m",
        backend=backend,
        received_ns=T0 + i,
        released_ns=T0 + i + 5,
        first_token_ns=T0 + i + 50,
        done_ns=T0 + i + 500 + tokens,
        prompt_tokens=7,
        generated_tokens=tokens,
        status=status,
        traffic_class="batch",
        api=Api.HTTP,
        correlation_id=f"c{i}",
    )


def expected_open(s: RequestStart) -> dict[str, Any]:
    return {
        "request_id": s.request_id,
        "tenant": s.tenant,
        "model_id": s.model_id,
        "backend": s.backend,
        "traffic_class": None,
        "api": None,
        "status": None,
        "correlation_id": None,
        "received_ns": s.received_ns,
        "released_ns": s.released_ns,
        "first_token_ns": None,
        "done_ns": None,
        "prompt_tokens": 0,
        "prompt_tokens_estimated": False,
        "generated_tokens": 0,
    }


def expected_done(t: Timeline) -> dict[str, Any]:
    return {c: (str(getattr(t, c)) if c == "api" else getattr(t, c)) for c in _DATA_COLUMNS}


def request_rows(engine: sa.Engine, *, with_ingested: bool = False) -> dict[str, dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(RequestRow.__table__)).mappings().all()
    return {r["request_id"]: {k: v for k, v in r.items() if with_ingested or k != "ingested_ns"} for r in rows}


def sample_rows(engine: sa.Engine) -> list[tuple[str, int, int | None, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(SampleRow.device, SampleRow.t_ns, SampleRow.energy_mj, SampleRow.error).order_by(
                SampleRow.device, SampleRow.t_ns
            )
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def wait_until(predicate: Any, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def migrated(db_url: str) -> Iterator[tuple[str, sa.Engine]]:
    upgrade(db_url)
    engine = make_engine(db_url)
    yield db_url, engine
    engine.dispose()


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _postgres_database()


@pytest.fixture
def sqlite_migrated(tmp_path: Path) -> Iterator[tuple[str, sa.Engine]]:
    """For tests of dialect-independent logic (the journal), which need not pay for a PostgreSQL database."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    yield url, engine
    engine.dispose()


def ledger_for(url: str | sa.Engine, journal: Path, **kw: Any) -> Ledger:
    kw.setdefault("flush_interval_s", 0.02)
    kw.setdefault("retry_initial_s", 0.02)
    kw.setdefault("retry_max_s", 0.2)
    return Ledger(url, journal, **kw)


# -- content and idempotency -------------------------------------------------------------------------------------


def test_rows_arrive_with_their_content(migrated: tuple[str, sa.Engine], tmp_path: Path) -> None:
    url, engine = migrated
    samples = [Sample("nvml:GPU-a", T0 + k, 1000 + k) for k in range(3)]
    samples += [Sample("nvml:GPU-b", T0 + k, None, "timeout") for k in range(3)]
    with ledger_for(url, tmp_path / "j.jsonl") as ledger:
        for i in range(10):
            ledger.request_started(start_of(i))
        for i in range(6):
            ledger.request_finished(timeline_of(i, tokens=i))
        ledger.add_samples(samples[:3])
        ledger.add_samples(samples[3:])
        ledger.add_samples([])
        assert ledger.flush()
        stats = ledger.stats
    rows = request_rows(engine)
    assert rows == {
        **{f"r{i}": expected_open(start_of(i)) for i in range(6, 10)},
        **{f"r{i}": expected_done(timeline_of(i, tokens=i)) for i in range(6)},
    }
    assert sample_rows(engine) == sorted((s.device, s.t_ns, s.energy_mj, s.error) for s in samples)
    assert stats.written_samples == 6 and stats.journaled == 0 and stats.db_available
    assert (tmp_path / "j.jsonl").stat().st_size == 0


def test_writing_the_same_records_again_changes_nothing(migrated: tuple[str, sa.Engine], tmp_path: Path) -> None:
    url, engine = migrated
    timelines = [timeline_of(i) for i in range(300)]
    samples = [Sample("d", T0 + k, k) for k in range(50)]
    with ledger_for(url, tmp_path / "j.jsonl", batch_size=64) as ledger:
        for t in timelines:
            ledger.request_finished(t)
        ledger.add_samples(samples)
        assert ledger.flush()
        before = request_rows(engine, with_ingested=True)
        time.sleep(0.01)
        for t in timelines:  # the same timelines, the starts that preceded them, and the samples again
            ledger.request_finished(t)
            ledger.request_started(start_of(int(t.request_id[1:])))
        ledger.add_samples(samples)
        assert ledger.flush()
    assert request_rows(engine, with_ingested=True) == before  # ingested_ns included: nothing was rewritten
    assert len(before) == 300 and len(sample_rows(engine)) == 50


def test_a_start_after_its_timeline_never_reopens_the_request(migrated: tuple[str, sa.Engine], tmp_path: Path) -> None:
    url, engine = migrated
    with ledger_for(url, tmp_path / "j.jsonl") as ledger:
        ledger.request_finished(timeline_of(1))
        assert ledger.flush()
        ledger.request_started(start_of(1))  # late, in a later batch
        ledger.request_finished(timeline_of(2))
        ledger.request_started(start_of(2))  # late, in the same batch
        assert ledger.flush()
    assert request_rows(engine) == {"r1": expected_done(timeline_of(1)), "r2": expected_done(timeline_of(2))}


def test_duplicates_in_one_batch_fold_like_sequential_writes(migrated: tuple[str, sa.Engine], tmp_path: Path) -> None:
    url, engine = migrated
    ledger = ledger_for(url, tmp_path / "j.jsonl", flush_interval_s=60)
    ledger.start()
    try:
        ledger.request_started(start_of(1))
        ledger.request_started(start_of(1))
        ledger.request_finished(timeline_of(1, tokens=5))
        ledger.request_finished(timeline_of(1, tokens=9, status="CANCELLED"))  # the last one wins
        ledger.request_started(start_of(2, backend="b2"))
        ledger.request_started(RequestStart("r2", "acme", "m", "b3", T0 + 2, T0 + 99))  # DO NOTHING: first wins
        ledger.add_samples([Sample("d", T0, 1), Sample("d", T0, 1)])
        ledger.add_samples([Sample("d", T0, 1)])
        assert ledger.stats.buffered == 8
        assert ledger.flush()  # one batch: the writer slept through all of it
    finally:
        ledger.close()
    assert request_rows(engine) == {
        "r1": expected_done(timeline_of(1, tokens=9, status="CANCELLED")),
        "r2": expected_open(start_of(2, backend="b2")),
    }
    assert sample_rows(engine) == [("d", T0, 1, None)]


def test_a_changed_timeline_updates_the_row_and_its_ingested_ns(
    migrated: tuple[str, sa.Engine], tmp_path: Path
) -> None:
    url, engine = migrated
    with ledger_for(url, tmp_path / "j.jsonl") as ledger:
        ledger.request_started(start_of(1))
        assert ledger.flush()
        opened = request_rows(engine, with_ingested=True)["r1"]
        time.sleep(0.002)
        ledger.request_finished(timeline_of(1))
        assert ledger.flush()
        done = request_rows(engine, with_ingested=True)["r1"]
        time.sleep(0.002)
        ledger.request_finished(timeline_of(1, tokens=21))  # a correction
        assert ledger.flush()
        corrected = request_rows(engine, with_ingested=True)["r1"]
    assert opened["done_ns"] is None and done["done_ns"] == timeline_of(1).done_ns
    assert corrected["generated_tokens"] == 21
    assert opened["ingested_ns"] < done["ingested_ns"] < corrected["ingested_ns"]


_examples = itertools.count()
_ops = st.lists(
    st.tuples(st.sampled_from(["start", "finish", "flush"]), st.integers(0, 7), st.integers(0, 3)), max_size=40
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_any_interleaving_ends_as_sequential_application(
    migrated: tuple[str, sa.Engine], tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int, int]]
) -> None:
    """Whatever the order and batching, the table holds what applying each record in order would leave."""
    _, engine = migrated
    prefix = f"h{next(_examples)}-"
    model: dict[str, dict[str, Any]] = {}
    with ledger_for(engine, tmp_path_factory.mktemp("j") / "j.jsonl", batch_size=3, flush_interval_s=60) as ledger:
        for op, i, variant in ops:
            rid = f"{prefix}{i}"
            if op == "flush":
                assert ledger.flush()
                continue
            if op == "start":
                s = RequestStart(rid, "acme", "m", f"b{variant}", T0 + i, T0 + i + variant)
                ledger.request_started(s)
                model.setdefault(rid, expected_open(s))
            else:
                t = Timeline(rid, "acme", "m", f"b{variant}", T0, T0 + 1, T0 + 2, T0 + 3 + variant, 1, variant)
                ledger.request_finished(t)
                model[rid] = expected_done(t)
        assert ledger.flush()
    got = {k: v for k, v in request_rows(engine).items() if k.startswith(prefix)}
    assert got == model


# -- outages -------------------------------------------------------------------------------------------------------


class _Stream:
    """A producer thread handing the ledger a steady stream of starts, timelines and samples, timing every call.

    The GC is off while it runs: a collection pauses every thread and is not the ledger's doing.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.latencies_ns: list[int] = []
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer")
        self._gc_was_enabled = gc.isenabled()

    def _run(self) -> None:
        ledger, i = self.ledger, 0
        while not self._stop.is_set():
            now = time.time_ns()
            s = RequestStart(f"r{i}", "acme", "m", "b1", now, now + 1)
            t = Timeline(f"r{i}", "acme", "m", "b1", now, now + 1, now + 2, now + 3, 4, i % 50)
            t0 = time.perf_counter_ns()
            ledger.request_started(s)
            ledger.request_finished(t)
            ledger.add_samples([Sample("gpu0", now, i), Sample("gpu1", now, None, "read failed")])
            self.latencies_ns.append(time.perf_counter_ns() - t0)
            i += 1
            if i % 5 == 0:
                time.sleep(0.001)  # a steady stream (a few thousand requests/s), not a tight loop
        self.count = i

    def __enter__(self) -> _Stream:
        gc.disable()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._gc_was_enabled:
            gc.enable()

    def summary(self) -> str:
        lat = sorted(self.latencies_ns)
        return (
            f"{self.count} requests; hot path (3 calls) p50 {statistics.median(lat) / 1e3:.1f} us, "
            f"p99 {lat[int(0.99 * len(lat))] / 1e3:.1f} us, max {lat[-1] / 1e6:.2f} ms"
        )

    def assert_all_arrived_once(self, engine: sa.Engine) -> None:
        n = self.count
        with engine.connect() as conn:
            req = conn.execute(
                sa.text(
                    "SELECT count(*), count(DISTINCT request_id), count(done_ns), sum(generated_tokens) FROM requests"
                )
            ).one()
            smp = conn.execute(
                sa.text("SELECT device, count(*), count(energy_mj), sum(energy_mj) FROM samples GROUP BY 1")
            )
            by_device = {r[0]: tuple(r[1:]) for r in smp}
        assert tuple(req) == (n, n, n, sum(i % 50 for i in range(n)))  # every request once, every one finished
        assert by_device == {"gpu0": (n, n, n * (n - 1) // 2), "gpu1": (n, 0, None)}


def _through(link: TcpCut, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=link.port).render_as_string(hide_password=False)


def test_a_database_outage_loses_and_doubles_nothing_and_never_blocks(pg_url: str, tmp_path: Path) -> None:
    """A real TCP forwarder between the ledger and PostgreSQL is cut (refused + reset connections) and restored
    while a producer streams starts, timelines and samples; then every row is there exactly once."""
    upgrade(pg_url)
    target = make_url(pg_url)
    journal = tmp_path / "j.jsonl"
    with TcpCut(target.host or "127.0.0.1", target.port or 5432) as link:
        ledger = ledger_for(_through(link, pg_url), journal, engine_kw={"connect_args": {"connect_timeout": 2}})
        ledger.start()
        with _Stream(ledger) as stream:
            time.sleep(0.5)
            link.cut()
            assert wait_until(lambda: not ledger.stats.db_available, 5), "the cut was not noticed"
            time.sleep(1.0)
            during = ledger.stats
            link.restore()
            assert wait_until(lambda: ledger.stats.db_available and not ledger.stats.journal_pending, 15)
            assert link.accepted >= 2  # the writer reconnected through the restored link
            time.sleep(0.3)
        assert ledger.flush(30)
        stats = ledger.stats
        ledger.close()
    direct = make_engine(pg_url)
    stream.assert_all_arrived_once(direct)
    direct.dispose()
    assert during.journaled > 0 and during.journal_pending
    assert stats.replayed >= during.journaled and stats.journal_pending is False
    assert journal.stat().st_size == 0
    print(f"\ncut: {stream.summary()}; journaled {stats.journaled}, replayed {stats.replayed}")
    assert max(stream.latencies_ns) < 50e6, "a hot-path call waited on the database or the disk"


def test_a_hung_database_connection_is_an_outage_too(pg_url: str, tmp_path: Path) -> None:
    """The link stalls (connections stay open, no bytes move): writes time out, the ledger journals, flush still
    returns, and once the link moves again the stuck write and the journal land, each row once."""
    upgrade(pg_url)
    target = make_url(pg_url)
    journal = tmp_path / "j.jsonl"
    with TcpCut(target.host or "127.0.0.1", target.port or 5432) as link:
        ledger = ledger_for(
            _through(link, pg_url), journal, write_timeout_s=0.3, engine_kw={"connect_args": {"connect_timeout": 2}}
        )
        ledger.start()
        with _Stream(ledger) as stream:
            time.sleep(0.3)
            link.stall()
            assert wait_until(lambda: not ledger.stats.db_available, 5), "the stall was not noticed"
            t0 = time.monotonic()
            assert ledger.flush(5)  # journaled, although the database never answered
            flush_s = time.monotonic() - t0
            during = ledger.stats
            time.sleep(0.5)
            link.resume()
            assert wait_until(lambda: ledger.stats.db_available and not ledger.stats.journal_pending, 15)
            time.sleep(0.2)
        assert ledger.flush(30)
        stats = ledger.stats
        ledger.close()
    direct = make_engine(pg_url)
    stream.assert_all_arrived_once(direct)
    direct.dispose()
    assert during.journal_pending and "DatabaseStalledError" in (during.last_error or "")
    assert flush_s < 2
    assert journal.stat().st_size == 0
    print(f"\nstall: {stream.summary()}; journaled {stats.journaled}, replayed {stats.replayed}")
    assert max(stream.latencies_ns) < 50e6


def test_flush_returns_once_records_are_journaled_while_the_database_is_away(tmp_path: Path, unused_port: int) -> None:
    url = f"postgresql://postgres@127.0.0.1:{unused_port}/nowhere"  # nothing listens: connection refused
    with ledger_for(url, tmp_path / "j.jsonl") as ledger:
        ledger.request_finished(timeline_of(1))
        ledger.add_samples([Sample("d", T0, 1)])
        t0 = time.monotonic()
        assert ledger.flush(10)
        assert time.monotonic() - t0 < 5
        stats = ledger.stats
    assert not stats.db_available and stats.journal_pending and stats.journaled == 2
    assert stats.last_error is not None and "OperationalError" in stats.last_error
    with Journal(tmp_path / "j.jsonl") as journal:
        assert [r["k"] for r in journal.read()] == ["t", "m"]


def test_an_unmigrated_database_is_an_outage_not_a_reason_to_drop_rows(db_url: str, tmp_path: Path) -> None:
    engine = make_engine(db_url)
    with ledger_for(engine, tmp_path / "j.jsonl") as ledger:
        ledger.request_finished(timeline_of(1))
        assert ledger.flush()
        assert ledger.stats.journal_pending and ledger.stats.rejected == 0
        upgrade(db_url)
        assert wait_until(lambda: not ledger.stats.journal_pending)
        assert ledger.flush()
    assert request_rows(engine) == {"r1": expected_done(timeline_of(1))}
    engine.dispose()


# -- crash recovery ------------------------------------------------------------------------------------------------

_CRASHING_CHILD = """
import os, sys
from meter.ledger import Ledger
from meter.samples import Sample
from tests.test_ledger import start_of, timeline_of, T0
ledger = Ledger(sys.argv[1], sys.argv[2], flush_interval_s=0.02, retry_initial_s=0.05)
ledger.start()
for i in range(200):
    ledger.request_started(start_of(i))
for i in range(150):
    ledger.request_finished(timeline_of(i))
ledger.add_samples([Sample("d", T0 + k, k) for k in range(40)])
assert ledger.flush(10) and ledger.stats.journal_pending
os._exit(17)  # a crash: no close, nothing replayed
"""


def test_a_journal_left_by_a_crashed_process_is_replayed_at_the_next_start(
    migrated: tuple[str, sa.Engine], tmp_path: Path, unused_port: int
) -> None:
    url, engine = migrated
    journal = tmp_path / "j.jsonl"
    dead_db = f"postgresql://postgres@127.0.0.1:{unused_port}/gone"
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CRASHING_CHILD), dead_db, str(journal)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 17, child.stderr
    with Journal(journal) as j:
        left = len(j)
    assert 200 + 40 <= left <= 350 + 40  # a start folds away when its timeline shares its batch
    with ledger_for(url, journal) as ledger:  # takes the journal over (the dead process's lock is gone)
        assert wait_until(lambda: not ledger.stats.journal_pending)
        assert ledger.flush()
        stats = ledger.stats
    assert stats.replayed == left
    rows = request_rows(engine)
    assert rows == {
        **{f"r{i}": expected_open(start_of(i)) for i in range(150, 200)},
        **{f"r{i}": expected_done(timeline_of(i)) for i in range(150)},
    }
    assert len(sample_rows(engine)) == 40
    assert journal.stat().st_size == 0
    # A second replay of the same journal content (a crash between commit and truncate) changes nothing.
    before = request_rows(engine, with_ingested=True)
    with Journal(journal) as j:
        j.append([{"k": "t", **{c: v for c, v in expected_done(timeline_of(3)).items()}}])
    with ledger_for(url, journal) as ledger:
        assert wait_until(lambda: not ledger.stats.journal_pending) and ledger.flush()
    assert request_rows(engine, with_ingested=True) == before


def test_a_partially_written_last_line_is_skipped_with_a_warning(
    sqlite_migrated: tuple[str, sa.Engine], tmp_path: Path
) -> None:
    url, engine = sqlite_migrated
    journal = tmp_path / "j.jsonl"
    with Journal(journal) as j:
        j.append([{"k": "s", **{c: v for c, v in expected_open(start_of(1)).items()}}])
    with journal.open("ab") as f:
        f.write(b'{"k":"t","request_id":"r2","ten')  # the crash hit mid-write
    with structlog.testing.capture_logs() as logs, ledger_for(url, journal) as ledger:
        ledger.request_finished(timeline_of(3))  # must not glue onto the broken line
        assert wait_until(lambda: not ledger.stats.journal_pending) and ledger.flush()
    assert set(request_rows(engine)) == {"r1", "r3"}
    assert any("partially written" in e["event"] and e["log_level"] == "warning" for e in logs)


def test_two_ledgers_cannot_share_a_journal(sqlite_migrated: tuple[str, sa.Engine], tmp_path: Path) -> None:
    url, _ = sqlite_migrated
    with ledger_for(url, tmp_path / "j.jsonl"), pytest.raises(JournalLockedError):
        ledger_for(url, tmp_path / "j.jsonl").start()


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_written(pg_url: str, tmp_path: Path) -> None:
    upgrade(pg_url)
    engine = make_engine(pg_url)
    with ledger_for(engine, tmp_path / "j.jsonl") as ledger:
        ledger.request_finished(timeline_of(1))
        ledger.request_finished(timeline_of(2, tenant="bad\x00tenant"))  # PostgreSQL text cannot hold NUL
        ledger.request_finished(timeline_of(3))
        assert ledger.flush()
        stats = ledger.stats
    assert set(request_rows(engine)) == {"r1", "r3"}
    assert stats.rejected == 1 and stats.db_available and not stats.journal_pending
    with Journal(tmp_path / "j.jsonl.rejected") as rejected:
        (record,) = list(rejected.read())
    assert record["request_id"] == "r2" and record["tenant"] == "bad\x00tenant" and record["rejected_because"]
    engine.dispose()


# -- speed ---------------------------------------------------------------------------------------------------------


def test_the_hot_path_costs_microseconds(tmp_path: Path) -> None:
    """Each call timed on its own while the writer thread drains into SQLite (so it competes for the GIL)."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    timelines = [timeline_of(i) for i in range(20_000)]
    samples = [[Sample("d", T0 + i, i)] for i in range(20_000)]
    cost_ns: list[int] = []
    with ledger_for(url, tmp_path / "j.jsonl", flush_interval_s=0.05) as ledger:
        clock = time.perf_counter_ns
        for t, s in zip(timelines, samples, strict=True):
            t0 = clock()
            ledger.request_finished(t)
            t1 = clock()
            ledger.add_samples(s)
            cost_ns.append(t1 - t0)
            cost_ns.append(clock() - t1)
        assert ledger.flush(60)
        assert ledger.stats.written_requests == 20_000
    cost_ns.sort()
    p50_us, p99_us = cost_ns[len(cost_ns) // 2] / 1e3, cost_ns[int(0.99 * len(cost_ns))] / 1e3
    print(f"\nhot path: p50 {p50_us:.2f} us, p99 {p99_us:.2f} us per call (writer running)")
    assert p50_us < 10


def test_bulk_write_rate(migrated: tuple[str, sa.Engine], tmp_path: Path) -> None:
    """Starts then timelines of 20k requests (two upserts each), written through the ledger; prints the rate."""
    url, engine = migrated
    n = 20_000
    starts = [start_of(i) for i in range(n)]
    timelines = [timeline_of(i) for i in range(n)]
    with ledger_for(url, tmp_path / "j.jsonl", flush_interval_s=0.05) as ledger:
        t0 = time.perf_counter()
        for s in starts:
            ledger.request_started(s)
        assert ledger.flush(60)
        t1 = time.perf_counter()
        for t in timelines:
            ledger.request_finished(t)
        assert ledger.flush(60)
        t2 = time.perf_counter()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count(RequestRow.done_ns))).scalar() == n
    dialect = engine.dialect.name
    print(f"\n{dialect}: {n / (t1 - t0):,.0f} starts/s, {n / (t2 - t1):,.0f} timelines/s (updating open rows)")
    assert n / (t2 - t1) > 3_000  # a loose floor for a shared 2-core box; the report quotes measured figures
