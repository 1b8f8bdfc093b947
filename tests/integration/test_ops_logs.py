"""What a real ``joulegate serve`` process writes to its log: JSON lines with snake_case events and fields.

- one ``request_finished`` line per request (who, which model and backend, how it ended, tokens, times);
  ``server.request_log = "errors"`` keeps only the requests that did not end OK;
- backend health as transitions: ``backend_down`` (``at_start`` for a backend down when the gateway starts),
  ``backend_up`` when it comes back, ``backend_down`` again when it goes;
- statistics as fields (``gateway_stopped`` carries the ledger's counters as a mapping, not a Python repr).

And in the source: every log event of proxy/, meter/ and sim/ is a snake_case name, not prose.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from meter.store import create_key, ensure_schema, make_engine
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.config import SimConfig
from sim.server import SimTGI
from tests.conftest import REPO_ROOT, free_port

SNAKE = re.compile(r"[a-z][a-z0-9_]*")
WAIT_S = 60.0


class LogLines:
    """The JSON lines of a process's stderr, read as they come."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self._stream = stream
        self.seen: list[dict[str, Any]] = []

    async def until(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            while True:
                raw = await self._stream.readline()
                assert raw, f"the process ended; its log: {self.seen}"
                line = json.loads(raw)  # every line is JSON
                self.seen.append(line)
                if match(line):
                    return line

    async def event(self, name: str, **fields: Any) -> dict[str, Any]:
        return await self.until(lambda e: e["event"] == name and all(e.get(k) == v for k, v in fields.items()))


@asynccontextmanager
async def gateway(tmp_path: Path, backend_url: str, **env: str) -> AsyncIterator[tuple[LogLines, str, str]]:
    """A ``joulegate serve`` process in front of ``backend_url``: its log, its gRPC target and an API key."""
    db_url = f"sqlite:///{tmp_path / 'jg.db'}"
    engine = make_engine(db_url)
    ensure_schema(engine)
    key = create_key(engine, "acme").key
    engine.dispose()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "app.cli", "serve", "--backend", backend_url, "--model-id", "m"),
        *("--grpc-listen", f"127.0.0.1:{port}", "--http-listen", "off", "--db", db_url, "--meter", "none"),
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(REPO_ROOT),
            "JOULEGATE_BACKEND_POOL__HEALTH_INTERVAL_S": "0.1",
            "JOULEGATE_METER__JOURNAL_PATH": str(tmp_path / "journal.jsonl"),
            "JOULEGATE_SERVER__DRAIN_GRACE_S": "1",
            **env,
        },
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    logs = LogLines(proc.stderr)
    try:
        yield logs, f"127.0.0.1:{port}", key
        proc.send_signal(signal.SIGTERM)
        stopped = await logs.event("gateway_stopped")
        ledger = stopped["ledger"]
        assert isinstance(ledger, dict) and ledger["written_requests"] >= 1 and ledger["buffered"] == 0
        async with asyncio.timeout(WAIT_S):
            rest = await proc.stderr.read()
            assert await proc.wait() == 0
        logs.seen += [json.loads(line) for line in rest.splitlines()]
        assert all(SNAKE.fullmatch(e["event"]) for e in logs.seen), [e["event"] for e in logs.seen]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _set_health(url: str, healthy: bool) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/sim/health", json={"healthy": healthy}) as resp:
        assert resp.status == 200


def _request(max_new_tokens: int = 5) -> pb.BatchedGenerationRequest:
    stopping = pb.StoppingCriteria(max_new_tokens=max_new_tokens, min_new_tokens=0)
    return pb.BatchedGenerationRequest(requests=[pb.GenerationRequest(text="Hello there")], params=pb.Parameters(
        stopping=stopping))  # fmt: skip


async def test_requests_and_backend_health_are_logged_as_fields(tmp_path: Path) -> None:
    sim = SimTGI(SimConfig(time_scale=0.05))
    url = await sim.start()
    backend = url.removeprefix("http://")
    try:
        await _set_health(url, False)
        async with gateway(tmp_path, url) as (logs, target, key):
            down = await logs.event("backend_down", backend=backend)
            assert down["at_start"] is True and down["level"] == "warning" and down["model"] == "m" and down["error"]
            await _set_health(url, True)
            up = await logs.event("backend_up", backend=backend)
            assert up["at_start"] is False and up["level"] == "info"

            async with grpc.aio.insecure_channel(target) as channel:
                md = (("authorization", f"Bearer {key}"), ("x-correlation-id", "order-66"))
                call = pbg.GenerationServiceStub(channel).Generate(_request(5), metadata=md)
                resp = await call
                request_id = dict(await call.initial_metadata())["x-request-id"]
            done = await logs.event("request_finished")
            assert {k: done[k] for k in ("request_id", "correlation_id", "tenant", "model", "backend", "api")} == {
                "request_id": request_id,  # one text: the call's own id
                "correlation_id": "order-66",
                "tenant": "acme",
                "model": "m",
                "backend": backend,
                "api": "grpc",
            }
            assert (done["traffic_class"], done["status"], done["level"]) == ("default", "OK", "info")
            assert done["generated_tokens"] == resp.responses[0].generated_token_count == 5
            assert done["prompt_tokens"] == resp.responses[0].input_token_count > 0
            assert 0 <= done["queue_ms"] <= done["ttft_ms"] <= done["total_ms"]

            await _set_health(url, False)
            gone = await logs.event("backend_down", backend=backend, at_start=False)
            assert gone["error"] == "/health answered 503"
            await _set_health(url, True)
            await logs.event("backend_up", backend=backend)
    finally:
        await sim.stop()


async def test_request_log_errors_keeps_only_requests_that_did_not_end_ok(tmp_path: Path) -> None:
    sim = SimTGI(SimConfig(time_scale=0.05))
    url = await sim.start()
    try:
        async with gateway(tmp_path, url, JOULEGATE_SERVER__REQUEST_LOG="errors") as (logs, target, key):
            await logs.event("gateway_started")
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pbg.GenerationServiceStub(channel)
                md = (("authorization", f"Bearer {key}"),)
                await stub.Generate(_request(3), metadata=md)
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.Generate(_request(3), metadata=(*md, ("x-traffic-class", "nope")))
            failed = await logs.event("request_finished")
            assert failed["status"] == "INVALID_ARGUMENT" and failed["backend"] is None
            assert failed["queue_ms"] is None and failed["total_ms"] >= 0
        assert [e["status"] for e in logs.seen if e["event"] == "request_finished"] == ["INVALID_ARGUMENT"]
    finally:
        await sim.stop()


# -- the source: event names ----------------------------------------------------------------------------------------

LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "msg", "fatal"}


def _log_events(path: Path) -> list[tuple[int, str]]:
    events = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LOG_METHODS):
            continue
        receiver = node.func.value
        name = receiver.attr if isinstance(receiver, ast.Attribute) else getattr(receiver, "id", "")
        if not name.lower().endswith(("log", "logger")) or not node.args:
            continue
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            events.append((node.lineno, first.value))
        else:  # an event built at run time (f-string, variable) cannot be searched for
            events.append((node.lineno, ast.unparse(first)))
    return events


def test_every_log_event_in_the_source_is_a_snake_case_name() -> None:
    files = [
        p
        for top in ("proxy", "meter", "sim")
        for p in sorted((REPO_ROOT / top).rglob("*.py"))
        if "pb" not in p.relative_to(REPO_ROOT).parts
    ]
    events = {str(p.relative_to(REPO_ROOT)): _log_events(p) for p in files}
    assert sum(len(v) for v in events.values()) > 50  # the scan finds the log calls
    bad = [(f, line, e) for f, found in events.items() for line, e in found if not SNAKE.fullmatch(e)]
    assert bad == []
