"""A fleet on one machine, under faults: N gateway replicas (``joulegate serve --meter none``) and M simulated TGI
backends with their simulated GPUs, metered by two meter daemons (``joulegate meter``, one per "node", each metering
its node's backends), all on ONE PostgreSQL database (a fresh one per run); clients send traffic over every replica
(passthrough calls and calls in a ``window`` class whose releases align across replicas on the wall clock).

Faults, under traffic, one after the other:

- ``kill -9`` of a replica, then its restart (same journal: the restart closes its open rows ``ABORTED``; a new
  port, as a restarted pod gets a new address: the clients follow it);
- ``SIGTERM`` of another replica (it drains), then its restart;
- ``kill -9`` of a meter daemon, then its restart (same journal);
- a TCP cut between every joulegate process and PostgreSQL (a real forwarder, ``tests/tcp_cut.py``: open connections
  reset, new ones refused), then its restore.

Afterwards the run waits until every request is final and checks what the database holds against what the clients
saw:

- ``rows_missing``: calls a client saw succeed that have no ``requests`` row ending ``OK``;
- ``rows_doubled``: request ids a client was handed twice, requests counted more than once in ``usage_hourly``, and
  seals whose figures are not the sums of their rows;
- ``conservation_error_mj``: per backend, |counter - (attributed + idle + adjustment)| over its epochs, summed;
- ``finals_moved``: requests whose final (sealed) figures, read during the run, differ at the end;
- ``catchup_s``: from the repair of the last fault until every backend's attribution covered that instant.

    python -m bench.fleet            # ~70 s: 20 s database cut, 60 s of traffic
    python -m bench.fleet --quick    # ~35 s: 4 s cut, 22 s of traffic (tests/integration/test_fleet.py)

Ends with ``RESULT replicas=3 meters=2 calls_ok=... rows_missing=0 rows_doubled=0 conservation_error_mj=0
finals_moved=0 catchup_s=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._procs import POSTGRES_ADMIN_URL as PG_ADMIN
from bench._procs import free_port, postgres_database
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from tests.tcp_cut import TcpCut

REPO = Path(__file__).resolve().parent.parent
NODES = ("node-a", "node-b")
GENERATION_SERVICE = "fmaas.GenerationService"
REPORTS_SERVICE = "joulegate.v1.EnergyReports"
MODEL = "sim-model"


@dataclass(frozen=True)
class Plan:
    """When each fault strikes, in seconds from the start of traffic (at the earliest: each waits for the repair of
    the one before), and when it is repaired (the same distance after it struck); traffic goes on ``after_s`` past
    the last repair."""

    traffic_s: float
    kill_replica: tuple[float, float]
    term_replica: tuple[float, float]
    kill_meter: tuple[float, float]
    db_cut: tuple[float, float]
    clients_per_replica: int
    time_scale: float
    after_s: float


QUICK = Plan(
    traffic_s=22.0,
    kill_replica=(3.0, 4.0),
    term_replica=(6.0, 7.0),
    kill_meter=(8.0, 9.5),
    db_cut=(11.0, 15.0),
    clients_per_replica=2,
    time_scale=0.3,
    after_s=5.0,
)
FULL = Plan(
    traffic_s=60.0,
    kill_replica=(5.0, 8.0),
    term_replica=(12.0, 15.0),
    kill_meter=(18.0, 22.0),
    db_cut=(26.0, 46.0),
    clients_per_replica=3,
    time_scale=0.5,
    after_s=10.0,
)


# -- processes ------------------------------------------------------------------------------------------------------


def _config(path: Path, db_url: str, backends: list[str]) -> None:
    lines = [
        '[server]\nhttp_listen = ""\ndrain_grace_s = 2.0\nlog_format = "console"\nlog_level = "warning"\n',
        f'[db]\nurl = "{db_url}"\n',
        "[auth]\ncache_ttl_s = 600\n",
        "[backend_pool]\nhealth_interval_s = 0.5\n",
        # short epochs, so that the run's energy is final seconds after its last request
        '[meter]\nsource = "sim"\nepoch_s = 1.0\nsettle_s = 0.5\nengine_interval_s = 0.3\nlag_ms = 50\n'
        # a meter that takes over a backend starts its calibration afresh: seal at the margin meanwhile, so that
        # the run's energy is final seconds after the traffic, not the product's 300 s hold later
        "open_request_timeout_s = 30.0\nuncalibrated_seal_hold_s = 0.0\n",
        f'[[models]]\nmodel_id = "{MODEL}"\n',
    ]
    for i, url in enumerate(backends):
        lines.append(f'[[models.backends]]\nurl = "{url}"\nname = "tgi-{i}"\nnode = "{NODES[i % len(NODES)]}"\n')
    lines.append(
        '[models.shaping]\ndefault_class = "interactive"\n'
        '[models.shaping.classes.interactive]\npolicy = "passthrough"\n'
        '[models.shaping.classes.sync]\npolicy = "window"\nwindow_ms = 200\n'  # releases aligned across replicas
    )
    path.write_text("\n".join(lines))


class Proc:
    """One joulegate process (``serve`` or ``meter``) that can be killed and started again with the same arguments
    (so the same journal) but a new port, as a restarted pod gets a new address behind its Service (the old port,
    free for a moment on a shared machine, may be taken by then); its stderr goes to a log file that every start
    appends to."""

    def __init__(self, name: str, args: list[str], port: int, log: Path, env: dict[str, str], service: str) -> None:
        self.name, self.args, self.port, self.log, self.env = name, args, port, log, env
        self.service = service  # the gRPC service whose health says it serves (not another process on the port)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, new_port: bool = False) -> None:
        if new_port:
            old = f"127.0.0.1:{self.port}"
            self.port = free_port()
            self.args = [f"127.0.0.1:{self.port}" if a == old else a for a in self.args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.cli", *self.args],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO), **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def serving(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=self.service), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} is not SERVING after {timeout_s} s")
                await asyncio.sleep(0.1)

    def died(self) -> str | None:
        """Why the process is not running, if it is not."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"{self.name} exited {self.proc.returncode}: {self.log.read_text()[-1500:]}"

    async def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        await asyncio.to_thread(self.proc.wait, 60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def serve_sims(ports: list[int], time_scale: float) -> None:
    """The simulated backends, all in one process (``--serve-sims``): until SIGTERM."""
    from sim.config import SimConfig
    from sim.server import SimTGI

    async def main() -> None:
        sims = [SimTGI(SimConfig(model_id=MODEL, name=f"gpu-{i}", time_scale=time_scale)) for i in range(len(ports))]
        for s, p in zip(sims, ports, strict=True):
            await s.start(port=p)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        for s in sims:
            await s.stop()

    asyncio.run(main())


def _start_sims(workdir: Path, ports: list[int], time_scale: float) -> subprocess.Popen[bytes]:
    with (workdir / "sims.log").open("wb") as err:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.fleet",
                "--serve-sims",
                ",".join(map(str, ports)),
                "--time-scale",
                str(time_scale),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
        )


# -- traffic --------------------------------------------------------------------------------------------------------


@dataclass
class Clients:
    replicas: list[Proc]  # called round-robin, on their current ports
    key: str
    ok: list[str] = field(default_factory=list)
    failed: int = 0
    codes: Counter[str] = field(default_factory=Counter)  # of the failed calls
    failed_at: list[float] = field(default_factory=list)  # when (monotonic)
    samples: dict[tuple[int, str], str] = field(default_factory=dict)  # (replica, code): the first failure's details
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, per_replica: int, seed: int) -> None:
        channels: dict[int, grpc.aio.Channel] = {}

        def stub(at: int) -> pbg.GenerationServiceStub:
            port = self.replicas[at].port
            if port not in channels:
                channels[port] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            return pbg.GenerationServiceStub(channels[port])

        try:
            n = per_replica * len(self.replicas)
            await asyncio.gather(*(self._client(stub, i, random.Random(seed + i)) for i in range(n)))
        finally:
            for c in channels.values():
                await c.close()

    async def _client(self, stub: Callable[[int], pbg.GenerationServiceStub], i: int, rnd: random.Random) -> None:
        at = i % len(self.replicas)
        while not self.stop.is_set():
            cls = "sync" if rnd.random() < 0.3 else "interactive"
            md = (("authorization", f"Bearer {self.key}"), ("x-traffic-class", cls))
            params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=rnd.choice([5, 20, 60])))
            text = "w " * rnd.randint(10, 300)
            try:
                if rnd.random() < 0.5:
                    call = stub(at).GenerateStream(
                        pb.SingleGenerationRequest(
                            model_id=MODEL, request=pb.GenerationRequest(text=text), params=params
                        ),
                        metadata=md,
                        timeout=30,
                    )
                    async for _ in call:
                        pass
                    ids = [dict(await call.initial_metadata())["x-request-id"]]
                else:
                    n = rnd.randint(1, 2)
                    unary = stub(at).Generate(
                        pb.BatchedGenerationRequest(
                            model_id=MODEL, requests=[pb.GenerationRequest(text=text)] * n, params=params
                        ),
                        metadata=md,
                        timeout=30,
                    )
                    await unary
                    rid = dict(await unary.initial_metadata())["x-request-id"]
                    ids = [rid] if n == 1 else [f"{rid}-{k}" for k in range(n)]
            except grpc.aio.AioRpcError as exc:
                self.failed += 1
                self.codes[exc.code().name] += 1
                self.samples.setdefault((at, exc.code().name), f"{exc.details()}"[:160])
                self.failed_at.append(time.monotonic())
                at = (at + 1) % len(self.replicas)  # that replica may be gone: the next call goes to another
                await asyncio.sleep(0.05)
                continue
            self.ok.extend(ids)  # only now has the client seen it succeed
            at = (at + 1) % len(self.replicas)
            await asyncio.sleep(rnd.uniform(0, 0.1))


# -- the books ------------------------------------------------------------------------------------------------------


def _q(db: sa.Engine, sql: str, params: dict | None = None) -> list[sa.Row]:
    with db.connect() as conn:
        return list(conn.execute(sa.text(sql), params or {}))


def finals(db: sa.Engine) -> dict[str, tuple[int, ...]]:
    """Every sealed request's final figures."""
    rows = _q(db, "SELECT request_id, prefill_mj, decode_mj, idle_time_mj, idle_tokens_mj FROM request_seals")
    return {r[0]: tuple(r[1:]) for r in rows}


def attributed_until(db: sa.Engine) -> dict[str, int]:
    return dict(_q(db, "SELECT backend, MAX(epoch_end_ns) FROM backend_epochs WHERE backend <> '' GROUP BY backend"))


def not_final(db: sa.Engine) -> int:
    """Requests whose energy may still change: open, or with GPU work and not sealed."""
    from meter.engine.finality import final_expr
    from meter.store.models import Request, RequestSeal

    r, s = Request.__table__, RequestSeal.__table__
    query = sa.select(sa.func.count()).select_from(r.outerjoin(s, s.c.request_id == r.c.request_id))
    with db.connect() as conn:
        return int(conn.execute(query.where(sa.not_(final_expr(r, s)))).scalar_one())


def stuck(db: sa.Engine) -> str:
    """The requests not final yet and how far their backends are attributed (for the error that says so)."""
    rows = _q(
        db,
        "SELECT r.request_id, r.backend, r.status, r.received_ns, r.released_ns, r.first_token_ns, r.done_ns "
        "FROM requests r LEFT JOIN request_seals s ON s.request_id = r.request_id WHERE s.request_id IS NULL "
        "AND r.backend IS NOT NULL AND r.released_ns IS NOT NULL ORDER BY r.received_ns LIMIT 10",
    )
    return f"{[tuple(r) for r in rows]}; attributed until {attributed_until(db)}; now {time.time_ns()}"


def conservation_error_mj(db: sa.Engine) -> dict[str, int]:
    rows = _q(
        db,
        "SELECT backend, SUM(ABS(counter_mj - prefill_mj - decode_mj - idle_mj - adjustment_mj)) FROM backend_epochs "
        "WHERE backend <> '' GROUP BY backend",
    )
    return {b: int(e) for b, e in rows}


def doubled(db: sa.Engine, ok: list[str]) -> int:
    handed_twice = len(ok) - len(set(ok))
    rows = int(_q(db, "SELECT COUNT(*) FROM requests")[0][0])
    counted = int(_q(db, "SELECT COALESCE(SUM(requests), 0) FROM usage_hourly")[0][0])
    bad_seals = int(
        _q(
            db,
            "SELECT COUNT(*) FROM (SELECT s.request_id FROM request_seals s JOIN request_energy e "
            "ON e.request_id = s.request_id GROUP BY s.request_id, s.prefill_mj, s.decode_mj "
            "HAVING s.prefill_mj <> SUM(e.prefill_mj) OR s.decode_mj <> SUM(e.decode_mj)) x",
        )[0][0]
    )
    return handed_twice + abs(counted - rows) + bad_seals


def missing(db: sa.Engine, ok: list[str]) -> int:
    status = dict(_q(db, "SELECT request_id, status FROM requests"))
    return sum(1 for rid in set(ok) if status.get(rid) != "OK")


# -- the run --------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    replicas: int
    meters: int
    calls_ok: int
    calls_failed: int
    failed_codes: dict[str, int]
    failed_during_cut: int  # calls that failed while the database was cut off
    rows_missing: int
    rows_doubled: int
    conservation_error_mj: int
    finals_moved: int
    finals_checked: int
    catchup_s: float
    per_backend_mj: dict[str, int]

    def result_line(self) -> str:
        return (
            f"RESULT replicas={self.replicas} meters={self.meters} calls_ok={self.calls_ok} "
            f"rows_missing={self.rows_missing} rows_doubled={self.rows_doubled} "
            f"conservation_error_mj={self.conservation_error_mj} finals_moved={self.finals_moved} "
            f"catchup_s={self.catchup_s:.1f}"
        )


async def run_fleet(workdir: Path, plan: Plan, *, replicas: int = 3, backends: int = 4, log=print) -> Outcome:
    from meter.store import make_engine, upgrade
    from meter.store.keys import create_key

    scratch = contextlib.ExitStack()
    db_url = scratch.enter_context(postgres_database(PG_ADMIN, prefix="jg_fleet"))
    procs: list[Proc] = []
    sims: subprocess.Popen[bytes] | None = None
    cut = TcpCut(str(sa.engine.make_url(db_url).host or "127.0.0.1"), sa.engine.make_url(db_url).port or 5432).start()
    db = make_engine(db_url)
    try:
        await asyncio.to_thread(upgrade, db_url)
        key = await asyncio.to_thread(lambda: create_key(db, "fleet").key)
        via_cut = sa.engine.make_url(db_url).set(port=cut.port).render_as_string(hide_password=False)

        sim_ports = [free_port() for _ in range(backends)]
        sims = _start_sims(workdir, sim_ports, plan.time_scale)
        assert sims.stdout is not None
        line = b"-"
        while line and line.strip() != b"ready":  # the simulators log their start on stdout, then say ready
            line = await asyncio.to_thread(sims.stdout.readline)
        if not line:
            raise RuntimeError(f"the simulators did not start: {(workdir / 'sims.log').read_text()[-2000:]}")
        config = workdir / "joulegate.toml"
        _config(config, via_cut, [f"http://127.0.0.1:{p}" for p in sim_ports])

        gateways = []
        for i in range(replicas):
            port = free_port()
            env = {"JOULEGATE_METER__JOURNAL_PATH": str(workdir / f"gw{i}" / "journal.jsonl")}
            args = ["serve", "--config", str(config), "--meter", "none", "--grpc-listen", f"127.0.0.1:{port}"]
            gateways.append(Proc(f"gateway {i}", args, port, workdir / f"gw{i}.log", env, GENERATION_SERVICE))
        meters = []
        for i, node in enumerate(NODES):
            port = free_port()
            args = [
                "meter",
                "--config",
                str(config),
                "--node",
                node,
                "--grpc-listen",
                f"127.0.0.1:{port}",
                "--journal",
                str(workdir / f"meter{i}" / "journal.jsonl"),
            ]
            meters.append(Proc(f"meter {node}", args, port, workdir / f"meter{i}.log", {}, REPORTS_SERVICE))
        procs = [*gateways, *meters]
        for p in procs:
            p.start()
        await asyncio.gather(*(p.serving() for p in procs))
        database = sa.engine.make_url(db_url).database
        log(f"fleet: {replicas} gateways, {len(meters)} meters, {backends} simulated backends, PostgreSQL {database}")

        clients = Clients(gateways, key)
        traffic = asyncio.create_task(clients.run(plan.clients_per_replica, seed=11))
        t0 = time.monotonic()
        seen_final: dict[str, tuple[int, ...]] = {}

        async def at(s: float) -> None:
            await asyncio.sleep(max(0.0, t0 + s - time.monotonic()))
            seen_final.update(await asyncio.to_thread(finals, db))  # final figures, read mid-run

        await at(plan.kill_replica[0])
        await gateways[0].signal(signal.SIGKILL)
        struck = time.monotonic() - t0
        log(f"  {time.monotonic() - t0:5.1f} s  kill -9 gateway 0")
        await at(struck + plan.kill_replica[1] - plan.kill_replica[0])
        gateways[0].start(new_port=True)
        await gateways[0].serving()
        log(f"  {time.monotonic() - t0:5.1f} s  gateway 0 back")
        await at(plan.term_replica[0])
        await gateways[1].signal(signal.SIGTERM)
        struck = time.monotonic() - t0
        log(f"  {time.monotonic() - t0:5.1f} s  SIGTERM gateway 1 (drained)")
        await at(struck + plan.term_replica[1] - plan.term_replica[0])
        gateways[1].start(new_port=True)
        await gateways[1].serving()
        log(f"  {time.monotonic() - t0:5.1f} s  gateway 1 back")
        await at(plan.kill_meter[0])
        await meters[0].signal(signal.SIGKILL)
        struck = time.monotonic() - t0
        log(f"  {time.monotonic() - t0:5.1f} s  kill -9 meter {NODES[0]}")
        await at(struck + plan.kill_meter[1] - plan.kill_meter[0])
        meters[0].start(new_port=True)
        await meters[0].serving()
        log(f"  {time.monotonic() - t0:5.1f} s  meter {NODES[0]} back")
        await at(plan.db_cut[0])
        await asyncio.to_thread(cut.cut)
        t_cut = time.monotonic()
        log(f"  {t_cut - t0:5.1f} s  PostgreSQL cut off from every joulegate process")
        await asyncio.sleep(max(0.0, t_cut + plan.db_cut[1] - plan.db_cut[0] - time.monotonic()))
        await asyncio.to_thread(cut.restore)
        repaired_ns = time.time_ns()
        t_repaired = time.monotonic()
        log(f"  {t_repaired - t0:5.1f} s  PostgreSQL back")

        async def caught_up() -> float:
            while True:
                until = await asyncio.to_thread(attributed_until, db)
                if len(until) == backends and min(until.values()) >= repaired_ns:
                    return time.monotonic() - t_repaired
                await asyncio.sleep(0.2)

        catchup = asyncio.create_task(caught_up())
        await at(max(plan.traffic_s, t_repaired - t0 + plan.after_s))
        clients.stop.set()
        await traffic
        if dead := [why for p in procs if (why := p.died())]:  # e.g. a restart that could not bind its port
            raise RuntimeError(f"a process of the fleet is not running: {dead}")
        log(f"  {time.monotonic() - t0:5.1f} s  traffic stopped: {len(clients.ok)} calls ok, {clients.failed} failed")
        catchup_s = await asyncio.wait_for(catchup, 60)
        log(f"  attribution caught up {catchup_s:.1f} s after the last repair")

        deadline = time.monotonic() + 60  # they are final seconds after the traffic; a minute means never
        while (left := await asyncio.to_thread(not_final, db)) > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{left} requests still not final 60 s after the traffic: {stuck(db)}")
            await asyncio.sleep(0.3)
        log(f"  {time.monotonic() - t0:5.1f} s  every request final")

        end_final = await asyncio.to_thread(finals, db)
        moved = sum(1 for rid, figures in seen_final.items() if end_final.get(rid) != figures)
        errors = await asyncio.to_thread(conservation_error_mj, db)
        return Outcome(
            replicas=replicas,
            meters=len(meters),
            calls_ok=len(clients.ok),
            calls_failed=clients.failed,
            failed_codes=dict(clients.codes),
            failed_during_cut=sum(1 for t in clients.failed_at if t_cut <= t <= t_repaired),
            rows_missing=await asyncio.to_thread(missing, db, clients.ok),
            rows_doubled=await asyncio.to_thread(doubled, db, clients.ok),
            conservation_error_mj=sum(errors.values()),
            finals_moved=moved,
            finals_checked=len(seen_final),
            catchup_s=catchup_s,
            per_backend_mj=errors,
        )
    finally:
        for p in procs:
            p.stop()
        if sims is not None:
            sims.terminate()
            sims.wait(30)
        cut.close()
        db.dispose()
        scratch.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the short form (a 4 s cut, 22 s of traffic)")
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--dir", type=Path, help="keep the processes' logs here (default: a temporary directory)")
    ap.add_argument("--serve-sims", help=argparse.SUPPRESS)
    ap.add_argument("--time-scale", type=float, default=0.3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_sims:
        serve_sims([int(p) for p in args.serve_sims.split(",")], args.time_scale)
        return
    plan = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.dir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        out = asyncio.run(run_fleet(workdir, plan, replicas=args.replicas, backends=args.backends))
    print(
        f"{out.calls_failed} calls failed (the faults: {out.failed_codes}; {out.failed_during_cut} while the "
        f"database was cut off); finals read mid-run: "
        f"{out.finals_checked}; conservation per backend (mJ): {out.per_backend_mj}"
    )
    print(out.result_line())


if __name__ == "__main__":
    main()
