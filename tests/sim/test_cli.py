"""``joulegate sim-tgi``: flags reach the config, it serves until SIGTERM, and it streams fast at time_scale 0."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import urllib.request

from sim import cli
from sim.config import SimConfig
from sim.throughput import SimProcess, measure


def test_every_config_knob_is_a_flag() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--port", "1234", "--time-scale", "0.5", "--max-batch-size", "8", "--no-add-bos-token", "--name", "g0"]
    )
    config = cli.config_from_args(args)
    assert (args.port, args.host) == (1234, "127.0.0.1")
    assert config == SimConfig(time_scale=0.5, max_batch_size=8, add_bos_token=False, name="g0")
    assert cli.config_from_args(parser.parse_args([])) == SimConfig()


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_serves_until_sigterm() -> None:
    with SimProcess("--max-concurrent-requests", "7", "--counter-lag-ms", "50", "--name", "gpu0") as sim:
        assert sim.proc is not None
        base = f"http://127.0.0.1:{sim.port}"
        assert _get(base + "/info")["max_concurrent_requests"] == 7
        energy = _get(base + "/sim/energy")
        assert (energy["device"], energy["lag_ms"]) == ("sim:gpu0", 50)
        request = urllib.request.Request(
            base + "/generate",
            data=json.dumps({"inputs": "cli", "parameters": {"max_new_tokens": 3}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.headers["x-generated-tokens"] == "3"
        sim.proc.send_signal(signal.SIGTERM)
        assert sim.proc.wait(timeout=10) == 0


def test_rejects_an_invalid_config() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "sim-tgi", "--max-input-tokens", "4096"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "`max_input_tokens` must be < `max_total_tokens`" in done.stdout


def test_streams_fast_when_steps_take_no_time() -> None:
    """At time_scale 0 the simulator must outrun any gateway: it streams well over 50,000 tokens per CPU second
    (measured ~200,000 with 16 streams); the bound here is loose so a busy machine does not make it flaky."""
    with SimProcess() as sim:
        assert sim.proc is not None
        result = asyncio.run(
            measure("127.0.0.1", sim.port, concurrency=16, tokens_per_request=128, duration_s=1.5, sim_pid=sim.proc.pid)
        )
    assert result.requests >= 16 and result.tokens == result.requests * 128  # every stream complete
    if result.tokens_per_cpu_s is not None:
        assert result.tokens_per_cpu_s > 50_000, result.describe()
