"""The fleet benchmark's short form (``python -m bench.fleet --quick``): three ``joulegate serve`` replicas, four
simulated backends, two ``joulegate meter`` daemons, one PostgreSQL; under traffic a replica is killed -9 and
restarted, another SIGTERMed and restarted, a meter killed -9 and restarted, and every process's database connection
cut for 4 s. Afterwards: every call a client saw succeed has exactly one row, nothing is counted twice, every backend
balances to the millijoule, and no final figure read during the run moved."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.fleet import QUICK, run_fleet

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


async def test_a_fleet_under_faults_loses_doubles_and_moves_nothing(tmp_path: Path) -> None:
    out = await run_fleet(tmp_path, QUICK)
    print(f"\n{out.result_line()} (failed calls: {out.calls_failed}, finals read mid-run: {out.finals_checked})")
    assert out.calls_ok > 100 and out.calls_failed > 0  # traffic flowed, and the faults hit calls in flight
    assert out.finals_checked > 0  # there were final figures to watch
    assert out.rows_missing == 0
    assert out.rows_doubled == 0
    assert out.conservation_error_mj == 0, out.per_backend_mj
    assert len(out.per_backend_mj) == 4  # every backend was metered
    assert out.finals_moved == 0
    assert out.catchup_s < 60
