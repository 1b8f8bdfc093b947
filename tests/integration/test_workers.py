"""``joulegate serve --workers 2`` over real sockets, on PostgreSQL, with the simulator and the sim meter.

Traffic on both front doors (gRPC and HTTP, new connections so the kernel spreads them) reaches both workers (per
worker: its ``/metrics`` on its own port and its log lines); ``kill -9`` of a worker under traffic: the supervisor
starts it again on the same journal, whose replay closes ABORTED what it had in flight. The books then, as
tests/integration/test_gateway_kill9.py reads them: every call a client saw succeed has exactly one row, OK; no id
twice; every request counted once in the rollups; conservation per epoch. Last, SIGTERM to the supervisor under
traffic drains every child and exits 0: the calls seen to succeed meanwhile have their OK rows, and no row is left
open."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meter.ledger import ABORTED
from meter.store import create_key, make_engine, upgrade
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc
from sim.config import SimConfig
from sim.server import SimTGI
from tests.conftest import REPO_ROOT, free_port
from tests.waiting import wait_until_async

from .metering_support import check_books, query, wait_attributed
from .test_gateway_kill9 import gateway_config, wait_closed


def _free_pair() -> int:
    """A free port whose next port is free too (worker i's metrics listen on base + i)."""
    for _ in range(50):
        port = free_port()
        with contextlib.suppress(OSError), socket_bound(port + 1):
            return port
    raise AssertionError("no two consecutive free ports")


def _free_besides(metrics_port: int) -> int:
    while (port := free_port()) in (metrics_port, metrics_port + 1):
        pass
    return port


@contextlib.contextmanager
def socket_bound(port: int):  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        yield


async def _worker_pid(session: aiohttp.ClientSession, metrics_port: int) -> int | None:
    """The pid worker (metrics_port - base) reports on its own /metrics, None while it does not answer."""
    try:
        async with session.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=aiohttp.ClientTimeout(2)) as r:
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    m = re.search(r'joulegate_worker\{pid="(\d+)"', text)
    return int(m.group(1)) if m else None


@dataclass
class Traffic:
    grpc_port: int
    http_port: int
    key: str
    ok: list[str] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, seed: int) -> None:
        await asyncio.gather(*(self._grpc(random.Random(seed + i)) for i in range(4)), self._http_all(seed))

    async def _grpc(self, rnd: random.Random) -> None:
        while not self.stop.is_set():
            await self._grpc_channel(rnd)

    async def _grpc_channel(self, rnd: random.Random) -> None:
        """Calls over one new channel (no shared subchannel: a connection of its own, which the kernel hands to one
        worker), a few, then the next channel."""
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.grpc_port}", options=options) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            md = (("authorization", f"Bearer {self.key}"),)
            for _ in range(5):
                if self.stop.is_set():
                    return
                params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=rnd.choice([5, 20, 80])))
                text = "w " * rnd.randint(10, 200)
                try:
                    if rnd.random() < 0.5:
                        call = stub.GenerateStream(
                            pb.SingleGenerationRequest(
                                model_id="sim-model", request=pb.GenerationRequest(text=text), params=params
                            ),
                            metadata=md,
                            timeout=30,
                        )
                        async for _ in call:
                            pass
                        ids = [dict(await call.initial_metadata())["x-request-id"]]
                    else:
                        unary = stub.Generate(
                            pb.BatchedGenerationRequest(
                                model_id="sim-model", requests=[pb.GenerationRequest(text=text)] * 2, params=params
                            ),
                            metadata=md,
                            timeout=30,
                        )
                        await unary
                        rid = dict(await unary.initial_metadata())["x-request-id"]
                        ids = [f"{rid}-0", f"{rid}-1"]
                except grpc.aio.AioRpcError as exc:
                    self.failed += 1
                    self.errors.append(f"grpc {exc.code().name}: {exc.details()}")
                    await asyncio.sleep(0.05)
                    continue
                self.ok.extend(ids)
                await asyncio.sleep(rnd.uniform(0, 0.03))

    async def _http_all(self, seed: int) -> None:
        # a new connection per request: the kernel picks the worker of each
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await asyncio.gather(*(self._http(session, random.Random(seed + 100 + i)) for i in range(4)))

    async def _http(self, session: aiohttp.ClientSession, rnd: random.Random) -> None:
        headers = {"authorization": f"Bearer {self.key}"}
        url = f"http://127.0.0.1:{self.http_port}"
        while not self.stop.is_set():
            n = rnd.choice([5, 20, 80])
            try:
                if rnd.random() < 0.5:
                    body = {"inputs": "w " * rnd.randint(10, 200), "parameters": {"max_new_tokens": n}}
                    async with session.post(f"{url}/generate", json=body, headers=headers, timeout=30) as r:
                        await r.read()
                        status, rid = r.status, r.headers.get("x-request-id")
                else:
                    body = {
                        "model": "sim-model",
                        "messages": [{"role": "user", "content": "w " * rnd.randint(10, 200)}],
                        "max_tokens": n,
                        "stream": True,
                    }
                    async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=30) as r:
                        data = await r.read()
                        status, rid = r.status, r.headers.get("x-request-id")
                        if status == 200 and b"[DONE]" not in data:
                            status = -1  # the stream was cut (its worker died): not a success the client saw
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, rid = -1, None
                self.errors.append(f"http {type(exc).__name__}")
            if status != 200 or rid is None:
                self.failed += 1
                if status != -1:
                    self.errors.append(f"http {status}")
                await asyncio.sleep(0.05)
                continue
            self.ok.append(rid)
            await asyncio.sleep(rnd.uniform(0, 0.03))


async def _serving(grpc_port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            assert proc.returncode is None, _tail(log)
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            return False

        await wait_until_async(serving, 90.0, what="a worker to become SERVING", poll_s=0.1)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _served_by_worker(log: str) -> dict[tuple[str, str], int]:
    """(worker, api) -> requests that worker's log says it finished."""
    out: dict[tuple[str, str], int] = {}
    for line in log.splitlines():
        if "request_finished" not in line:
            continue
        worker = re.search(r" worker=(\d+)\b", line)
        api = re.search(r" api=(\w+)", line)
        if worker and api:
            k = (worker.group(1), api.group(1))
            out[k] = out.get(k, 0) + 1
    return out


@pytest.mark.slow
async def test_two_workers_share_the_ports_survive_a_kill_9_and_drain_with_the_books_whole(
    tmp_path: Path, pg_url: str
) -> None:
    upgrade(pg_url)
    db = make_engine(pg_url)
    key = create_key(db, "tenant-a").key
    sim = SimTGI(SimConfig(time_scale=0.5))
    sim_url = await sim.start()
    metrics_port = _free_pair()
    grpc_port, http_port = _free_besides(metrics_port), _free_besides(metrics_port)
    listeners = (
        f'grpc_listen = "127.0.0.1:{grpc_port}"\nhttp_listen = "127.0.0.1:{http_port}"\n'
        f'worker_metrics_listen = "127.0.0.1:{metrics_port}"'
    )
    config = gateway_config(tmp_path, pg_url, sim_url, listeners)
    log = tmp_path / "serve.log"
    proc: asyncio.subprocess.Process | None = None
    try:
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "app.cli", "serve", "--config", str(config), "--workers", "2"),
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        await _serving(grpc_port, proc, log)
        async with aiohttp.ClientSession() as session:

            async def both_up() -> tuple[int, int] | None:
                pids = (await _worker_pid(session, metrics_port), await _worker_pid(session, metrics_port + 1))
                return pids if None not in pids else None  # type: ignore[return-value]

            pids = await wait_until_async(both_up, 60.0, what="both workers' /metrics", poll_s=0.1)
            assert pids[0] != pids[1] and proc.pid not in pids

            # 1. Traffic on both front doors; then kill -9 worker 1 under it.
            traffic = Traffic(grpc_port, http_port, key)
            task = asyncio.create_task(traffic.run(seed=1))
            await asyncio.sleep(4.0)
            served = _served_by_worker(log.read_text())
            for worker in ("0", "1"):  # both workers served, each on both front doors
                assert served.get((worker, "grpc"), 0) > 0 and served.get((worker, "http"), 0) > 0, served
            ok_before_kill = len(traffic.ok)
            os.kill(pids[1], signal.SIGKILL)

            async def restarted() -> int | None:
                pid = await _worker_pid(session, metrics_port + 1)
                return pid if pid not in (None, pids[1]) else None

            new_pid = await wait_until_async(restarted, 60.0, what="worker 1 started again", poll_s=0.1)
            await asyncio.sleep(3.0)  # traffic on the restarted worker too
            traffic.stop.set()
            await task
            assert await _worker_pid(session, metrics_port) == pids[0]  # worker 0 was left alone
        assert ok_before_kill > 0 and len(traffic.ok) > ok_before_kill
        text = log.read_text()
        after_kill = text[text.index("worker_exited") :]
        assert re.search(r"worker_exited +exit=-9 .*role=worker-1", text), text[-3000:]
        # the new worker 1 took over its journal and replayed it (closing what the dead one had in flight)
        assert re.search(rf"ledger_journal_found .*journal\.worker-1\.jsonl pid={new_pid}", after_kill)
        served = _served_by_worker(after_kill)
        assert served.get(("1", "grpc"), 0) + served.get(("1", "http"), 0) > 0, served
        await wait_closed(db, 15.0)
        await wait_attributed(db, 60.0)

        # 2. The books after the kill and the restart.
        rows = {r.request_id: r for r in query(db, "SELECT request_id, status, done_ns FROM requests")}
        ok = traffic.ok
        assert len(set(ok)) == len(ok), "an id handed out twice"
        missing = set(ok) - set(rows)
        assert not missing, f"{len(missing)} calls the clients saw succeed have no row"
        assert all(rows[i].status == "OK" for i in ok)
        others = {r.status for i, r in rows.items() if i not in set(ok)}
        assert others <= {ABORTED, "OK"}, others  # in flight at the kill: closed ABORTED (or finished, answer lost)
        check_books(db)
        counted = query(db, "SELECT SUM(requests) FROM usage_hourly")[0][0]
        assert counted == len(rows)  # every request counted once
        aborted = sum(r.status == ABORTED for r in rows.values())

        # 3. SIGTERM to the supervisor under traffic: every worker drains (calls in flight finish, new ones are
        # refused), the meter stops, exit 0, no child left, and what the clients saw succeed is in the books.
        draining = Traffic(grpc_port, http_port, key)
        task = asyncio.create_task(draining.run(seed=2))
        await asyncio.sleep(1.5)
        assert draining.ok, draining.errors
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0, _tail(log)
        draining.stop.set()
        await task
        text = log.read_text()
        # one line per record, whichever process wrote it: no line carries two records
        assert all(len(re.findall(r"Z \[\w+ *\] ", line)) <= 1 for line in text.splitlines())
        assert "workers_stopped" in text and text.count("gateway_stopped") >= 2 and "meter_daemon_stopped" in text
        for pid in (pids[0], new_pid):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        rows = {r.request_id: r for r in query(db, "SELECT request_id, status, done_ns FROM requests")}
        assert len(set(ok + draining.ok)) == len(ok) + len(draining.ok), "an id handed out twice"
        assert all(rows[i].status == "OK" for i in draining.ok), "a call seen to succeed during the drain has no OK row"
        assert query(db, "SELECT COUNT(*) FROM requests WHERE done_ns IS NULL")[0][0] == 0  # the drain closed all
        print(
            f"\n{len(ok)} ok ({ok_before_kill} before the kill), {traffic.failed} failed "
            f"({sorted(set(traffic.errors))[:5]}), {aborted} closed {ABORTED}; during the drain {len(draining.ok)} ok, "
            f"{draining.failed} failed ({sorted(set(draining.errors))[:3]}); served per (worker, api): "
            f"{_served_by_worker(text)}"
        )
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await sim.stop()
        db.dispose()
