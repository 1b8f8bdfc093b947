"""``joulegate meter`` as its own process next to a gateway that runs no meter: it samples the backends of its node,
attributes their energy into the shared database, and drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from app.cli import main
from sim.config import SimConfig
from tests.conftest import REPO_ROOT
from tests.waiting import wait_until_async

from .harness import running_stack
from .metering_support import check_books, failed_reads, query, run_traffic, wait_attributed


def _config(tmp_path: Path, db_url: str, sim_url: str, *, source: str = "sim") -> Path:
    path = tmp_path / "meter.toml"
    path.write_text(
        f"""
[db]
url = "{db_url}"

[server]
log_format = "console"

[meter]
source = "{source}"
node = "gpu-node-1"
epoch_s = 1.0
settle_s = 0.5
engine_interval_s = 0.2
lag_ms = 50
journal_path = "{tmp_path / "journal.jsonl"}"

[[models]]
model_id = "sim-model"
backends = [{{ url = "{sim_url}", node = "gpu-node-1" }}, {{ url = "http://10.9.9.9:3000", node = "gpu-node-2" }}]
"""
    )
    return path


def test_refuses_without_a_source_or_a_local_backend(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'x.db'}", "http://127.0.0.1:1", source="none")
    assert main(["meter", "--config", str(config)]) == 2
    assert "no energy source" in capsys.readouterr().err
    assert main(["meter", "--config", str(config), "--source", "sim", "--node", "elsewhere"]) == 2
    assert "no backend runs on node 'elsewhere'" in capsys.readouterr().err


async def test_daemon_attributes_its_node_and_drains_on_sigterm(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=1.0), db_url=db_url) as s:
        config = _config(tmp_path, db_url, s.sims[0].url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "app.cli", "meter", "--config", str(config)),
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:

            def sampling() -> bool:  # the daemon is up once its samples arrive
                assert proc.returncode is None, "the daemon exited early"
                return query(s.app.engine, "SELECT COUNT(*) FROM samples")[0][0] > 3

            await wait_until_async(sampling, 10.0, what="the daemon's first samples", poll_s=0.1)
            traffic = await run_traffic(s.channel, [s.key], seconds=2.0, clients_per_key=2)
            assert traffic.failures == 0 and traffic.calls > 3
            assert s.app.ledger.flush(10.0)
            await wait_attributed(s.app.engine, 15.0)
        finally:
            proc.send_signal(signal.SIGTERM)
            raw, _ = await asyncio.wait_for(proc.communicate(), 20)
        out = raw.decode()
        assert proc.returncode == 0, out
        assert "meter_daemon_draining" in out and "meter_daemon_stopped" in out

        db = s.app.engine
        backend = s.sims[0].url.removeprefix("http://")
        assert [r[0] for r in query(db, "SELECT DISTINCT backend FROM backend_epochs")] == [backend]
        energy = dict(query(db, "SELECT request_id, SUM(prefill_mj + decode_mj) FROM request_energy GROUP BY 1"))
        assert sorted(energy) == sorted(traffic.request_ids or [])
        assert all(v > 0 for v in energy.values()) or failed_reads(db) > 0
        check_books(db)
        assert (tmp_path / "journal.meter.jsonl.lock").exists()  # its own journal, not the gateway's
