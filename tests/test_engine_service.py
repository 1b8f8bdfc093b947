"""The meter service's assembly: config -> engine settings, this node's backends, sources; the service's loop over a
real simulator and a real database (SQLite), stopped cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from app.commands.meter import meter_journal_path
from app.config import ConfigError, load_config
from app.metering import local_backends
from meter.config import engine_settings
from meter.engine import MeteredBackend
from meter.ledger import Ledger
from meter.samples import Sample
from meter.service import BackendSpec, MeterService, meter_backends
from meter.sources.sim import SimSource
from meter.store import make_engine, upgrade
from sim.config import SimConfig
from sim.server import SimTGI
from tests.test_ledger import journal_records
from tests.waiting import wait_until, wait_until_async

MS = 1_000_000


def _config(**meter: object):  # type: ignore[no-untyped-def]
    models = [
        {
            "model_id": "m",
            "backends": [
                {"url": "http://10.0.0.1:3000", "gpus": [0, 1], "node": "n1"},
                {"url": "http://10.0.0.2:3000", "gpus": [2], "prefill_chunk_tokens": 8192},
                {"url": "http://10.0.0.3:3000", "node": "n2"},
            ],
        }
    ]
    return load_config(environ={}, overrides={"meter": meter, "models": models})


def test_engine_settings_follow_the_meter_section() -> None:
    cfg = _config(epoch_s=2.5, settle_s=1, lag_ms=150, idle_power_w=85, prefill_power_ratio=3, calibrate=False)
    s = engine_settings(cfg.meter)
    assert (s.epoch_ns, s.settle_ns, s.lag_ns) == (2_500 * MS, 1_000 * MS, 150 * MS)
    assert (s.idle_power, s.prefill_power_ratio, s.calibrate) == (85.0, 3.0, False)
    assert s.sample_retention_ns == 7 * 86_400 * 1_000_000_000
    assert engine_settings(_config(idle_power_w="time").meter).idle_power == "time"
    with pytest.raises(ConfigError, match=r"meter\.epoch_s"):
        _config(epoch_s=0)
    assert meter_journal_path(_config(journal_path="/var/lib/jg/journal.jsonl")).name == "journal.meter.jsonl"


def test_a_node_meters_its_own_backends_and_those_of_no_node() -> None:
    assert [b.name for b in local_backends(_config(node="n1"))] == ["10.0.0.1:3000", "10.0.0.2:3000"]
    assert [b.name for b in local_backends(_config(node="n2"))] == ["10.0.0.2:3000", "10.0.0.3:3000"]
    assert local_backends(_config(node="n1"))[0].gpus == (0, 1)
    # a backend's engine prefill chunk reaches what its meter attributes with
    specs = local_backends(_config(node="n1"))
    assert [b.prefill_chunk_tokens for b in specs] == [None, 8192]


def test_nvml_backends_must_name_their_gpus_when_several_share_a_node() -> None:
    specs = [BackendSpec("a", "http://a:1"), BackendSpec("b", "http://b:1", (1,))]
    with pytest.raises(ValueError, match=r"backends \['a'\] list no gpus"):
        meter_backends("nvml", specs)
    with pytest.raises(ValueError, match="no backends"):
        meter_backends("sim", [])


async def test_service_samples_attributes_and_stops(tmp_path: Path) -> None:
    async with SimTGI(SimConfig(time_scale=0.05)) as sim:
        url = f"sqlite:///{tmp_path / 'db.sqlite'}"
        upgrade(url)
        db = make_engine(url)
        ledger = Ledger(db, tmp_path / "journal.jsonl", flush_interval_s=0.05)
        ledger.start()
        source, backends = meter_backends("sim", [BackendSpec("b1", sim.url)])
        assert isinstance(source, SimSource) and backends() == [MeteredBackend("b1", (sim.device,))]
        chunked = meter_backends("sim", [BackendSpec("b1", sim.url, (), 4096)])[1]()
        assert chunked == [MeteredBackend("b1", (sim.device,), 4096)]
        cfg = _config(epoch_s=0.5, settle_s=0.1, engine_interval_s=0.1, lag_ms=0)
        service = MeterService(db, ledger, source, backends, engine_settings(cfg.meter), engine_interval_s=0.1)
        service.start()
        try:
            # the service runs on its own threads
            await wait_until_async(lambda: service.engine.stats.epochs_attributed >= 2, 10.0, poll_s=0.05)
            stats = service.stats
            assert stats.running and stats.engine.epochs_attributed >= 2 and stats.engine_failures == 0
            assert stats.sampler.reads > 5 and stats.backends == {"b1": (sim.device,)}
            assert service.power_w("b1") == pytest.approx(80.0, rel=0.2)  # the simulator idles at 80 W
            assert service.power_w("nope") is None
        finally:
            service.stop()
            ledger.close()
        assert not service.running and not service.sampler.running
        with db.connect() as conn:
            epochs = conn.exec_driver_sql("SELECT counter_mj, idle_mj FROM backend_epochs").fetchall()
        assert epochs and all(c == i > 0 for c, i in epochs)  # no requests: all of it idle
        db.dispose()


class _BehindSource:
    """One GPU whose reads are stamped just behind what an earlier process journaled (a clock stepped back)."""

    devices = ("gpu0",)

    def __init__(self, t_ns: int) -> None:
        self.t_ns = t_ns

    def read(self) -> list[Sample]:
        return [Sample("gpu0", self.t_ns, 9)]

    def close(self) -> None:
        pass


def test_a_restarted_meter_stamps_after_what_its_predecessor_only_journaled(tmp_path: Path, unused_port: int) -> None:
    """The predecessor died with samples in its journal only (the database was away); the database is still away
    when the successor reads first: its samples go after the journaled ones (the seed read only the database, which
    failed, and left the sampler unseeded: the replay would have interleaved the two)."""
    url = f"postgresql://postgres@127.0.0.1:{unused_port}/nowhere"  # nothing listens
    journal = tmp_path / "journal.jsonl"
    t_ns = 1_700_000_000_000_000_000
    with Ledger(url, journal, flush_interval_s=0.02, retry_initial_s=0.02, retry_max_s=0.2) as first:
        first.add_samples([Sample("gpu0", t_ns, 8)])
        assert first.flush(10)
    db = make_engine(url)
    ledger = Ledger(db, journal, flush_interval_s=0.02, retry_initial_s=0.02, retry_max_s=0.2)
    ledger.start()
    backends = [MeteredBackend("b1", ("gpu0",))]
    service = MeterService(db, ledger, _BehindSource(t_ns - 1000), lambda: backends, engine_interval_s=0.1)
    with structlog.testing.capture_logs() as logs:
        service.start()
        try:
            wait_until(lambda: service.sampler.stats.reads >= 2, 10, what="two reads")
        finally:
            service.stop()
            ledger.close()
            db.dispose()
    stamps = [r["t_ns"] for r in journal_records(journal) if r.get("k") == "m" and r.get("energy_mj") == 9]
    assert stamps and stamps[0] == t_ns + 1 and all(t > t_ns for t in stamps)
    assert any(e["event"] == "meter_seeded_from_journal_only" for e in logs)
