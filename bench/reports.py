"""What a usage report over a fleet's month costs on PostgreSQL, at 1M and at 100M requests, and a request by id.

    .venv/bin/python -m bench.reports [--quick] [--explain] [--repeat 5] [--postgres ADMIN_URL]

Each case runs in a fresh database (made and dropped here). Requests are finished and sealed (every figure final),
received over 30 days across 8 backends, 4 tenants and 3 models, written as the product writes them: timelines by the
ledger's bulk path (``BulkWriter``: COPY), one ``request_energy`` row each by the engine's ``meter.engine.sql``
insert (COPY), the seals and epochs that its other inserts write, by COPY too; request ids are random 32-hex
strings like the gateway's. The engine's own rollup job (``meter.engine.rollup.Rollup``) rolls the hours up; the
1M case's build time (``build_1m_s``) includes it. The report is ``meter.reports.get_usage`` grouped by tenant,
the function behind ``GetUsage`` and ``joulegate report usage``, over [start + 17 min, end - 23 min) of the month:
all 720 hours from the rollup, minus the raw rows of the 17 and the 23 minutes outside the range (an edge hour
covered for more than half is read so; otherwise its part inside is read raw). Median of ``--repeat`` runs.

1M case (``--quick`` runs only this one): 1M real requests, all rows present; the report is also run from raw rows
alone once (``rollups=False``) and must give the same integers.

100M case: 100,000,080 requests (138,889 per hour for 720 hours), but not 100M rows: Python cannot write them on a
2-core box in the time, and their ~60 GB do not fit the disk budget. What the database holds:
- real rows, written as above, for the first 2 and the last 3 hours of the month (694,445 requests, with their
  energy rows, epochs and seals): every raw row the report reads (its edges), and the rows around them that an
  index range over them could meet;
- the engine's rollup (its own code) of those 5 hours, and for each of the 715 hours between them a copy of the
  engine's rollup of the month's second hour (a real hour of 138,889 requests), made server-side with
  INSERT ... SELECT; and the same copies for the 11 months before (a ledger a year old: 8,640 rolled hours,
  207k rollup rows), so the report must find its month by the rollup's index;
- no raw rows for the hours in the middle. The report never reads them: a rolled hour is read from the rollup,
  and the raw part (``_per_request_probed`` in ``meter.reports.usage``) reads requests by the ``received_ns`` index
  within each edge range, seals by the ``(backend, done_ns)`` index between the first and the last end of those
  requests, and anything else by key; so what it reads depends on the edges, not on the size of the tables.
``--explain`` prints the plans of every query of the report (and of the lookups) and fails on a sequential scan of
``requests``, ``request_energy``, ``request_seals`` (or ``usage_final_hourly`` in the 100M case). What the case
does not show: the cache misses of a 100M-row ledger (the real hours' pages are all in memory here), and the
planner's choice over tables that big (the plans are bounded by design, and checked to use the indexes). The 100M
report is also timed over gRPC: ``GetUsage`` to the product's reports server on that database, with an admin key.
Its figures are checked against the raw report of the real hours plus the copied hours' rollup rows.

Lookups (in each case): ``get_request_energy`` (the ``GetRequestEnergy`` query) of 200 random ids, and the first
and the 22nd page (keyset token) of ``ListRequests`` for one tenant. In the 100M case the ``requests`` table holds
the 694k real rows: the lookups are key probes, whose cost grows with the depth of the index only.

The last line is ``RESULT usage_1m_s=... usage_100m_s=... request_lookup_ms=... usage_100m_grpc_s=...
list_deep_ms=... request_lookup_1m_ms=... list_deep_1m_ms=... usage_1m_raw_s=... build_1m_s=... build_100m_s=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa

from bench._procs import postgres_database
from meter.engine import sql
from meter.engine.rollup import Rollup
from meter.reports import ReportOptions, get_request_energy, get_usage, list_requests
from meter.reports.energy import RQ
from meter.reports.requests import RequestFilter
from meter.reports.types import UsageReport
from meter.reports.usage import UF, UH, US
from meter.store import make_engine, upgrade
from meter.store.bulk import BulkWriter

POSTGRES_ADMIN_URL = os.environ.get("JOULEGATE_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_S = 1_000_000_000
_HOUR = 3600 * _S
_EPOCH_NS = 10 * _S
_BATCH = 50_000
T = TypeVar("T")


@contextmanager
def fresh_database(kind: str, admin_url: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as d:
            yield f"sqlite:///{Path(d) / 'reports.db'}"
        return
    with postgres_database(admin_url) as url:
        yield url


def build(db: sa.Engine, segments: list[tuple[int, int, int]], seed: int = 7, ledger_end_ns: int | None = None) -> int:
    """Finished, sealed requests: for each ``(t0, span, n)`` of ``segments``, n received uniformly over
    [t0, t0 + span), with their energy rows and epochs. Returns how many were written."""
    rnd = random.Random(seed)
    r = rnd.random  # uniform draws by one multiplication: randrange costs a quarter of the build at 1M
    writer = BulkWriter.for_dialect(db.dialect)
    backends = [f"b{i}" for i in range(8)]
    epochs: dict[tuple[str, int], list[int]] = {}
    end = ledger_end_ns if ledger_end_ns is not None else max(t0 + span for t0, span, _ in segments)
    base = 0
    for t0_ns, span_ns, n in segments:
        for lo in range(0, n, _BATCH):
            timelines, energy, seals = [], [], []
            for j in range(lo, min(n, lo + _BATCH)):
                i = base + j
                rid = f"{rnd.getrandbits(128):032x}"  # like the gateway's ids (uuid4 hex): random in the key
                received = t0_ns + int(r() * span_ns)
                released = received + int(r() * 50_000_000)
                first = released + 20_000_000 + int(r() * 180_000_000)
                done = first + 100_000_000 + int(r() * (5 * _S - 100_000_000))
                backend = backends[i % len(backends)]
                prompt, generated = 20 + int(r() * 1980), 1 + int(r() * 499)
                pre, dec = 1000 + int(r() * 49_000), 1000 + int(r() * 199_000)
                idle_t, idle_k = int(r() * 5000), int(r() * 5000)
                start = done - done % _EPOCH_NS
                timelines.append((rid, f"tenant-{i % 4}", f"model-{i % 3}", backend, "default", "http", "OK", None,
                                  received, released, first, done, prompt, False, generated, 0))  # fmt: skip
                energy.append(sql.RequestEnergyRow(rid, start, backend, pre, dec, done - released, idle_t, idle_k))
                seals.append(sql.SealRow(rid, backend, done, done + 60 * _S, pre, dec, idle_t, idle_k))
                acc = epochs.setdefault((backend, start), [0, 0, 0, 0])
                acc[0] += pre
                acc[1] += dec
                acc[2] += idle_t
                acc[3] += done - released
            with db.begin() as conn:
                writer.write(conn, [], timelines, [], end)
                sql.insert_request_energy(conn, energy)
                copy_rows(conn, "request_seals", sql.SEAL_COLUMNS, seals)
        base += n
    rows = [
        sql.BackendEpochRow(b, s, s + _EPOCH_NS, s, s + _EPOCH_NS, pre + dec + idle, pre + dec, pre, dec, idle, 100, 0,
                            active, end, 0)
        for (b, s), (pre, dec, idle, active) in sorted(epochs.items())
    ]  # fmt: skip
    with db.begin() as conn:
        for lo in range(0, len(rows), _BATCH):
            copy_rows(conn, "backend_epochs", sql.BACKEND_EPOCH_COLUMNS, rows[lo : lo + _BATCH])
    vacuum_analyze(db)
    return base


def copy_rows(conn: sa.Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """The rows that ``meter.engine.sql``'s inserts write (``insert_seals``, ``insert_backend_epochs``), by COPY
    (PostgreSQL) in the caller's transaction; an INSERT per row on SQLite."""
    if conn.dialect.name != "postgresql":
        marks = ", ".join("?" * len(columns))
        conn.exec_driver_sql(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", list(rows))
        return
    raw: Any = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for r in rows:
            copy.write_row(r)


def vacuum_analyze(db: sa.Engine) -> None:
    if db.dialect.name == "postgresql":
        with db.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) * 1000, out


def usage_over(db: sa.Engine, start: int, end: int, *, rollups: bool = True) -> tuple[float, UsageReport]:
    """One usage report grouped by tenant, as ``GetUsage`` and ``joulegate report usage`` run it (``get_usage``)."""
    with db.connect() as conn:
        return timed(lambda: get_usage(conn, ReportOptions(), start_ns=start, end_ns=end, rollups=rollups))


def same_rows(a: UsageReport, b: UsageReport) -> None:
    assert a.total.requests == b.total.requests, (a.total, b.total)
    for x, y in zip(a.rows, b.rows, strict=True):
        assert (x.key, x.requests, x.prompt_tokens, x.generated_tokens, x.prefill_mj, x.decode_mj, x.idle_mj) == (
            y.key, y.requests, y.prompt_tokens, y.generated_tokens, y.prefill_mj, y.decode_mj, y.idle_mj
        ), (x, y)  # fmt: skip


def plans(db: sa.Engine, fn: Callable[[sa.Connection], object]) -> list[str]:
    """EXPLAIN ANALYZE of every SELECT that ``fn`` runs (PostgreSQL): the scan lines of each plan."""
    seen: list[tuple[str, object]] = []

    def grab(conn: object, cursor: object, statement: str, parameters: object, context: object, many: bool) -> None:
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            seen.append((statement, parameters))

    with db.connect() as conn:
        sa.event.listen(conn, "before_cursor_execute", grab)
        fn(conn)
        sa.event.remove(conn, "before_cursor_execute", grab)
        out = []
        for statement, parameters in seen:
            conn.exec_driver_sql("SET LOCAL jit = off")
            lines = conn.exec_driver_sql("EXPLAIN (ANALYZE, TIMING OFF) " + statement, parameters).scalars().all()
            out.append(" | ".join(x.strip() for x in lines if "Scan" in x or "Execution Time" in x))
        conn.rollback()
    return out


def check_plans(lines: list[str], big: tuple[str, ...]) -> None:
    """No sequential scan of a big table in any plan."""
    for line in lines:
        for table in big:
            assert f"Seq Scan on {table} " not in line, line


def lookup_plans(db: sa.Engine, rid: str) -> list[str]:
    options = ReportOptions()
    flt = RequestFilter(tenant="tenant-1")
    lines = plans(db, lambda c: get_request_energy(c, rid, options))
    with db.connect() as conn:
        token = list_requests(conn, flt, options).next_page_token
    lines += plans(db, lambda c: list_requests(c, flt, options, page_token=token))
    return lines


def grpc_usage(db: sa.Engine, start: int, end: int, repeat: int, want: UsageReport) -> list[float]:
    """``GetUsage`` (grouped by tenant) over the wire to the product's reports server on this database, with an
    admin key: ms per call, and the answer must be ``want``'s."""
    import grpc
    from google.protobuf import timestamp_pb2

    from meter.auth import Authenticator
    from meter.pb.joulegate.v1 import energy_pb2 as pb
    from meter.pb.joulegate.v1 import energy_pb2_grpc as pb_grpc
    from meter.reports import BillingSettings
    from meter.reports_api import start_reports_server
    from meter.store.keys import create_key, lookup_key

    key = create_key(db, "bench-ops", admin=True).key

    def ts(ns: int) -> timestamp_pb2.Timestamp:
        return timestamp_pb2.Timestamp(seconds=ns // _S, nanos=ns % _S)

    async def go() -> list[float]:
        server = await start_reports_server(
            db, Authenticator(lambda k: lookup_key(db, k)), BillingSettings(), "127.0.0.1:0"
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.EnergyReportsStub(channel)
                md = (("authorization", f"Bearer {key}"),)
                ask = pb.GetUsageRequest(start=ts(start), end=ts(end), group_by=pb.GetUsageRequest.TENANT)
                await stub.GetUsage(ask, metadata=md)  # the key's lookup, cached by the server from now on
                out = []
                for _ in range(repeat):
                    t = time.perf_counter()
                    got = await stub.GetUsage(ask, metadata=md)
                    out.append((time.perf_counter() - t) * 1000)
                    assert [(r.key, r.requests) for r in got.rows] == [(r.key, r.requests) for r in want.rows]
                return out
        finally:
            await server.stop(0)

    return asyncio.run(go())


def sample_ids(db: sa.Engine, n: int) -> list[str]:
    with db.connect() as conn:
        return list(conn.execute(sa.select(RQ.c.request_id).order_by(sa.func.random()).limit(n)).scalars())


def lookups(db: sa.Engine, ids: list[str], repeat: int) -> tuple[float, float, float]:
    """Median ms of: one request's energy by id (``GetRequestEnergy``'s query), the first ``ListRequests`` page of
    a tenant (100), and a page deep into it (keyset token after 20 pages)."""
    one, first, deep = [], [], []
    options = ReportOptions()
    for _ in range(repeat):
        rid = ids[len(one) % len(ids)]
        with db.connect() as conn:
            ms, got = timed(lambda c=conn, r=rid: get_request_energy(c, r, options))
        assert got is not None and got.request_id == rid and got.final
        one.append(ms)
    flt = RequestFilter(tenant="tenant-1")
    for _ in range(max(3, repeat // 20)):
        with db.connect() as conn:
            ms, page = timed(lambda c=conn: list_requests(c, flt, options))
            first.append(ms)
            token = page.next_page_token
            for _ in range(20):
                token = list_requests(conn, flt, options, page_token=token).next_page_token
            ms, page = timed(lambda c=conn, t=token: list_requests(c, flt, options, page_token=t))
            assert len(page.requests) == 100
            deep.append(ms)
    return statistics.median(one), statistics.median(first), statistics.median(deep)


def case_1m(admin: str, n: int, days: int, repeat: int, raw_repeat: int, explain: bool) -> dict[str, float]:
    t0 = 472_222 * _HOUR  # an hour boundary
    span = days * 24 * _HOUR
    out: dict[str, float] = {}
    with fresh_database("postgres", admin) as url:
        upgrade(url)
        db = make_engine(url)
        t = time.perf_counter()
        build(db, [(t0, span, n)])
        print(f"1M case: wrote {n:,} requests over {days} days in {time.perf_counter() - t:.1f} s")
        now = t0 + span + 2 * _HOUR
        roll_ms, done = timed(lambda: Rollup(max_hours_per_pass=days * 24 + 2).run(db, now, now))
        out["build_1m_s"] = time.perf_counter() - t
        print(
            f"1M case: rollup: {done.rolled_hours} hours rolled in {roll_ms:.0f} ms; built in {out['build_1m_s']:.1f} s"
        )
        start, end = t0 + 17 * 60 * _S, t0 + span - 23 * 60 * _S  # mid-hour edges: raw rows there
        rolled_ms, raw_ms = [], []
        for i in range(repeat):
            ms, rolled = usage_over(db, start, end)
            rolled_ms.append(ms)
            if i < raw_repeat:
                ms, raw = usage_over(db, start, end, rollups=False)
                raw_ms.append(ms)
                same_rows(raw, rolled)
        out["usage_1m_s"] = statistics.median(rolled_ms) / 1000
        print(f"1M case: usage over {rolled.total.requests:,} requests: {out['usage_1m_s'] * 1000:.1f} ms (runs: "
              + " ".join(f"{x:.0f}" for x in rolled_ms) + ")")  # fmt: skip
        if raw_ms:
            out["usage_1m_raw_s"] = statistics.median(raw_ms) / 1000
            print(f"1M case: the same from raw rows only: {out['usage_1m_raw_s'] * 1000:.0f} ms")
        if explain:
            lines = plans(db, lambda c: get_usage(c, ReportOptions(), start_ns=start, end_ns=end))
            print("1M case: plans of the usage report:\n  " + "\n  ".join(lines))
            check_plans(lines, ("requests", "request_energy", "request_seals"))  # the rollup holds this month only
        one, first, deep = lookups(db, sample_ids(db, 200), 200)
        out["request_lookup_1m_ms"], out["list_first_1m_ms"], out["list_deep_1m_ms"] = one, first, deep
        print(f"1M case: request by id {one:.2f} ms; ListRequests page 1 {first:.1f} ms, page 22 {deep:.1f} ms")
        db.dispose()
    return out


def case_100m(admin: str, total: int, days: int, repeat: int, explain: bool) -> dict[str, float]:
    """``total`` requests over ``days`` days, as the report reads them (module docstring: what the case holds)."""
    hours = days * 24
    per_hour = -(-total // hours)
    t0 = 472_222 * _HOUR
    span = hours * _HOUR
    head, tail = 2, 3  # real hours at the start and at the end of the month
    out: dict[str, float] = {}
    with fresh_database("postgres", admin) as url:
        upgrade(url)
        db = make_engine(url)
        t = time.perf_counter()
        segments = [(t0 + h * _HOUR, _HOUR, per_hour) for h in (*range(head), *range(hours - tail, hours))]
        real = build(db, segments, ledger_end_ns=t0 + span)
        now = t0 + span + 2 * _HOUR
        done = Rollup(max_hours_per_pass=hours + 2).run(db, now, now)
        assert done.rolled_hours == hours + 2, done  # every hour, the empty ones in the middle too
        source = t0 + (head - 1) * _HOUR  # a real hour, rolled by the engine's own code
        copied = replicate_hour(db, source, [t0 + h * _HOUR for h in range(head, hours - tail)])
        # The eleven months before, rolled up as well (a ledger a year old): the rollup's index, not its size, must
        # bound what a report over one month reads.
        replicate_hour(db, source, [t0 - h * _HOUR for h in range(1, 11 * hours + 1)])
        vacuum_analyze(db)
        out["build_100m_s"] = time.perf_counter() - t
        with db.connect() as conn:
            held = conn.execute(sa.select(sa.func.sum(UF.c.requests)).where(UF.c.hour_start_ns >= t0)).scalar_one()
            raw_rows = conn.execute(sa.select(sa.func.count()).select_from(RQ)).scalar_one()
        print(f"100M case: {held:,} requests in the rollup over {hours} hours ({head + tail} real hours of "
              f"{per_hour:,} requests = {raw_rows:,} raw rows, {copied} hours copied from the engine's rollup of a "
              f"real hour); built in {out['build_100m_s']:.1f} s")  # fmt: skip
        assert raw_rows == real
        start, end = t0 + 17 * 60 * _S, t0 + span - 23 * 60 * _S
        ms_list = []
        for _ in range(repeat):
            ms, rolled = usage_over(db, start, end)
            ms_list.append(ms)
        out["usage_100m_s"] = statistics.median(ms_list) / 1000
        print(f"100M case: usage over {rolled.total.requests:,} requests: {out['usage_100m_s'] * 1000:.1f} ms (runs: "
              + " ".join(f"{x:.0f}" for x in ms_list) + ")")  # fmt: skip
        wire = grpc_usage(db, start, end, repeat, rolled)
        out["usage_100m_grpc_s"] = statistics.median(wire) / 1000
        print(f"100M case: the same over gRPC (GetUsage to the reports server): {statistics.median(wire):.1f} ms "
              "(runs: " + " ".join(f"{x:.0f}" for x in wire) + ")")  # fmt: skip
        # The same figures another way: the real hours from raw rows only, plus the copied hours' rollup rows.
        _, head_raw = usage_over(db, start, t0 + head * _HOUR, rollups=False)
        _, tail_raw = usage_over(db, t0 + (hours - tail) * _HOUR, end, rollups=False)
        _, middle = usage_over(db, t0 + head * _HOUR, t0 + (hours - tail) * _HOUR)
        expect: dict[str, list[int]] = {}
        for part in (head_raw, tail_raw, middle):
            for r in part.rows:
                acc = expect.setdefault(r.key, [0] * 6)
                for k, v in enumerate((r.requests, r.prompt_tokens, r.generated_tokens, r.prefill_mj, r.decode_mj,
                                       r.idle_mj)):  # fmt: skip
                    acc[k] += v
        got = {r.key: [r.requests, r.prompt_tokens, r.generated_tokens, r.prefill_mj, r.decode_mj, r.idle_mj]
               for r in rolled.rows}  # fmt: skip
        assert got == expect, (got, expect)
        assert rolled.total.provisional_requests == 0
        if explain:
            lines = plans(db, lambda c: get_usage(c, ReportOptions(), start_ns=start, end_ns=end))
            print("100M case: plans of the usage report:\n  " + "\n  ".join(lines))
            check_plans(lines, ("requests", "request_energy", "request_seals", "usage_final_hourly"))
        ids = sample_ids(db, 200)
        if explain:
            lines = lookup_plans(db, ids[0])
            print(
                "100M case: plans of a request by id, and of a ListRequests page and the next:\n  " + "\n  ".join(lines)
            )
            check_plans(lines, ("requests", "request_energy", "request_seals"))
        one, first, deep = lookups(db, ids, 200)
        out["request_lookup_ms"], out["list_first_ms"], out["list_deep_ms"] = one, first, deep
        print(f"100M case: request by id {one:.2f} ms; ListRequests page 1 {first:.1f} ms, page 22 {deep:.1f} ms")
        db.dispose()
    return out


def replicate_hour(db: sa.Engine, source: int, hours: list[int]) -> int:
    """Give each of ``hours`` the rollup that the engine wrote for the hour ``source`` (its rows in
    ``usage_final_hourly`` and ``usage_rollup_hours``), server-side; the version moves as for a roll."""
    cols = [c.name for c in UF.columns if c.name != "hour_start_ns"]
    hcols = [c.name for c in UH.columns if c.name != "hour_start_ns"]
    with db.begin() as conn:
        if conn.dialect.name == "postgresql":
            hs = "SELECT unnest(CAST(:hours AS bigint[])) AS h"
        else:
            raise SystemExit("the 100M case runs on PostgreSQL")
        # The engine rolled these hours as empty (no request in them): they get the source hour's rows instead.
        assert conn.execute(sa.select(sa.func.count()).where(UF.c.hour_start_ns.in_(hours))).scalar_one() == 0
        conn.execute(sa.delete(UH).where(UH.c.hour_start_ns.in_(hours), UH.c.requests == 0))
        conn.execute(
            sa.text(
                f"INSERT INTO usage_final_hourly (hour_start_ns, {', '.join(cols)}) "
                f"SELECT g.h, {', '.join('f.' + c for c in cols)} FROM usage_final_hourly f, ({hs}) g "
                "WHERE f.hour_start_ns = :source"
            ),
            {"hours": hours, "source": source},
        )
        conn.execute(
            sa.text(
                f"INSERT INTO usage_rollup_hours (hour_start_ns, {', '.join(hcols)}) "
                f"SELECT g.h, {', '.join('u.' + c for c in hcols)} FROM usage_rollup_hours u, ({hs}) g "
                "WHERE u.hour_start_ns = :source"
            ),
            {"hours": hours, "source": source},
        )
        conn.execute(sa.update(US).where(US.c.id == 1).values(version=US.c.version + 1))
    return len(hours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 1M case only")
    ap.add_argument("--only-100m", action="store_true", help="the 100M case only")
    ap.add_argument("--requests", type=int, default=1_000_000, help="of the small case")
    ap.add_argument("--big", type=int, default=100_000_000, help="requests of the big case")
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="an admin URL; a fresh database is made and dropped")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--raw-repeat", type=int, default=1, help="reports from raw rows only, for comparison (1M case)")
    ap.add_argument("--explain", action="store_true", help="print the plans of the report's queries")
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    out: dict[str, float] = {}
    if not args.only_100m:
        out |= case_1m(args.postgres, args.requests, args.days, args.repeat, args.raw_repeat, args.explain)
    if not args.quick:
        out |= case_100m(args.postgres, args.big, args.days, args.repeat, args.explain)
    keys = ["usage_1m_s", "usage_100m_s", "request_lookup_ms", "usage_100m_grpc_s", "list_deep_ms",
            "request_lookup_1m_ms", "list_deep_1m_ms", "usage_1m_raw_s", "build_1m_s", "build_100m_s"]  # fmt: skip
    fmt = {k: (f"{out[k]:.3f}" if k.endswith("_s") else f"{out[k]:.2f}") for k in keys if k in out}
    print("RESULT " + " ".join(f"{k}={v}" for k, v in fmt.items()))


if __name__ == "__main__":
    main()
