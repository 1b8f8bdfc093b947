"""EnergyReports end to end: real traffic through the gateway, the in-process sim meter attributes it, the reports
read it back over gRPC; and ``joulegate meter`` serving the same reports on its own port."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meter.pb.joulegate.v1 import energy_pb2 as pb
from meter.pb.joulegate.v1 import energy_pb2_grpc as pb_grpc
from meter.store.keys import create_key
from proxy.pb.fmaas import generation_pb2 as gen
from sim.config import SimConfig
from tests.conftest import REPO_ROOT, free_port
from tests.waiting import wait_until_async

from .harness import running_stack
from .metering_support import query

METER = {"source": "sim", "epoch_s": 1.0, "settle_s": 0.5, "engine_interval_s": 0.2, "lag_ms": 50,
         "idle_policy": "time"}  # fmt: skip


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def generate(stub: object, key: str, text: str) -> str:
    call = stub.Generate(  # type: ignore[attr-defined]
        gen.BatchedGenerationRequest(
            model_id="sim-model",
            requests=[gen.GenerationRequest(text=text)],
            params=gen.Parameters(stopping=gen.StoppingCriteria(max_new_tokens=12)),
        ),
        metadata=md(key),
    )
    await call
    return dict(await call.initial_metadata())["x-request-id"]


async def test_a_client_reads_its_requests_final_joules_and_the_books_balance(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0), overrides={"meter": METER}) as s:
        key_b = create_key(s.app.engine, "tenant-b").key
        ids_a = await asyncio.gather(*(generate(s.stub, s.key, f"tenant a prompt {i}") for i in range(4)))
        ids_b = await asyncio.gather(*(generate(s.stub, key_b, f"b {i}") for i in range(2)))
        reports = pb_grpc.EnergyReportsStub(s.channel)

        # The client waits for its request's energy to be final (the gateway nudges its engine meanwhile).
        waited = pb.GetRequestEnergyRequest(request_id=ids_a[0], wait_final=True, wait_timeout_ms=20_000)
        r = await reports.GetRequestEnergy(waited, metadata=md(s.key))
        assert r.final and r.tenant == "tenant-a" and r.generated_tokens == 12 and r.prompt_tokens > 0
        assert r.prefill_j > 0 and r.decode_j > 0 and r.idle_policy == pb.IDLE_POLICY_TIME
        assert r.total_j == pytest.approx(r.prefill_j + r.decode_j + r.idle_j)
        ((prefill_mj, decode_mj),) = query(
            s.app.engine,
            "SELECT SUM(prefill_mj), SUM(decode_mj) FROM request_energy WHERE request_id = :r",
            {"r": ids_a[0]},
        )
        assert (r.prefill_j, r.decode_j) == (prefill_mj / 1000, decode_mj / 1000)
        denied = reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id=ids_b[0]), metadata=md(s.key))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await denied
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

        for rid in (*ids_a, *ids_b):  # everything final, then the books
            waited = pb.GetRequestEnergyRequest(request_id=rid, wait_final=True, wait_timeout_ms=20_000)
            assert (await reports.GetRequestEnergy(waited, metadata=md(s.admin_key))).final
        mine = await reports.ListRequests(pb.ListRequestsRequest(), metadata=md(s.key))
        assert sorted(x.request_id for x in mine.requests) == sorted(ids_a)
        usage = await reports.GetUsage(pb.GetUsageRequest(), metadata=md(s.admin_key))
        backends = await reports.GetBackendEnergy(pb.GetBackendEnergyRequest(), metadata=md(s.admin_key))
        (b,) = backends.backends
        assert b.conservation_error_mj == 0 and b.requests == 6 and b.samples > 0
        assert b.counter_j == pytest.approx(b.attributed_j + b.idle_j, abs=1e-9)
        # Every joule given to a request shows up in the usage report, whose idle share is part of the idle bucket.
        assert [(row.key, row.requests) for row in usage.rows] == [("tenant-a", 4), ("tenant-b", 2)]
        assert usage.total.provisional_requests == 0
        assert usage.total.prefill_j + usage.total.decode_j == pytest.approx(b.attributed_j, abs=1e-9)
        assert 0 < usage.total.idle_j <= b.idle_j + 1e-9
        total_a = 0.0
        for i in ids_a:
            total_a += (
                await reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id=i), metadata=md(s.key))
            ).total_j
        assert usage.rows[0].total_j == pytest.approx(total_a)


async def test_the_meter_daemon_serves_reports_with_health_and_reflection(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0), db_url=db_url) as s:
        config = tmp_path / "meter.toml"
        config.write_text(
            f'[db]\nurl = "{db_url}"\n\n[server]\nlog_format = "console"\n\n'
            '[meter]\nsource = "sim"\nepoch_s = 1.0\nsettle_s = 0.5\nengine_interval_s = 0.2\nlag_ms = 50\n'
            "uncalibrated_seal_hold_s = 0.0\n"  # a few requests: too few to fit; sealed at the margin
            f'journal_path = "{tmp_path / "journal.jsonl"}"\n\n'
            f'[[models]]\nmodel_id = "sim-model"\nbackends = [{{ url = "{s.sims[0].url}" }}]\n'
        )
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "app.cli", "meter", "--config", str(config), "--grpc-listen", f"127.0.0.1:{port}"),
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def answered() -> health_pb2.HealthCheckResponse | None:
                    try:
                        return await health.Check(health_pb2.HealthCheckRequest(service="joulegate.v1.EnergyReports"))
                    except grpc.aio.AioRpcError:
                        assert proc.returncode is None, "the daemon exited early"
                        return None

                answer = await wait_until_async(answered, 15.0, what="the daemon's health service", poll_s=0.1)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                ask = reflection_pb2.ServerReflectionRequest(list_services="")
                listed = [a async for a in reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([ask])
                )]  # fmt: skip
                names = {x.name for x in listed[0].list_services_response.service}
                assert {"joulegate.v1.EnergyReports", "grpc.health.v1.Health"} <= names
                # The counter can only attribute what it saw: the request goes once the daemon's readings are in
                # the database (a prefill before the first reading is energy no reading holds: 0 J, and final).
                await wait_until_async(
                    lambda: query(s.app.engine, "SELECT COUNT(*) FROM samples")[0][0] >= 2,
                    15.0,
                    what="the daemon's first readings",
                    poll_s=0.1,
                )
                rid = await generate(s.stub, s.key, "metered by the daemon")
                reports = pb_grpc.EnergyReportsStub(channel)
                waited = pb.GetRequestEnergyRequest(request_id=rid, wait_final=True, wait_timeout_ms=20_000)
                r = await reports.GetRequestEnergy(waited, metadata=md(s.key))
                assert r.final and r.prefill_j > 0 and r.decode_j > 0
                backends = await reports.GetBackendEnergy(pb.GetBackendEnergyRequest(), metadata=md(s.admin_key))
                assert [b.conservation_error_mj for b in backends.backends] == [0]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await reports.GetBackendEnergy(pb.GetBackendEnergyRequest(), metadata=md(s.key))
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            proc.send_signal(signal.SIGTERM)
            raw, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, raw.decode()
        assert "reports_server_started" in raw.decode()
