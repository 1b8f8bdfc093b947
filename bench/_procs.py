"""Start the simulator and the gateway as separate processes for benchmarks, and wait until they serve."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

POSTGRES_ADMIN_URL = os.environ.get("JG_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def postgres_database(admin_url: str = POSTGRES_ADMIN_URL, prefix: str = "jg_bench") -> Iterator[str]:
    """The URL of a fresh, empty database on ``admin_url``'s PostgreSQL server, dropped afterwards (with whatever
    connections a killed process left open on it)."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer")


def _wait_grpc(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            time.sleep(0.1)
    raise TimeoutError(f"gateway on {port} is not SERVING")


@contextlib.contextmanager
def sim_process(*args: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "sim-tgi", "--port", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def gateway_process(workdir: Path, backends: list[str], *, env: dict[str, str] | None = None,
                    args: tuple[str, ...] = ()) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "app.cli", "serve", "--grpc-listen", f"127.0.0.1:{port}", "--http-listen", "off"]
    for b in backends:
        cmd += ["--backend", b]
    cmd += ["--db", f"sqlite:///{workdir / 'bench.db'}", *args]
    full_env = {
        **os.environ,
        "JOULEGATE_AUTH__REQUIRED": "false",
        "JOULEGATE_METER__JOURNAL_PATH": str(workdir / "journal.jsonl"),
        "JOULEGATE_SERVER__LOG_LEVEL": "warning",
        **(env or {}),
    }
    with open(workdir / "gateway.log", "w") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_grpc(port)
            yield port, proc
        finally:
            proc.terminate()
            proc.wait(30)


def create_admin_key(db_url: str) -> str:
    """Create the schema if needed and an admin key to read every tenant's energy reports."""
    from meter.store.db import make_engine
    from meter.store.keys import create_key
    from meter.store.migrate import ensure_schema

    engine = make_engine(db_url)
    try:
        ensure_schema(engine)
        return create_key(engine, "bench", admin=True).key
    finally:
        engine.dispose()
