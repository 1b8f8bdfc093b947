"""/metrics carries the metered energy (joules per tenant, model and phase) and each backend's GPU power."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.energy_metrics import ENERGY
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig
from tests.waiting import wait_until_async

from .harness import running_stack

METER = {"meter": {"source": "sim", "epoch_s": 1.0, "settle_s": 0.2, "engine_interval_s": 0.2}}


async def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_report_energy_per_tenant_model_phase_and_power(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ENERGY, "refresh_s", 0.0)  # read SQL on every scrape in this test
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0), overrides=METER, http=True) as s:
        call = s.stub.Generate(
            pb.BatchedGenerationRequest(
                requests=[pb.GenerationRequest(text="energy please")] * 3,
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=20)),
            ),
            metadata=s.auth,
        )
        await call
        rid = dict(await call.initial_metadata())["x-request-id"]
        reports = epbg.EnergyReportsStub(s.channel)
        admin = (("authorization", f"Bearer {s.admin_key}"),)
        for i in range(3):
            r = await reports.GetRequestEnergy(
                epb.GetRequestEnergyRequest(request_id=f"{rid}-{i}", wait_final=True, wait_timeout_ms=20000),
                metadata=admin,
            )
            assert r.final
        usage = await reports.GetUsage(epb.GetUsageRequest(group_by=epb.GetUsageRequest.TENANT), metadata=admin)
        row = next(r for r in usage.rows if r.key == "tenant-a")

        metrics = await _scrape(s.http_url)
        labels = lambda phase: (("model", "sim-model"), ("phase", phase), ("tenant", "tenant-a"))  # noqa: E731
        prefill = metrics[("joulegate_energy_joules_total", labels("prefill"))]
        decode = metrics[("joulegate_energy_joules_total", labels("decode"))]
        assert prefill > 0 and decode > 0
        assert abs(prefill - row.prefill_j) < 1e-6 and abs(decode - row.decode_j) < 1e-6

        backend = s.app.pools["sim-model"].backends[0].name

        async def power_w() -> float | None:  # the sampler needs two readings a second apart for a power figure
            return (await _scrape(s.http_url)).get(("joulegate_backend_power_watts", (("backend", backend),)))

        power = await wait_until_async(power_w, 4.0, what="a power figure on /metrics", poll_s=0.2)
        assert 70 <= power <= 700  # the simulated H100: 80 W idle, 650 W prefill
        # three short prompts are far too little prefill to fit the power model by: the backend is on the guess
        metrics = await _scrape(s.http_url)
        assert metrics[("joulegate_backend_calibrated", (("backend", backend),))] == 0.0
        assert ("joulegate_backend_counter_lag_seconds", (("backend", backend),)) not in metrics
        assert s.app.meter.engine.stats.calibration[backend] is None  # type: ignore[union-attr]
        # the gateway's own ledger marks how far it has written; the figures were final, so it was not far behind
        assert metrics[("joulegate_ledger_writers", (("state", "live"),))] == 1.0
        assert metrics[("joulegate_ledger_writers", (("state", "silent"),))] == 0.0
        assert 0 < metrics[("joulegate_ledger_writers_behind_seconds", ())] < 30
