"""How long a usage report over a fleet's month takes: from raw rows, and from the rollup of final hours.

    .venv/bin/python -m bench.reports [--full] [--requests N] [--days 30] [--db postgres|sqlite] [--postgres URL]

Builds N requests (200k by default; ``--full``: 1M) received over ``--days`` days across 8 backends, 4 tenants and 3
models, with what the engine stores for them (one ``request_energy`` row each, its epoch, and a seal: every figure
final), written with the bulk paths (the ledger's ``BulkWriter``, COPY on PostgreSQL). Then the engine's rollup job
rolls the hours up (``meter.engine.rollup``, timed), and the usage report over the whole range (grouped by tenant)
is run from raw rows (``rollups=False``) and from the rollup, interleaved, median of 5 each; the two must agree to
the mJ. The range starts and ends mid-hour, so the rollup run also reads the raw rows of its two edge hours.

The last line is ``RESULT usage_report_ms_raw=... usage_report_ms_rollup=... ratio=...`` (ratio = raw / rollup).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa

from meter.engine import sql
from meter.engine.rollup import Rollup
from meter.reports import ReportOptions, get_usage
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
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"jg_bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def build(db: sa.Engine, n: int, t0_ns: int, span_ns: int, seed: int = 7) -> None:
    """N finished, sealed requests received uniformly over [t0, t0 + span), with their energy rows and epochs."""
    rnd = random.Random(seed)
    writer = BulkWriter.for_dialect(db.dialect)
    backends = [f"b{i}" for i in range(8)]
    epochs: dict[tuple[str, int], list[int]] = {}
    for lo in range(0, n, _BATCH):
        timelines, energy, seals = [], [], []
        for i in range(lo, min(n, lo + _BATCH)):
            rid = f"r{i:09d}"
            received = t0_ns + rnd.randrange(span_ns)
            released = received + rnd.randrange(50_000_000)
            first = released + rnd.randrange(20_000_000, 200_000_000)
            done = first + rnd.randrange(100_000_000, 5 * _S)
            backend = backends[i % len(backends)]
            prompt, generated = rnd.randrange(20, 2000), rnd.randrange(1, 500)
            pre, dec = rnd.randrange(1000, 50_000), rnd.randrange(1000, 200_000)
            idle_t, idle_k = rnd.randrange(0, 5000), rnd.randrange(0, 5000)
            start = done - done % _EPOCH_NS
            timelines.append((rid, f"tenant-{i % 4}", f"model-{i % 3}", backend, "default", "http", "OK", None,
                              received, released, first, done, prompt, False, generated))  # fmt: skip
            energy.append(sql.RequestEnergyRow(rid, start, backend, pre, dec, done - released, idle_t, idle_k))
            seals.append(sql.SealRow(rid, backend, done, done + 60 * _S, pre, dec, idle_t, idle_k))
            acc = epochs.setdefault((backend, start), [0, 0, 0, 0])
            acc[0] += pre
            acc[1] += dec
            acc[2] += idle_t
            acc[3] += done - released
        with db.begin() as conn:
            writer.write(conn, [], timelines, [], t0_ns + span_ns)
            sql.insert_request_energy(conn, energy)
            sql.insert_seals(conn, seals)
    rows = [
        sql.BackendEpochRow(b, s, s + _EPOCH_NS, s, s + _EPOCH_NS, pre + dec + idle, pre + dec, pre, dec, idle, 100, 0,
                            active, t0_ns + span_ns, 0)
        for (b, s), (pre, dec, idle, active) in sorted(epochs.items())
    ]  # fmt: skip
    with db.begin() as conn:
        for lo in range(0, len(rows), _BATCH):
            sql.insert_backend_epochs(conn, rows[lo : lo + _BATCH])
    if db.dialect.name == "postgresql":
        with db.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t) * 1000, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="1M requests (default: 200k)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--db", choices=("postgres", "sqlite"), default="postgres")
    ap.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="an admin URL; a fresh database is made and dropped")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    n = args.requests or (1_000_000 if args.full else 200_000)
    t0 = 472_222 * _HOUR  # an hour boundary
    span = args.days * 24 * _HOUR
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    with fresh_database(args.db, args.postgres) as url:
        upgrade(url)
        db = make_engine(url)
        t = time.perf_counter()
        build(db, n, t0, span)
        print(f"{args.db}: built {n:,} requests over {args.days} days in {time.perf_counter() - t:.1f} s")
        now = t0 + span + 2 * _HOUR
        rollup = Rollup(max_hours_per_pass=args.days * 24 + 2)
        roll_ms, done = timed(lambda: rollup.run(db, now, now))
        print(f"rollup: {done.rolled_hours} hours rolled in {roll_ms:.0f} ms")
        start, end = t0 + 17 * 60 * _S, t0 + span - 23 * 60 * _S  # mid-hour edges: raw rows there
        options = ReportOptions()
        raw_ms, rolled_ms = [], []
        for _ in range(args.repeat):
            with db.connect() as conn:
                ms, raw = timed(lambda c=conn: get_usage(c, options, start_ns=start, end_ns=end, rollups=False))
                raw_ms.append(ms)
            with db.connect() as conn:
                ms, rolled = timed(lambda c=conn: get_usage(c, options, start_ns=start, end_ns=end))
                rolled_ms.append(ms)
            assert raw.total.requests == rolled.total.requests
            for a, b in zip(raw.rows, rolled.rows, strict=True):
                assert (a.key, a.requests, a.prefill_mj, a.decode_mj, a.idle_mj) == (
                    b.key, b.requests, b.prefill_mj, b.decode_mj, b.idle_mj
                ), (a, b)  # fmt: skip
        db.dispose()
    r, u = statistics.median(raw_ms), statistics.median(rolled_ms)
    print(f"usage over {raw.total.requests:,} requests: raw {r:.1f} ms, rollup {u:.1f} ms")
    print(f"RESULT usage_report_ms_raw={r:.1f} usage_report_ms_rollup={u:.1f} ratio={r / u:.1f}")


if __name__ == "__main__":
    main()
