"""Requests over HTTP show up in the energy reports exactly like gRPC ones: same fields, final joules, same tenant."""

from __future__ import annotations

import asyncio
from pathlib import Path

from text_generation import AsyncClient

from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig

from .harness import running_stack

METER = {"meter": {"source": "sim", "epoch_s": 1.0, "settle_s": 0.3, "engine_interval_s": 0.2}}


async def test_http_and_grpc_requests_read_back_alike(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0), overrides=METER, http=True) as s:
        # the same prompt, once through each front door
        client = AsyncClient(s.http_url, headers={"Authorization": f"Bearer {s.key}"}, timeout=30)
        async for _ in client.generate_stream("the same prompt", max_new_tokens=10):
            pass
        # text_generation drops response headers: find the HTTP request's id in the list of the tenant's requests
        call = s.stub.Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="the same prompt")],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=10)),
            ),
            metadata=s.auth,
        )
        await call
        grpc_id = dict(await call.initial_metadata())["x-request-id"]
        assert await asyncio.to_thread(s.app.ledger.flush, 10.0)  # both timelines are in SQL
        reports = epbg.EnergyReportsStub(s.channel)
        listed = await reports.ListRequests(epb.ListRequestsRequest(page_size=10), metadata=s.auth)
        http_ids = [r.request_id for r in listed.requests if r.api == "http"]
        assert len(http_ids) == 1 and any(r.request_id == grpc_id and r.api == "grpc" for r in listed.requests)

        answers = {}
        for rid in (http_ids[0], grpc_id):
            answers[rid] = await reports.GetRequestEnergy(
                epb.GetRequestEnergyRequest(request_id=rid, wait_final=True, wait_timeout_ms=20_000), metadata=s.auth
            )
        h, g = answers[http_ids[0]], answers[grpc_id]
        for r in (h, g):
            assert r.final and r.status == "OK" and r.tenant == "tenant-a" and r.model_id == "sim-model"
            assert r.generated_tokens == 10 and r.prefill_j > 0 and r.decode_j > 0
        assert h.prompt_tokens == g.prompt_tokens  # TGI counted the same prompt the same way
        assert (h.api, g.api) == ("http", "grpc")

        usage = await reports.GetUsage(epb.GetUsageRequest(group_by=epb.GetUsageRequest.TENANT), metadata=s.auth)
        row = next(r for r in usage.rows if r.key == "tenant-a")
        assert row.requests == 2 and row.generated_tokens == 20
        assert abs(row.prefill_j + row.decode_j - (h.prefill_j + h.decode_j + g.prefill_j + g.decode_j)) < 1e-6
