"""A meter restarted on a host whose clock was stepped back meanwhile: its samples go after the ones its predecessor
stored, never between them.

Both are real ``joulegate meter`` processes on one database and one simulator (whose counter follows the true clock);
the first runs with ``tests/clock_skew.c`` preloaded, its CLOCK_REALTIME 3 s ahead, and stops; the second runs on
the true clock: for it the host's clock went 3 s back. Stamped as read, its first seconds of samples would sort
between the first process's last ones, with higher counter values, and the engine (which orders a device's readings
by time and counts every rise between neighbours) would count that energy twice.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from pathlib import Path

from meter.store import make_engine
from meter.store.migrate import ensure_schema
from sim.config import SimConfig
from sim.server import SimTGI
from tests.conftest import REPO_ROOT
from tests.waiting import wait_until_async

from .metering_support import query
from .test_clock_skew import _shim
from .test_metering_daemon import _config

STEP_NS = 3_000_000_000  # more than a meter takes to start (~1-2 s here), so the restart lands behind


async def _run_meter(config: Path, db: object, env: dict[str, str], until_samples: int) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app.cli", "meter", "--config", str(config),
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:

        def sampled() -> bool:
            assert proc.returncode is None, "the meter exited early"
            return query(db, "SELECT COUNT(*) FROM samples WHERE energy_mj IS NOT NULL")[0][0] >= until_samples

        await wait_until_async(sampled, 30.0, what=f"{until_samples} samples", poll_s=0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        raw, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, raw.decode()
    return raw.decode()


async def test_a_meter_restarted_after_a_clock_step_back_stores_samples_in_read_order(tmp_path: Path) -> None:
    shim = _shim(tmp_path)
    sim = SimTGI(SimConfig(time_scale=1.0))
    url = await sim.start()
    db_url = f"sqlite:///{tmp_path / 'meter.db'}"
    config = _config(tmp_path, db_url, url)
    db = make_engine(db_url)
    ensure_schema(db)
    try:
        await _run_meter(config, db, {"LD_PRELOAD": str(shim), "JG_CLOCK_SKEW_NS": str(STEP_NS)}, until_samples=8)
        before = query(db, "SELECT MAX(t_ns) FROM samples")[0][0]
        out = await _run_meter(config, db, {}, until_samples=50)  # 40+ good reads: over 4 s, past the step
    finally:
        db.dispose()
        await sim.stop()
    db = make_engine(db_url)
    rows = query(db, "SELECT t_ns, energy_mj FROM samples ORDER BY t_ns")
    db.dispose()
    counters = [e for _, e in rows if e is not None]
    assert all(a <= b for a, b in itertools.pairwise(counters)), "a later reading sorts before an earlier one"
    after = [t for t, _ in rows if t > before]
    # the restarted meter's first read went right after the last stored sample: restamped 1 ns after it (less than
    # a second behind), or a gap there (further behind: energy read, not known when it was spent)
    assert after[0] == before + 1
    assert "sampler_clock_stepped_back" in out
