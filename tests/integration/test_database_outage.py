"""The gateway through a PostgreSQL outage (a real TCP cut between gateway and database): keys known before it keep
working, unknown keys get UNAVAILABLE / 503 with a retry hint and no internal address, revocations apply once the
database is back; a gateway started during the outage starts, says NOT_SERVING, and serves once the database
answers. Every call a client saw succeed has exactly one row."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import sqlalchemy as sa
import structlog.testing
from alembic import command
from alembic.script import ScriptDirectory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

from app.config import load_config
from app.server import GatewayApp
from meter.store import create_key, head, make_engine, revoke_key, upgrade
from meter.store.migrate import alembic_config
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc
from sim.config import SimConfig
from sim.server import SimTGI
from tests.tcp_cut import TcpCut
from tests.waiting import wait_until_async

TTL_S = 0.3  # key cache entries expire inside the outage
RETRY_MAX_S = 5.0  # meter.auth's default: a revocation applies at most this long after the database is back


@dataclass
class Gw:
    app: GatewayApp
    channel: grpc.aio.Channel
    cut: TcpCut
    direct: sa.Engine  # to the database itself, around the cut
    keys: dict[str, str]

    @property
    def stub(self) -> generation_pb2_grpc.GenerationServiceStub:
        return generation_pb2_grpc.GenerationServiceStub(self.channel)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    async def health(self) -> tuple[int, int]:
        """(gRPC health status, HTTP /health status code)."""
        grpc_status = (await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest())).status
        async with aiohttp.ClientSession() as http, http.get(f"{self.http}/health") as resp:
            return grpc_status, resp.status

    async def generate(self, key: str) -> tuple[grpc.StatusCode, str, dict[str, str]]:
        """One Generate call: (code, details, trailing metadata); the request id is in the metadata as 'id'."""
        call = self.stub.Generate(
            pb.BatchedGenerationRequest(
                model_id="sim-model",
                requests=[pb.GenerationRequest(text="hello there")],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3)),
            ),
            metadata=(("authorization", f"Bearer {key}"),),
        )
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or "", dict(exc.trailing_metadata() or ())
        return grpc.StatusCode.OK, "", {"id": dict(await call.initial_metadata())["x-request-id"]}

    async def http_generate(self, key: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{self.http}/generate",
                json={"inputs": "hello there", "parameters": {"max_new_tokens": 3}},
                headers={"authorization": f"Bearer {key}"},
            ) as resp,
        ):
            return resp.status, await resp.json(), {k.lower(): v for k, v in resp.headers.items()}

    def rows(self) -> dict[str, Any]:
        with self.direct.connect() as conn:
            rows = conn.execute(sa.text("SELECT request_id, done_ns, status, backend FROM requests"))
            return {r.request_id: r for r in rows}


def _through(cut: TcpCut, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=cut.port).render_as_string(hide_password=False)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, pg_url: str, *, cut_before_start: bool, revision: str = "head") -> AsyncIterator[Gw]:
    """A gateway whose database link runs through a TcpCut; keys are made directly on the database beforehand
    (migrated to ``revision``)."""
    direct = make_engine(pg_url)
    with direct.connect() as conn:
        command.upgrade(alembic_config(conn), revision)
        conn.commit()
    keys = {name: create_key(direct, name).key for name in ("a", "b", "revoked-later", "seen-only-after")}
    sim = SimTGI(SimConfig(time_scale=0.05))
    sim_url = await sim.start()
    target = make_url(pg_url)
    cut = TcpCut(target.host or "127.0.0.1", target.port or 5432).start()
    config = load_config(
        environ={},
        overrides={
            "db": {"url": _through(cut, pg_url)},
            "server": {"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "drain_grace_s": 1.0},
            "meter": {"source": "none", "journal_path": str(tmp_path / "journal.jsonl")},
            "auth": {"cache_ttl_s": TTL_S},
            "backend_pool": {"health_interval_s": 0.2},
            "models": [{"model_id": "sim-model", "backends": [{"url": sim_url}]}],
        },
    )
    if cut_before_start:
        cut.cut()
    app = GatewayApp(config)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    try:
        yield Gw(app, channel, cut, direct, keys)
    finally:
        await channel.close()
        if not cut.is_up:
            cut.restore()  # let the stop flush its ledger
        await app.stop(1.0)
        cut.close()
        await sim.stop()
        direct.dispose()


def _assert_no_address(text: str, gw: Gw) -> None:
    assert str(gw.cut.port) not in text and "127.0.0.1" not in text and "5432" not in text, text


async def test_known_keys_work_through_an_outage_unknown_keys_get_unavailable(tmp_path: Path, pg_url: str) -> None:
    async with gateway(tmp_path, pg_url, cut_before_start=False) as gw:
        ok_ids: list[str] = []
        for name in ("a", "b", "revoked-later"):  # known before the outage
            code, details, md = await gw.generate(gw.keys[name])
            assert code == grpc.StatusCode.OK, details
            ok_ids.append(md["id"])
        status, _body, headers = await gw.http_generate(gw.keys["a"])
        assert status == 200
        ok_ids.append(headers["x-request-id"])

        gw.cut.cut()
        assert revoke_key(gw.direct, gw.keys["revoked-later"].split("_")[1])  # on the database, behind the cut
        t_end = time.monotonic() + 3.0  # 10 cache TTLs
        during = 0
        while time.monotonic() < t_end:
            for name in ("a", "b", "revoked-later"):
                code, details, md = await gw.generate(gw.keys[name])
                assert code == grpc.StatusCode.OK, (name, code, details)
                ok_ids.append(md["id"])
                during += 1
            status, body, headers = await gw.http_generate(gw.keys["b"])
            assert status == 200, body
            ok_ids.append(headers["x-request-id"])
            await asyncio.sleep(0.05)
        assert gw.app.auth.stale_served >= during // 2  # the entries really expired and were served stale
        assert not gw.app.auth.key_store_available

        # A key the gateway has not seen: UNAVAILABLE / 503 with a retry hint, never UNKNOWN/500, no address.
        code, details, md = await gw.generate(gw.keys["seen-only-after"])
        assert code == grpc.StatusCode.UNAVAILABLE and int(md["retry-after-ms"]) >= 1000, (code, details)
        _assert_no_address(details, gw)
        status, body, headers = await gw.http_generate(gw.keys["seen-only-after"])
        assert status == 503 and int(headers["retry-after"]) >= 1, (status, body)
        _assert_no_address(str(body), gw)
        # A malformed key needs no database: refused as before.
        code, _, _ = await gw.generate("jg_nope_nope")
        assert code == grpc.StatusCode.UNAUTHENTICATED

        gw.cut.restore()
        t_back = time.monotonic()

        async def revoked_refused() -> bool:
            code, _details, md = await gw.generate(gw.keys["revoked-later"])
            if code == grpc.StatusCode.OK:
                ok_ids.append(md["id"])  # still served stale: a success like any other
            return code == grpc.StatusCode.UNAUTHENTICATED

        await wait_until_async(
            revoked_refused, RETRY_MAX_S + TTL_S + 5.0, what="the revocation to apply once it is back", poll_s=0.05
        )
        took_s = time.monotonic() - t_back
        print(f"\nrevocation applied {took_s:.2f} s after the database came back; {during} calls in the outage")
        code, details, md = await gw.generate(gw.keys["seen-only-after"])
        assert code == grpc.StatusCode.OK, details
        ok_ids.append(md["id"])
        assert time.monotonic() - t_back < 30

        assert await asyncio.to_thread(gw.app.ledger.flush, 20.0)

        await wait_until_async(lambda: not gw.app.ledger.stats.journal_pending, 20.0, what="the journal replayed")
        rows = gw.rows()
        assert sorted(ok_ids) == sorted(rows) and len(set(ok_ids)) == len(ok_ids)  # each success once
        assert all(r.done_ns is not None and r.status == "OK" for r in rows.values())


async def test_serve_starts_while_the_database_is_down_and_serves_once_it_answers(tmp_path: Path, pg_url: str) -> None:
    async with gateway(tmp_path, pg_url, cut_before_start=True) as gw:
        serving = health_pb2.HealthCheckResponse.SERVING
        assert await gw.health() == (health_pb2.HealthCheckResponse.NOT_SERVING, 503)
        code, details, md = await gw.generate(gw.keys["a"])  # no key can be checked yet
        assert code == grpc.StatusCode.UNAVAILABLE and "retry-after-ms" in md, (code, details)
        _assert_no_address(details, gw)
        status, body, _ = await gw.http_generate(gw.keys["a"])
        assert status == 503, body
        await asyncio.sleep(1.0)  # the retries keep failing: still not serving
        assert await gw.health() == (health_pb2.HealthCheckResponse.NOT_SERVING, 503)

        gw.cut.restore()
        t_back = time.monotonic()

        async def up() -> bool:
            return await gw.health() == (serving, 200)

        await wait_until_async(up, 15.0, what="SERVING once the database answers", poll_s=0.05)
        took_s = time.monotonic() - t_back
        print(f"\nSERVING {took_s:.2f} s after the database came back")
        ok_ids = []
        for name in ("a", "b"):
            code, details, md = await gw.generate(gw.keys[name])
            assert code == grpc.StatusCode.OK, details
            ok_ids.append(md["id"])
        assert await asyncio.to_thread(gw.app.ledger.flush, 20.0)
        rows = gw.rows()
        assert sorted(rows) == sorted(ok_ids)  # refused calls left no row; successes one each
        assert gw.app.ledger.stats.db_available


async def test_a_gateway_that_finds_an_unmigrated_schema_once_the_database_answers_waits_for_migrate(
    tmp_path: Path, pg_url: str
) -> None:
    previous = ScriptDirectory.from_config(alembic_config()).get_revision(head()).down_revision
    assert isinstance(previous, str)
    async with gateway(tmp_path, pg_url, cut_before_start=True, revision=previous) as gw:
        with structlog.testing.capture_logs() as logs:
            gw.cut.restore()
            await wait_until_async(
                lambda: any(e["event"] == "database_schema_mismatch" for e in logs), 15.0, what="the mismatch logged"
            )
        said = next(e for e in logs if e["event"] == "database_schema_mismatch")
        assert f"at revision {previous} and this joulegate needs {head()}" in said["error"]
        assert await gw.health() == (health_pb2.HealthCheckResponse.NOT_SERVING, 503)
        code, details, refused = await gw.generate(gw.keys["a"])  # before: served, and its row written into
        assert code == grpc.StatusCode.UNAVAILABLE and "retry-after-ms" in refused, details  # a schema not checked
        assert "starting" in details

        await asyncio.to_thread(upgrade, pg_url)  # what `joulegate migrate` does

        async def up() -> bool:
            return await gw.health() == (health_pb2.HealthCheckResponse.SERVING, 200)

        await wait_until_async(up, 15.0, what="SERVING once the schema is migrated", poll_s=0.05)
        code, details, md = await gw.generate(gw.keys["a"])
        assert code == grpc.StatusCode.OK, details
        assert await asyncio.to_thread(gw.app.ledger.flush, 20.0)
        rows = gw.rows()
        assert rows.pop(md["id"]).status == "OK"
        assert [(r.status, r.backend) for r in rows.values()] == [("UNAVAILABLE", None)]  # never reached a backend
