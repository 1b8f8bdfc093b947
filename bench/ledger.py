"""How many request timelines per second the meter records, attributes and stores, on SQLite and on PostgreSQL.

    .venv/bin/python -m bench.ledger [--quick] [--requests 1000000] [--backends 64] [--epoch-ms 10000]
                                     [--meter process|in-process] [--only sqlite|postgres] [--postgres URL] [--seal]

One workload, run on a fresh SQLite file and then on a fresh PostgreSQL database, each in the shape it is deployed
in: a feeder thread hands every request to the real ``Ledger`` the way the gateway does (``request_started`` at
release, ``request_finished`` when it ends, 0.2-2 s later, so open rows exist and hold attribution back), a real
``Sampler`` reads a fleet of simulated energy counters (half the backends on two GPUs) at 10 Hz, and a real
``MeterService`` engine loop attributes epochs of ``--epoch-ms`` (the engine's default, 10 s). On SQLite the sampler
and engine run in the feeder's process and share its ledger, as ``joulegate serve`` runs its in-process meter; on
PostgreSQL they run in a process of their own with a ledger of their own for the samples, as ``joulegate meter``
runs beside a fleet's proxies and as ``serve --workers N`` runs its meter child (``--meter in-process`` puts them in
the feeder's process there too). The feeder is not paced: it releases requests as fast as it can, so every stage
runs flat out and the slowest one sets the pace.

The figure is N / (time from the first request handed in to the moment every request's energy is attributed and
stored). It includes the pipeline's fixed delay at the end (the last requests run up to 2 s, then the rest of their
epoch, the settle time and an engine interval: up to ~14 s with 10 s epochs), so it under-states the sustained rate,
the more so for small N. Each run also prints the CPU per request of the feeder's process (with the meter when it
is in-process), of the meter's process and of the PostgreSQL server (its processes in /proc): on a box with C cores,
C x 10^6 / (their sum) requests/s is the most the pipeline can sustain. Then the books are checked: every request
counted once in usage_hourly, and per epoch counter = attributed + idle = its request rows + idle. The machine is
shared: the figure moves with the load other sessions put on its 2 CPUs (the load average at start is printed).

Profile it with py-spy: ``.venv/bin/py-spy record --subprocesses --threads --format raw -o ledger.txt --
.venv/bin/python -m bench.ledger --only postgres`` (``--gil`` for who holds the GIL). What it showed, and what was
done:

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
4. then the engine shared the feeder's GIL (the ledger's buffer backed up to ~100,000 records during a pass) and
   ran 1 s epochs, twice the request rows of the default 10 s: the PostgreSQL run now has the shape of its
   deployments (meter apart) and the default epochs. In-process with 1 s epochs, 300,000 requests: ~9,600/s on a
   quiet box; meter apart: ~11,400/s; meter apart with 10 s epochs and 1,000,000 requests: ~14,200/s.
5. now (1,000,000 requests, 10 s epochs): CPU per request ~30 us in the feeder's process (hand-in, journal, ledger
   batches), ~44 us in the meter (``attribute`` and the calibration's own ``request_phases`` while a backend warms
   up, which with this fleet's flat-power counters is always; the fetch and the writes) and ~51 us in PostgreSQL,
   34 of them the ledger's two writes per request (open row, then finished row, each through the table's six
   indexes; without open rows 17 us, and 22 instead of 29 us in the feeder): ~125 us in all, at most ~16,000
   requests/s on 2 CPUs. Holding the open row back until a request has run a while would save only the requests
   that end within the hold (~40 % of these with a 1 s hold, ~10 us a request) and narrow the margin before the
   engine's ``settle_ns``; 20,000/s needs both the engine's Python and PostgreSQL's index upkeep smaller.

6. what the figure leaves out: this fleet's counters draw constant power, so no fit ever settles and the engine,
   holding seals until one does (``uncalibrated_seal_hold_ns``, 300 s), seals nothing within a run; a deployment's
   engine seals every request, one epoch or two after its fit settles. ``--seal`` seals at the margin (hold 0) and
   times the run until every request is sealed: on PostgreSQL, 100,000 requests, alternating, twice each way, it
   cost ~14 us more of PostgreSQL's CPU per request and ~6 us more of the meter's (185-188 against 164-175 us in
   all), and the figure fell ~20 % (5,100-5,500 against 6,400-7,000 requests/s, the seal margin's wait included).
   The default stays without it, so that figures compare across runs of the issue.

The last line is ``RESULT sqlite_requests_per_s=... postgres_requests_per_s=... postgres_cpu_us=...``
(``postgres_cpu_us``: the PostgreSQL run's CPU per request, all processes).
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import os
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol, cast

import sqlalchemy as sa

from bench._cpu import cpu_s
from bench._procs import postgres_database
from meter.engine import EngineSettings, EngineStats, MeteredBackend
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
    sealed: int
    ledger_written: int
    cpu_us: dict[str, float]  # CPU per request: this process, the meter's (when apart), the PostgreSQL server

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds


def _postgres_cpu_s() -> float | None:
    """CPU seconds of the local PostgreSQL server: its live processes, plus the exited ones its postmaster reaped
    (None where /proc shows none: a server elsewhere)."""
    total, found = 0.0, False
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if (d / "comm").read_text().strip() not in ("postgres", "postmaster"):
                continue
            ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
            is_postmaster = Path(f"/proc/{ppid}/comm").read_text().strip() not in ("postgres", "postmaster")
        except OSError:
            continue
        found = True
        total += cpu_s([int(d.name)], reaped=is_postmaster)
    return total if found else None


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


def run_one(database: str, url: str, n: int, n_backends: int, journal: Path, epoch_ms: int = 10_000,
            meter_process: bool = False, seal: bool = False) -> RunResult:  # fmt: skip
    """One run. ``meter_process``: the sampler and the engine run in a process of their own with a ledger of their
    own for the samples (as ``joulegate meter`` runs beside the proxies of a fleet, and the meter child of ``serve
    --workers N``); else in the feeder's process, sharing its ledger (``joulegate serve``'s in-process meter).
    ``seal``: the engine seals at the margin, as it does once a backend's fit has settled (this fleet's flat counters
    never fit, so by default nothing is sealed within the run), and the run lasts until every request is sealed."""
    upgrade(url)
    db = make_engine(url)
    backends = fleet(n_backends)
    ledger = Ledger(db, journal)
    ledger.start()
    meter: _Meter = (
        _ChildMeter(url, n_backends, journal.with_suffix(".meter.jsonl"), epoch_ms, seal)
        if meter_process
        else _InProcessMeter(db, ledger, backends, epoch_ms, seal)
    )
    time.sleep(1.0)  # the sampler's first readings
    server_cpu_s = _postgres_cpu_s if database == "postgres" else lambda: None  # SQLite runs in this process
    cpu0 = {"feeder": cpu_s([os.getpid()]), "meter": meter.cpu_s(), "postgres": server_cpu_s()}
    try:
        t0 = time.monotonic()
        last_done, feed_s = feed(ledger, backends, n)
        while True:
            until, sealed = meter.progress()
            if all((until.get(b) or 0) > d for b, d in last_done.items()) and (not seal or sealed >= n):
                break
            if time.monotonic() - t0 > 600:
                raise RuntimeError(f"{database}: attribution did not finish in 600 s: {until}")
            time.sleep(0.02)
        seconds = time.monotonic() - t0
        cpu1 = {"feeder": cpu_s([os.getpid()]), "meter": meter.cpu_s(), "postgres": server_cpu_s()}
    finally:
        stats = meter.stop()
        ledger.close()
    result = RunResult(
        database=database,
        requests=n,
        seconds=seconds,
        feed_seconds=feed_s,
        epochs=stats.epochs_attributed,
        request_rows=stats.request_rows_written,
        engine_passes=stats.passes,
        sealed=stats.requests_sealed,
        ledger_written=ledger.stats.written_requests,
        cpu_us={k: (b - a) * 1e6 / n for k, a in cpu0.items() if a is not None and (b := cpu1[k]) is not None},
    )
    verify(db, n)
    db.dispose()
    return result


class _Meter(Protocol):
    def progress(self) -> tuple[dict[str, int | None], int]: ...  # attributed until, per backend; requests sealed
    def cpu_s(self) -> float | None: ...
    def stop(self) -> EngineStats: ...


def _engine_settings(epoch_ms: int, seal: bool) -> EngineSettings:
    settings = EngineSettings(epoch_ns=epoch_ms * _MS, settle_ns=500 * _MS, lag_ns=100 * _MS)
    return replace(settings, uncalibrated_seal_hold_ns=0) if seal else settings


def _meter_service(
    db: sa.Engine, ledger: Ledger, backends: list[MeteredBackend], epoch_ms: int, seal: bool
) -> MeterService:
    source = FleetCounters([d for b in backends for d in b.devices])
    service = MeterService(db, ledger, source, lambda: backends, _engine_settings(epoch_ms, seal), interval_ms=100,
                           engine_interval_s=1.0)  # fmt: skip
    service.start()
    return service


class _InProcessMeter:
    def __init__(
        self, db: sa.Engine, ledger: Ledger, backends: list[MeteredBackend], epoch_ms: int, seal: bool
    ) -> None:
        self._service = _meter_service(db, ledger, backends, epoch_ms, seal)

    def progress(self) -> tuple[dict[str, int | None], int]:
        stats = self._service.engine.stats
        return dict(stats.attributed_until_ns), stats.requests_sealed

    def cpu_s(self) -> float | None:
        return None  # counted with the feeder's process

    def stop(self) -> EngineStats:
        self._service.stop()
        return self._service.engine.stats


class _ChildMeter:
    """The meter in a spawned process, asked over a pipe how far it has attributed."""

    def __init__(self, url: str, n_backends: int, journal: Path, epoch_ms: int, seal: bool) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        args = (url, n_backends, journal, epoch_ms, seal, child)
        self._proc = ctx.Process(target=_child_meter, args=args, daemon=True)
        self._proc.start()
        if self._conn.recv() != "ready":
            raise RuntimeError("the meter process did not start")

    def progress(self) -> tuple[dict[str, int | None], int]:
        self._conn.send("progress")
        return cast("tuple[dict[str, int | None], int]", self._conn.recv())

    def cpu_s(self) -> float | None:
        return cpu_s([cast(int, self._proc.pid)])

    def stop(self) -> EngineStats:
        self._conn.send("stop")
        stats = cast(EngineStats, self._conn.recv())
        self._proc.join(30)
        return stats


def _child_meter(url: str, n_backends: int, journal: Path, epoch_ms: int, seal: bool, conn: Connection) -> None:
    db = make_engine(url)
    ledger = Ledger(db, journal)  # the samples' ledger (the requests' is the feeder's)
    ledger.start()
    service = _meter_service(db, ledger, fleet(n_backends), epoch_ms, seal)
    conn.send("ready")
    while conn.recv() == "progress":
        stats = service.engine.stats
        conn.send((dict(stats.attributed_until_ns), stats.requests_sealed))
    service.stop()
    ledger.close()
    conn.send(service.engine.stats)
    db.dispose()


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
        f"{r.engine_passes} engine passes, {r.sealed} requests sealed)"
    )
    print("            CPU per request: " + ", ".join(f"{k} {v:.0f} us" for k, v in r.cpu_us.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--requests", type=int, help="requests per database (default 1000000; --quick 30000)")
    parser.add_argument("--backends", type=int, default=64, help="backends (odd ones on two GPUs)")
    parser.add_argument("--postgres", default=POSTGRES_ADMIN_URL, help="admin URL of the PostgreSQL server")
    parser.add_argument("--only", choices=["sqlite", "postgres"], help="run one database only")
    parser.add_argument(
        "--meter",
        choices=["process", "in-process"],
        default="process",
        help="PostgreSQL: the meter in a process of its own (a fleet's shape) or in the feeder's",
    )
    parser.add_argument("--epoch-ms", type=int, default=10_000, help="attribution epoch (the engine's default)")
    parser.add_argument(
        "--seal",
        action="store_true",
        help="seal every request at the margin, as once a fit has settled (these counters never fit); time that too",
    )
    args = parser.parse_args(argv)
    n = args.requests or (30_000 if args.quick else 1_000_000)
    print(
        f"bench.ledger: {n} requests over {args.backends} backends per database, sampler at 10 Hz, "
        f"{args.epoch_ms} ms epochs; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"
    )
    results: dict[str, RunResult] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sqlite"):
            sqlite_url = f"sqlite:///{tmp}/bench.db"
            r = run_one("sqlite", sqlite_url, n, args.backends, Path(tmp) / "sqlite.jsonl", args.epoch_ms,
                        seal=args.seal)  # fmt: skip
            report(r)
            results["sqlite"] = r
        if args.only in (None, "postgres"):
            with postgres_database(args.postgres) as url:
                r = run_one(
                    "postgres",
                    url,
                    n,
                    args.backends,
                    Path(tmp) / "postgres.jsonl",
                    args.epoch_ms,
                    meter_process=args.meter == "process",
                    seal=args.seal,
                )
            report(r)
            results["postgres"] = r
    if len(results) == 2:
        ratio = results["postgres"].requests_per_s / results["sqlite"].requests_per_s
        print(f"postgres / sqlite: {ratio:.2f}x")
    line = " ".join(f"{k}_requests_per_s={v.requests_per_s:.0f}" for k, v in results.items())
    if "postgres" in results:
        line += f" postgres_cpu_us={sum(results['postgres'].cpu_us.values()):.0f}"
    print("RESULT " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
