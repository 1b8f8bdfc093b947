"""A whole stack on loopback for integration tests: simulated TGI(s) + a GatewayApp + gRPC stubs."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from app.config import load_config
from app.server import GatewayApp
from meter.store.keys import create_key
from meter.store.migrate import ensure_schema
from proxy.pb.fmaas import generation_pb2_grpc
from sim.config import SimConfig
from sim.server import SimTGI


@dataclass
class Stack:
    app: GatewayApp
    sims: list[SimTGI]
    channel: grpc.aio.Channel
    key: str
    admin_key: str
    db_url: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stub(self) -> generation_pb2_grpc.GenerationServiceStub:
        return generation_pb2_grpc.GenerationServiceStub(self.channel)

    @property
    def http_url(self) -> str:
        """The HTTP front door (``running_stack(..., http=True)``)."""
        assert self.app.http_port, "started without http=True"
        return f"http://127.0.0.1:{self.app.http_port}"

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@contextlib.asynccontextmanager
async def running_stack(
    tmp_path: Path,
    *,
    sims: int = 1,
    sim_config: SimConfig | None = None,
    overrides: dict[str, Any] | None = None,
    model_id: str = "sim-model",
    model: dict[str, Any] | None = None,
    db_url: str | None = None,
    http: bool = False,
    backend_urls: list[str] | None = None,
) -> AsyncIterator[Stack]:
    """``backend_urls``: backends already running elsewhere (a simulator in a process of its own); no in-process
    simulator is started then."""
    sim_config = sim_config or SimConfig(time_scale=0.05)
    servers = [] if backend_urls else [SimTGI(sim_config) for _ in range(sims)]
    urls = backend_urls or [await s.start() for s in servers]
    db_url = db_url or f"sqlite:///{tmp_path / 'gateway.db'}"
    base = {
        "db": {"url": db_url},
        "server": {"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0" if http else "", "drain_grace_s": 1.0},
        # Seal at the margin even before the calibration settles: most tests send a few seconds of traffic, too
        # little to fit, and read final figures; test_metering_accuracy keeps the product's hold.
        "meter": {"journal_path": str(tmp_path / "journal.jsonl"), "uncalibrated_seal_hold_s": 0.0},
        "backend_pool": {"health_interval_s": 0.2},
        "models": [{"model_id": model_id, "backends": [{"url": u} for u in urls], **(model or {})}],
    }
    config = load_config(environ={}, overrides=_merge(base, overrides or {}))
    app = GatewayApp(config)
    ensure_schema(app.engine)
    key = create_key(app.engine, "tenant-a").key
    admin_key = create_key(app.engine, "ops", admin=True).key
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    try:
        yield Stack(app=app, sims=servers, channel=channel, key=key, admin_key=admin_key, db_url=db_url)
    finally:
        await channel.close()
        await app.stop(1.0)
        for s in servers:
            await s.stop()
