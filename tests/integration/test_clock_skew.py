"""A gateway on a host whose clock runs 3 s ahead: the meter says so, naming it, and /metrics shows the spread.

The skew is real: ``joulegate serve`` runs as its own process with ``tests/clock_skew.c`` preloaded, so its
``time.time_ns()`` (and everything else that reads CLOCK_REALTIME) is 3 s ahead; the meter runs in the test's own
gateway, on the true clock, both on one PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import prometheus_client.parser
import pytest
import structlog.testing

from meter.store import make_engine
from proxy.energy_metrics import ENERGY
from tests.integration.harness import running_stack
from tests.waiting import wait_until_async

REPO_ROOT = Path(__file__).resolve().parents[2]
SKEW_NS = 3_000_000_000


def _shim(tmp_path: Path) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc builds the clock shim (it is on every machine of this project's kind)"
    out = tmp_path / "clock_skew.so"
    subprocess.run([gcc, "-shared", "-fPIC", "-O2", "-o", str(out), str(REPO_ROOT / "tests" / "clock_skew.c"), "-ldl"],
                   check=True)  # fmt: skip
    return out


async def test_a_replica_whose_clock_is_off_is_named_by_the_meter(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shim = _shim(tmp_path)
    monkeypatch.setattr(ENERGY, "refresh_s", 0.0)  # read SQL on every scrape
    async with running_stack(tmp_path, db_url=pg_url, http=True, overrides={"meter": {"source": "sim"}}) as s:
        with structlog.testing.capture_logs() as logs:
            proc = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "app.cli", "serve", "--backend", s.sims[0].url, "--meter", "none",
                 "--db", pg_url, "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LD_PRELOAD": str(shim),
                     "JG_CLOCK_SKEW_NS": str(SKEW_NS), "JOULEGATE_METER__JOURNAL_PATH": str(tmp_path / "skewed.jsonl")},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                name = f"{socket.gethostname()}:{proc.pid}"

                def said() -> list[dict] | None:
                    assert proc.returncode is None, "the skewed gateway exited"
                    found = [e for e in logs if e["event"] == "engine_writer_clock_skewed"]
                    return found or None

                found = await wait_until_async(said, 30.0, what="the meter to name the skewed replica", poll_s=0.1)
                assert [e["name"] for e in found] == [name]  # the test's own gateway (true clock) is not named
                assert found[0]["skew_ms"] == pytest.approx(SKEW_NS / 1e6, abs=20)
                engine = make_engine(pg_url)
                with engine.connect() as conn:
                    offsets = dict(conn.exec_driver_sql("SELECT name, clock_offset_ns FROM ledger_writers").all())
                engine.dispose()
                assert offsets[name] == pytest.approx(SKEW_NS, abs=20_000_000)
                assert [n for n, o in offsets.items() if o is not None and abs(o) > 20_000_000] == [name]
                async with aiohttp.ClientSession() as http, http.get(f"{s.http_url}/metrics") as r:
                    families = prometheus_client.parser.text_string_to_metric_families(await r.text())
                [spread] = [
                    f.samples[0].value for f in families if f.name == "joulegate_ledger_writers_clock_spread_seconds"
                ]
                assert spread == pytest.approx(SKEW_NS / 1e9, abs=0.02)
            finally:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
