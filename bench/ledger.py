"""How many request timelines per second the meter records, attributes and stores, on SQLite and on PostgreSQL.

    .venv/bin/python -m bench.ledger [--quick] [--requests 300000] [--backends 64] [--epoch-ms 1000] [--postgres URL]

One workload, run on a fresh SQLite file and then on a fresh PostgreSQL database, in one process, as a gateway and
an in-process meter would run it: a feeder thread hands every request to the real ``Ledger`` the way the gateway
does (``request_started`` at release, ``request_finished`` when it ends, 0.2-2 s later, so open rows exist and hold
attribution back), a real ``Sampler`` reads a fleet of simulated energy counters (half the backends on two GPUs) at
10 Hz into the same ledger, and a real ``MeterService`` engine loop attributes 1 s epochs (``--epoch-ms``). The
feeder is not paced: it releases requests as fast as it can, so every stage runs flat out and the slowest one sets
the pace.

The figure is N / (time from the first request handed in to the moment every request's energy is attributed and
stored). It includes the pipeline's fixed delay at the end (the last requests run up to 2 s, then one epoch, the
settle time and an engine interval: about 4 s), so it under-states the sustained rate, the more so for small N. Then
the books are checked: every request counted once in usage_hourly, and per epoch counter = attributed + idle = its
request rows + idle. The machine is shared: the figure moves with the load other sessions put on its 2 CPUs (the
load average at start is printed).

Profile it with py-spy (every thread): ``.venv/bin/py-spy record --idle --threads --format raw -o ledger.txt --
.venv/bin/python -m bench.ledger --only postgres --requests 80000`` (``--gil`` for who holds the GIL). What it
showed, and what was done:

1. the engine thread spent ~75 % of its time in ``Connection.wait``: a dozen round trips and a commit per
   (backend, epoch). Now every epoch due in a pass, of every backend, is read with bulk queries and written in ONE
   transaction (COPY on PostgreSQL): 2,600 -> ~5,000+ requests/s on PostgreSQL;
2. then ``open_requests`` fetched every in-flight row each pass (~20,000 here): now aggregated in SQL;
3. then (issue 12, item 5): with open rows holding every epoch back until its requests end, most of the work
   lands in a few long catch-up passes (10-16 s each at 300,000 requests), so the figure follows the engine's
   throughput. A catch-up of 30,000 requests timed alone (CPU of this process and of its PostgreSQL backends):
   6,000 -> 9,600 requests per CPU-second, 5.4 -> 3.1 s of wall time. What went: sealing wrote each backend in a
   transaction of its own and read the sums back 500 ids at a time (the planner merged them against the whole of
   ``request_energy``): now one transaction for every backend of the pass and one ``INSERT ... SELECT`` with a
   lookup per id; the cyclic garbage collector rescanned the pass's own (acyclic) rows, a fifth of the engine's
   CPU: paused during a pass; a request over several epochs was built into a Timeline once per epoch; the
   calibrator chose its intervals and looked up cumulative classes once per lag (21 lags);
4. now: ``attribute`` (meter/attribution.py) is ~30 % of the engine's CPU and the calibration ~25 % (its own
   ``request_phases`` while a backend warms up, which in a run this short is always). The engine's Python costs
   ~75 us per request, which alone caps its thread near 13,000 requests/s, and it shares the GIL with the feeder,
   the ledger and the sampler (the ledger's buffer backs up to ~100,000 records during a pass): 20,000 requests/s
   needs ``attribute`` and the calibration several times cheaper, or the engine in a process of its own.
   PostgreSQL's CPU goes mostly to the ledger's two upserts per request (open row, then finished row: ~15 us each
   on a table with six indexes, the same with COPY batches of 2,000 or 20,000 rows), which compete with everything
   else on this 2-CPU machine.

The last line is ``RESULT sqlite_requests_per_s=... postgres_requests_per_s=...``.
"""

from __future__ import annotations

import argparse
import heapq
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from bench._procs import postgres_database
from meter.engine import EngineSettings, MeteredBackend
from meter.ledger import Ledger
from meter.samples import Sample
from meter.service import MeterService
from meter.store import make_engine, upgrade
from meter.timeline import RequestStart, Timeline

POSTGRES_ADMIN_URL = os.environ.get("JOULEGATE_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
_S = 1_000_000_000
_MS = 1_000_000


class FleetCounters:
    """An ``EnergySource`` over simulated GPUs: each counter integrates a constant power (200-295 W) exactly."""

    def __init__(self, devices: list[str]) -> None:
        self._devices = tuple(devices)
        self._t0 = time.time_ns()
        self._power_w = [200 + 5 * (i % 20) for i in range(len(devices))]

    @property
    def devices(self) -> tuple[str, ...]:
        return self._devices

    def read(self) -> list[Sample]:
        now = time.time_ns()
        dt = now - self._t0
        return [Sample(d, now, 10**9 + p * dt // 1_000_000) for d, p in zip(self._devices, self._power_w, strict=True)]

    def close(self) -> None:
        pass


@dataclass
class RunResult:
    database: str
    requests: int
    seconds: float
    feed_seconds: float
    epochs: int
    request_rows: int
    engine_passes: int
    ledger_written: int

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


def fleet(n_backends: int) -> list[MeteredBackend]:
    out = []
    for i in range(n_backends):
        devices = (f"bench:gpu{i}a", f"bench:gpu{i}b") if i % 2 else (f"bench:gpu{i}a",)
        out.append(MeteredBackend(f"tgi-{i}:8080", devices))
    return out


def feed(ledger: Ledger, backends: list[MeteredBackend], n: int, seed: int = 1) -> tuple[dict[str, int], float]:
    """Hand in ``n`` requests as fast as possible (each finishes 0.2-2 s after its release); returns the last
    done_ns per backend and the seconds it took."""
    rnd = random.Random(seed)
    names = [b.name for b in backends]
    tenants = [f"tenant-{i}" for i in range(12)]
    pending: list[tuple[int, int, Timeline]] = []  # (done_ns, seq, timeline)
    last_done: dict[str, int] = {}
    t0 = time.monotonic()
    for i in range(n):
        now = time.time_ns()
        while pending and pending[0][0] <= now:
            ledger.request_finished(heapq.heappop(pending)[2])
        rid = uuid.uuid4().hex
        backend = names[i % len(names)]
        tenant = tenants[i % len(tenants)]
        received = now - rnd.randint(0, 50) * _MS
        ledger.request_started(RequestStart(rid, tenant, "llama-3-8b", backend, received, now))
        first = now + rnd.randint(10, 120) * _MS
        done = first + rnd.randint(150, 1900) * _MS
        tl = Timeline(rid, tenant, "llama-3-8b", backend, received, now, first, done, rnd.randint(16, 2000),
                      rnd.randint(1, 256), traffic_class="batch")  # fmt: skip
        heapq.heappush(pending, (done, i, tl))
        last_done[backend] = max(last_done.get(backend, 0), done)
        if i % 256 == 0:
            time.sleep(0)  # let the writer, sampler and engine threads in
    while pending:
        wait_ns = pending[0][0] - time.time_ns()
        if wait_ns > 0:
            time.sleep(wait_ns / 1e9)
        ledger.request_finished(heapq.heappop(pending)[2])
    return last_done, time.monotonic() - t0


def run_one(database: str, url: str, n: int, n_backends: int, journal: Path, epoch_ms: int = 1000) -> RunResult:
    upgrade(url)
    db = make_engine(url)
    backends = fleet(n_backends)
    source = FleetCounters([d for b in backends for d in b.devices])
    ledger = Ledger(db, journal)
    ledger.start()
    settings = EngineSettings(epoch_ns=epoch_ms * _MS, settle_ns=500 * _MS, lag_ns=100 * _MS)
    service = MeterService(db, ledger, source, lambda: backends, settings, interval_ms=100, engine_interval_s=1.0)
    service.start()
    time.sleep(1.0)  # the sampler's first readings
    try:
        t0 = time.monotonic()
        last_done, feed_s = feed(ledger, backends, n)
        while True:
            until = service.engine.stats.attributed_until_ns
            if all((until.get(b) or 0) > d for b, d in last_done.items()):
                break
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"{database}: attribution did not finish in 600 s: {until}")
            time.sleep(0.02)
        seconds = time.monotonic() - t0
    finally:
        service.stop()
        ledger.close()
    result = RunResult(
        database=database,
        requests=n,
        seconds=seconds,
        feed_seconds=feed_s,
        epochs=service.engine.stats.epochs_attributed,
        request_rows=service.engine.stats.request_rows_written,
        engine_passes=service.engine.stats.passes,
        ledger_written=ledger.stats.written_requests,
    )
    verify(db, n)
    db.dispose()
    return result


def verify(db: sa.Engine, n: int) -> None:
    """Every request counted once; per epoch counter = attributed + idle = its request rows + idle."""
    with db.connect() as conn:
        counted = conn.execute(sa.text("SELECT SUM(requests) FROM usage_hourly")).scalar()
        broken = conn.execute(
            sa.text(
                "SELECT COUNT(*) FROM backend_epochs be LEFT JOIN (SELECT backend, epoch_start_ns, "
                "SUM(prefill_mj + decode_mj) AS e FROM request_energy GROUP BY backend, epoch_start_ns) re "
                "ON re.backend = be.backend AND re.epoch_start_ns = be.epoch_start_ns "
                "WHERE be.counter_mj <> be.attributed_mj + be.idle_mj OR COALESCE(re.e, 0) <> be.attributed_mj"
            )
        ).scalar()
        attributed = conn.execute(sa.text("SELECT SUM(attributed_mj), SUM(counter_mj) FROM backend_epochs")).one()
    if counted != n or broken:
        raise AssertionError(f"books do not balance: {counted} of {n} requests counted, {broken} epochs off")
    joules = f"{int(attributed[0]) / 1e3:.0f} J attributed of {int(attributed[1]) / 1e3:.0f} J"
    print(f"  verified: {n} requests counted once; {joules}")


def report(r: RunResult) -> None:
    print(
        f"{r.database:>10}: {r.requests} requests in {r.seconds:.1f} s = {r.requests_per_s:,.0f} requests/s "
        f"(handed in within {r.feed_seconds:.1f} s; {r.epochs} backend epochs, {r.request_rows} request energy rows, "
        f"{r.engine_passes} engine passes)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--requests", type=int, help="requests per database (default 300000; --quick 30000)")
    parser.add_argument("--backends", type=int, default=64, help="backends (odd ones on two GPUs)")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="admin URL of the PostgreSQL server")
    parser.add_argument("--only", choices=["sqlite", "postgres"], help="run one database only")
    parser.add_argument("--epoch-ms", type=int, default=1000, help="attribution epoch (production default: 10000)")
    args = parser.parse_args(argv)
    n = args.requests or (30_000 if args.quick else 300_000)
    print(
        f"bench.ledger: {n} requests over {args.backends} backends per database, sampler at 10 Hz, "
        f"{args.epoch_ms} ms epochs; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    results: dict[str, RunResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sqlite"):
            sqlite_url = f"sqlite:///{tmp}/bench.db"
            r = run_one("sqlite", sqlite_url, n, args.backends, Path(tmp) / "sqlite.jsonl", args.epoch_ms)
            report(r)
            results["sqlite"] = r
        if args.only in (None, "postgres"):
            with postgres_database(args.postgres) as url:
                r = run_one("postgres", url, n, args.backends, Path(tmp) / "postgres.jsonl", args.epoch_ms)
            report(r)
            results["postgres"] = r
    if len(results) == 2:
        ratio = results["postgres"].requests_per_s / results["sqlite"].requests_per_s
        print(f"postgres / sqlite: {ratio:.2f}x")
    print("RESULT " + " ".join(f"{k}_requests_per_s={v.requests_per_s:.0f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
