"""End to end: traffic through the real gateway with the in-process sim meter -> per-request, per-phase joules that
add up to the counter exactly and match the simulator's truth."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from meter.config import MeterConfig
from meter.store.keys import create_key
from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig

from .harness import running_stack
from .metering_support import (
    accuracy,
    check_books,
    failed_reads,
    more_traffic_until_calibrated,
    query,
    run_traffic,
    sampler_phase_ms,
    wait_attributed,
    wait_sealed,
)

# Short epochs so the test sees several of them; the simulator at real speed (an H100's step times). The product's
# hold for an unsettled fit (the harness turns it off): requests are sealed once the calibration settled (~5 s).
METER = {
    "source": "sim",
    "epoch_s": 1.0,
    "settle_s": 0.5,
    "engine_interval_s": 0.2,
    "lag_ms": 50,
    "uncalibrated_seal_hold_s": MeterConfig().uncalibrated_seal_hold_s,
}


async def test_every_request_gets_joules_that_add_up_and_match_the_truth(tmp_path: Path) -> None:
    sim = SimConfig(time_scale=1.0)
    async with running_stack(tmp_path, sims=2, sim_config=sim, overrides={"meter": METER}) as s:
        key_b = create_key(s.app.engine, "tenant-b").key
        assert s.app.meter is not None
        traffic = await run_traffic(s.channel, [s.key, key_b], seconds=5.0)
        traffic = await more_traffic_until_calibrated(s.channel, [s.key, key_b], s.app.meter.engine, traffic)
        assert traffic.failures == 0 and traffic.calls > 30
        assert s.app.ledger.flush(10.0)
        await wait_attributed(s.app.engine)
        await wait_sealed(s.app.engine, traffic.request_ids or [])  # the bill: final figures, not provisional ones
        db = s.app.engine

        # Every request that reached a backend has prefill and decode joules.
        energy = {
            r[0]: (r[1], r[2])
            for r in query(db, "SELECT request_id, SUM(prefill_mj), SUM(decode_mj) FROM request_energy GROUP BY 1")
        }
        assert set(energy) == set(traffic.request_ids or [])
        failed = failed_reads(db)
        if failed:
            print(f"\nnote: {failed} counter reads failed (a stalled event loop): strict checks skipped")
        else:
            assert all(pre > 0 and dec > 0 for pre, dec in energy.values()), energy

        # Exact conservation per epoch and per backend, and the epochs tile the counter's readings.
        totals = check_books(db)
        assert set(totals) == {sv.url.removeprefix("http://") for sv in s.sims}
        for sv in s.sims:
            device = sv.device
            backend = sv.url.removeprefix("http://")
            # One read of the epochs (the meter runs on: an epoch attributed after check_books's read would be in a
            # second query's span and not in its totals).
            span = query(
                db,
                "SELECT MIN(first_reading_ns), MAX(last_reading_ns), SUM(gaps), SUM(counter_mj) FROM backend_epochs "
                "WHERE backend = :b",
                {"b": backend},
            )[0]
            first, last, gaps, counted = span
            assert counted >= totals[backend]
            if not failed:
                assert gaps == 0
                by_t = dict(query(db, "SELECT t_ns, energy_mj FROM samples WHERE device = :d", {"d": device}))
                assert counted == by_t[last] - by_t[first]

        # Against the simulator's truth. What limits it: the counter's 100 ms steps (a short request spans one or two
        # readings), the lag (calibrated from the counter once ~5 s of readings are in), and the prefill step's
        # length, estimated from prompt tokens. When the sampler's reads fall within a few ms of the counter's
        # updates, every read races an update and the readings' timing is ambiguous by 100 ms: the split of energy
        # between neighbours in time degrades (conservation does not), so the bounds are wider then.
        acc = accuracy(db, s.sims)
        phase = sampler_phase_ms(db, s.sims[0].device)
        racing = min(phase, 100 - phase) < 4
        print(f"\nend-to-end accuracy vs /sim/truth: {acc} (sampler phase {phase:.1f} ms of the counter's 100 ms)")
        assert acc.n == len(energy)
        racing = racing or failed > 0
        assert acc.median < (0.25 if racing else 0.04), acc
        assert acc.p95 < (0.7 if racing else 0.25), acc
        assert all(abs(e) < (0.08 if racing else 0.05) for e in acc.tenant_errors.values()), acc


async def test_requests_that_never_reach_a_backend_count_once_with_no_energy(tmp_path: Path) -> None:
    """Requests whose deadline passes in the shaping queue never reach a backend: they count, under backend ''."""
    hold = {"shaping": {"classes": {"default": {"policy": "window", "window_ms": 60_000}}}}
    async with running_stack(tmp_path, overrides={"meter": METER}, model=hold) as s:
        req = pb.BatchedGenerationRequest(model_id="sim-model", requests=[pb.GenerationRequest(text="wait for me")])
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.stub.Generate(req, metadata=s.auth, timeout=0.2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert s.app.ledger.flush(10.0)
        assert query(s.app.engine, "SELECT COUNT(*) FROM requests WHERE backend IS NULL")[0][0] == 3
        counted = None
        for _ in range(50):
            counted = query(s.app.engine, "SELECT SUM(requests) FROM usage_hourly WHERE backend = ''")[0][0]
            if counted == 3:
                break
            s.app.meter.run_soon()  # type: ignore[union-attr]
            await asyncio.sleep(0.1)
        assert counted == 3
        await asyncio.sleep(0.5)  # later passes rescan them: still counted once
        assert query(s.app.engine, "SELECT SUM(requests) FROM usage_hourly WHERE backend = ''")[0][0] == 3
        assert query(s.app.engine, "SELECT SUM(prefill_mj + decode_mj) FROM request_energy")[0][0] == 0
        check_books(s.app.engine)
