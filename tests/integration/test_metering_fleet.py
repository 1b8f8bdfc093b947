"""The fleet layout: a gateway replica (no meter) and a meter service meet only in PostgreSQL. The replica loses its
database for a while and journals; the meter goes on attributing without those timelines; when they arrive late, the
meter recomputes the epochs they touch, and seals nothing in them until then. Afterwards every request has its energy
once, none of it sealed into another's bill, and the books balance."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from app.metering import build_meter_service
from meter.config import MeterConfig
from meter.ledger import Ledger
from meter.store import make_engine
from meter.store.keys import create_key
from sim.config import SimConfig
from tests.tcp_cut import TcpCut
from tests.waiting import wait_until_async

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
)


@pytest.mark.slow
async def test_late_timelines_from_a_replica_are_recomputed_not_double_counted(tmp_path: Path, pg_url: str) -> None:
    parsed = make_url(pg_url)
    with TcpCut(parsed.host or "127.0.0.1", parsed.port or 5432) as cut:
        replica_url = make_url(pg_url).set(port=cut.port).render_as_string(hide_password=False)
        async with running_stack(
            tmp_path,
            sims=2,
            sim_config=SimConfig(time_scale=1.0),
            db_url=replica_url,
            overrides={"auth": {"cache_ttl_s": 600}},  # the gateway runs no meter: meter.source = none
        ) as s:
            key_b = create_key(s.app.engine, "tenant-b").key
            # The node's meter daemon, on its own connection to the database, with a ledger of its own.
            meter_cfg = MeterConfig(
                source="sim",
                epoch_s=1.0,
                settle_s=0.5,
                engine_interval_s=0.2,
                lag_ms=50,
                open_request_timeout_s=2.0,
            )  # the product's hold: nothing sealed until the meter's fit settles
            config = s.app.config.model_copy(update={"meter": meter_cfg})
            db = make_engine(pg_url)
            ledger = Ledger(db, tmp_path / "meter-journal.jsonl")
            ledger.start()
            meter = await asyncio.to_thread(build_meter_service, config, db, ledger)
            meter.start()
            try:
                # A calibrated meter first (the product's hold seals nothing before its fit settles): from then on it
                # seals as soon as the epochs allow, which is what the replica's outage must not hurry.
                keys = [s.key, key_b]
                done = await run_traffic(s.channel, keys, seconds=3.0, seed=1)
                done = await more_traffic_until_calibrated(s.channel, keys, meter.engine, done)
                assert all(meter.engine.stats.calibration.values()), meter.engine.stats
                traffic = asyncio.create_task(run_traffic(s.channel, keys, seconds=7.0, gap_s=0.15))
                await asyncio.sleep(1.5)
                cut.cut()  # the replica's database goes away; the meter's does not
                await asyncio.sleep(4.0)
                attributed_during_cut = meter.engine.stats.epochs_attributed
                cut.restore()
                during = await traffic
                done.calls += during.calls
                done.failures += during.failures
                done.request_ids = [*(done.request_ids or []), *(during.request_ids or [])]
                assert done.failures == 0
                await wait_until_async(
                    lambda: not s.app.ledger.stats.journal_pending, 20.0, what="the journal replayed"
                )
                assert s.app.ledger.stats.replayed > 0
                await wait_attributed(db, 20.0)
                for _ in range(30):  # the pass after the replay recomputes what the late rows touched
                    meter.run_soon()
                    await asyncio.sleep(0.1)
                await wait_until_async(
                    lambda: meter.engine.stats.requests_sealed == len(done.request_ids or []), 20.0, what="every seal"
                )
                stats = meter.engine.stats
            finally:
                await asyncio.to_thread(meter.stop)
                await asyncio.to_thread(ledger.close)

            assert attributed_during_cut > 2  # the meter kept going while the replica was cut off
            assert stats.epochs_recomputed > 0  # and redid the epochs its late timelines touched
            # ...before it sealed them: the replica's mark (ledger_writers) held back every seal in those epochs, so
            # no final figure kept energy that was the late requests' (booked as an adjustment, it was ~100 J here)
            assert stats.adjustment_mj == 0
            ids = done.request_ids or []
            energy = dict(query(db, "SELECT request_id, SUM(prefill_mj + decode_mj) FROM request_energy GROUP BY 1"))
            assert sorted(energy) == sorted(ids)
            assert all(v > 0 for v in energy.values()) or failed_reads(db) > 0
            check_books(db)
            assert query(db, "SELECT SUM(requests) FROM usage_hourly")[0][0] == len(ids)
            acc = accuracy(db, s.sims)
            phase = sampler_phase_ms(db, s.sims[0].device)
            racing = min(phase, 100 - phase) < 4 or failed_reads(db) > 0  # see test_metering_accuracy
            print(f"\nfleet, with late timelines: {acc} (sampler phase {phase:.1f} ms)")
            assert acc.median < (0.25 if racing else 0.05), acc
            assert all(abs(e) < (0.08 if racing else 0.05) for e in acc.tenant_errors.values()), acc
            db.dispose()
