"""Measure the ledger: hot-path cost per call and write rates on SQLite and PostgreSQL.

    .venv/bin/python -m tests.ledger_bench [--requests 50000] [--postgres URL_OF_AN_ADMIN_DB]

Not collected by pytest (the name does not start with test_). Prints one line per figure. For each database it
hands in the starts of N requests, flushes, then their timelines (updating open rows, as in production), flushes,
and finally replays a journal of N timelines; it reports rows/s and the writer process's CPU per row (the part
that competes with the event loop for the GIL).
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from meter.journal import encode
from meter.ledger import Ledger, timeline_row
from meter.store import make_engine, upgrade
from meter.store.bulk import TIMELINE_COLUMNS
from meter.timeline import RequestStart, Timeline
from tests.conftest import POSTGRES_ADMIN_URL

T0 = time.time_ns()


def _items(n: int) -> tuple[list[RequestStart], list[Timeline]]:
    starts = [RequestStart(f"r{i}", f"t{i % 7}", "m", f"b{i % 3}", T0 + i * 1000, T0 + i * 1000 + 10) for i in range(n)]
    timelines = [
        Timeline(f"r{i}", f"t{i % 7}", "m", f"b{i % 3}", T0 + i * 1000, T0 + i * 1000 + 10, T0 + i * 1000 + 500,
                 T0 + i * 1000 + 9000, 100 + i % 50, 20 + i % 200, correlation_id=f"c{i}")
        for i in range(n)
    ]  # fmt: skip
    return starts, timelines


def hot_path(n: int) -> None:
    _, timelines = _items(n)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/db.sqlite"
        upgrade(url)
        # the writer sleeps through it: the hand-off (row, door, journal write, buffer) alone
        ledger = Ledger(url, Path(tmp) / "j.jsonl", flush_interval_s=3600, batch_size=10**9)
        ledger.start()
        gc.disable()
        clock = time.perf_counter_ns
        cost = []
        for t in timelines:
            t0 = clock()
            ledger.request_finished(t)
            cost.append(clock() - t0)
        gc.enable()
        cost.sort()
        t0 = clock()
        for t in timelines:
            ledger.request_finished(t)
        loop_ns = (clock() - t0) / n
        ledger.close(60)
        print(
            f"hot path, writer idle: request_finished p50 {cost[n // 2] / 1e3:.2f} us, "
            f"p99 {cost[int(n * 0.99)] / 1e3:.2f} us, mean in a loop {loop_ns / 1e3:.2f} us"
        )


def rates(label: str, url: str, n: int) -> None:
    upgrade(url)
    starts, timelines = _items(n)
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(url, Path(tmp) / "j.jsonl", flush_interval_s=0.05)
        ledger.start()
        results = {}
        for name, items, hand in (
            ("starts (insert open rows)", starts, ledger.request_started),
            ("timelines (update open rows)", timelines, ledger.request_finished),
        ):
            c0, t0 = time.process_time(), time.perf_counter()
            for it in items:
                hand(it)  # type: ignore[arg-type]
            assert ledger.flush(300)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            results[name] = (n / wall, cpu / n * 1e6)
        ledger.close()
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM requests"))
        journal_path = Path(tmp) / "replay.jsonl"  # as a dead process would have left it
        journal_path.write_bytes(
            b"".join(encode({"k": "t", **dict(zip(TIMELINE_COLUMNS, timeline_row(t), strict=True))}) for t in timelines)
        )
        ledger = Ledger(engine, journal_path, flush_interval_s=0.05)
        c0, t0 = time.process_time(), time.perf_counter()
        ledger.start()
        while ledger.stats.journal_pending:
            time.sleep(0.005)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        results["journal replay (insert)"] = (n / wall, cpu / n * 1e6)
        ledger.close()
        engine.dispose()
    for name, (rate, cpu_us) in results.items():
        print(f"{label}: {name}: {rate:,.0f} rows/s, writer CPU {cpu_us:.1f} us/row")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="admin URL; a scratch database is made")
    args = parser.parse_args()
    hot_path(args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        rates("sqlite", f"sqlite:///{tmp}/bench.sqlite", args.requests)
    admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    name = f"jg_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        rates("postgresql", args.postgres.rsplit("/", 1)[0] + f"/{name}", args.requests)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(f"(single runs; 1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
