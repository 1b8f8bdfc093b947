"""A PostgreSQL outage under traffic, with the in-process meter: the gateway serves on, and afterwards no timeline is
lost or doubled and the energy still adds up exactly. The outage is a real TCP cut between gateway and database."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy.engine import make_url

from meter.store.keys import create_key
from sim.config import SimConfig
from tests.tcp_cut import TcpCut
from tests.waiting import wait_until_async

from .harness import running_stack
from .metering_support import check_books, failed_reads, query, run_traffic, wait_attributed

METER = {"source": "sim", "epoch_s": 1.0, "settle_s": 0.5, "engine_interval_s": 0.2, "lag_ms": 50}


def through(cut: TcpCut, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=cut.port).render_as_string(hide_password=False)


async def test_database_outage_under_traffic_loses_and_doubles_nothing(tmp_path: Path, pg_url: str) -> None:
    parsed = make_url(pg_url)
    with TcpCut(parsed.host or "127.0.0.1", parsed.port or 5432) as cut:
        async with running_stack(
            tmp_path,
            sims=2,
            sim_config=SimConfig(time_scale=0.2),
            db_url=through(cut, pg_url),
            overrides={"meter": METER, "auth": {"cache_ttl_s": 600}},
        ) as s:
            key_b = create_key(s.app.engine, "tenant-b").key
            traffic = asyncio.create_task(run_traffic(s.channel, [s.key, key_b], seconds=6.0, gap_s=0.1))
            await asyncio.sleep(1.5)
            cut.cut()
            await asyncio.sleep(2.5)
            assert not s.app.ledger.stats.db_available  # the outage really hit the ledger
            cut.restore()
            done = await traffic
            assert done.failures == 0 and done.calls > 30, done  # the gateway kept serving through it
            await wait_until_async(lambda: not s.app.ledger.stats.journal_pending, 20.0, what="the journal replayed")
            assert s.app.ledger.stats.replayed > 0
            await wait_attributed(s.app.engine, 20.0)

            db = s.app.engine
            ids = done.request_ids or []
            stored = [r[0] for r in query(db, "SELECT request_id FROM requests WHERE backend IS NOT NULL")]
            assert sorted(stored) == sorted(ids) and len(set(ids)) == len(ids)  # none lost, none doubled
            assert query(db, "SELECT COUNT(*) FROM requests WHERE done_ns IS NULL")[0][0] == 0
            with_energy = query(
                db, "SELECT request_id FROM request_energy GROUP BY request_id HAVING SUM(prefill_mj + decode_mj) > 0"
            )
            # The samples taken during the outage were journaled and replayed: the counters have no gap (unless a read
            # itself failed, see failed_reads), so every request has energy.
            if not failed_reads(db):
                assert query(db, "SELECT SUM(gaps) FROM backend_epochs")[0][0] == 0
                assert len(with_energy) == len(ids), set(ids) - {r[0] for r in with_energy}
            check_books(db)
            assert query(db, "SELECT SUM(requests) FROM usage_hourly")[0][0] == len(ids)
