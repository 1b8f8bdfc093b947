"""Key scopes and the audit of admin reads through a real gateway: a generate-only key reads no energy, a reports-only
key generates nothing (gRPC and HTTP), and every admin report read is on the record with its key."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import grpc
import pytest

from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from meter.store.audit import list_events
from meter.store.keys import create_key
from proxy.pb.fmaas import generation_pb2 as pb

from .harness import running_stack

REQUEST = pb.BatchedGenerationRequest(
    requests=[pb.GenerationRequest(text="scoped")], params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4))
)


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def test_scopes_are_enforced_at_both_front_doors_and_the_reports(tmp_path: Path) -> None:
    async with running_stack(tmp_path, http=True) as s:
        gen = create_key(s.app.engine, "tenant-a", scopes=frozenset({"generate"})).key
        rep = create_key(s.app.engine, "tenant-a", scopes=frozenset({"reports"})).key
        reports = epbg.EnergyReportsStub(s.channel)
        usage = epb.GetUsageRequest(group_by=epb.GetUsageRequest.TENANT)

        await s.stub.Generate(REQUEST, metadata=bearer(gen))
        await reports.GetUsage(usage, metadata=bearer(rep))
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await reports.GetUsage(usage, metadata=bearer(gen))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "may not call the reports APIs (its scopes: generate)" in denied.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await s.stub.Generate(REQUEST, metadata=bearer(rep))
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        async with aiohttp.ClientSession() as http:
            body = {"inputs": "scoped", "parameters": {"max_new_tokens": 4}}
            async with http.post(f"{s.http_url}/generate", json=body, headers=dict(bearer(rep))) as resp:
                assert resp.status == 403 and "may not call the generate APIs" in await resp.text()
            async with http.post(f"{s.http_url}/generate", json=body, headers=dict(bearer(gen))) as resp:
                assert resp.status == 200


async def test_admin_report_reads_are_audited_tenant_reads_are_not(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as s:
        reports = epbg.EnergyReportsStub(s.channel)
        usage = epb.GetUsageRequest(group_by=epb.GetUsageRequest.TENANT)
        await reports.GetUsage(usage, metadata=bearer(s.key))  # a tenant reading its own: not an admin read
        await reports.GetUsage(usage, metadata=bearer(s.admin_key))
        await reports.ListRequests(epb.ListRequestsRequest(page_size=5), metadata=bearer(s.admin_key))
        reads = list_events(s.app.engine, action="report.read")
        admin_id = s.admin_key.split("_")[1]
        assert [(e.actor, e.target) for e in reads] == [
            (f"key:{admin_id}", "GetUsage"),
            (f"key:{admin_id}", "ListRequests"),
        ]
        assert all(e.detail["peer"].startswith("ipv4:127.0.0.1") for e in reads)
