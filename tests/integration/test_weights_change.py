"""A backend restarted with other weights under the same model name: the gateway's meter asks the backend what it
serves, sees the change, and the engine starts the backend's power model over (no seals with the old fit).

Real parts over loopback: a simulated TGI serving ``org/model-a``, the gateway with its in-process meter in front,
then the simulator stopped and another started on the same port serving ``org/model-b`` (the gateway's model name,
``sim-model``, stays: the requests in the ledger say nothing changed)."""

from __future__ import annotations

from pathlib import Path

import structlog.testing

from sim.config import SimConfig
from sim.server import SimTGI
from tests.waiting import wait_until_async

from .harness import running_stack
from .metering_support import run_traffic, wait_attributed

METER = {"source": "sim", "epoch_s": 1.0, "settle_s": 0.5, "engine_interval_s": 0.2, "lag_ms": 50}


async def test_other_weights_behind_the_same_name_start_the_fit_over(tmp_path: Path) -> None:
    first = SimTGI(SimConfig(model_id="org/model-a", time_scale=0.2))
    url = await first.start()
    second = SimTGI(SimConfig(model_id="org/model-b", time_scale=0.2))
    try:
        with structlog.testing.capture_logs() as logs:
            async with running_stack(tmp_path, backend_urls=[url], overrides={"meter": METER}) as s:
                backend = url.removeprefix("http://")
                traffic = await run_traffic(s.channel, [s.key], seconds=1.5, clients_per_key=2)
                assert traffic.failures == 0
                assert s.app.ledger.flush(10.0)
                await wait_attributed(s.app.engine, 15.0)
                assert not [e for e in logs if e["event"] == "engine_backend_serves_other_weights"]

                await first.stop()
                (pool_backend,) = s.app.pools["sim-model"].backends
                await wait_until_async(lambda: not pool_backend.healthy, 10.0, what="the backend down", poll_s=0.05)
                await second.start(port=int(url.rsplit(":", 1)[1]))
                await wait_until_async(lambda: pool_backend.healthy, 10.0, what="the backend back", poll_s=0.05)
                traffic = await run_traffic(s.channel, [s.key], seconds=1.5, clients_per_key=2)
                assert traffic.failures == 0

                def noticed() -> list[dict] | None:
                    found = [e for e in logs if e["event"] == "engine_backend_serves_other_weights"]
                    return found or None

                [said] = await wait_until_async(noticed, 20.0, what="the engine to notice", poll_s=0.1)
                assert said["backend"] == backend
                assert (said["before"], said["now"]) == ("tgi:org/model-a@-", "tgi:org/model-b@-")
                [changed] = [e for e in logs if e["event"] == "meter_backend_weights_changed"]
                assert changed["backend"] == backend
    finally:
        await second.stop()
        await first.stop()
