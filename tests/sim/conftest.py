"""Fixtures for the simulator's tests: a running SimTGI on loopback, an HTTP session, TGI's OpenAPI schemas."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator

from sim.config import SimConfig
from sim.server import SimTGI
from tests.openapi import SPEC, SPEC_URI, registry

# Fast but not instantaneous: a decode step is ~1 ms, a prefill ~0.5 ms.
FAST = 0.1


class TgiSchemas:
    """Validate JSON against a named schema of TGI's OpenAPI document (``$ref``s resolved within it)."""

    def __init__(self) -> None:
        self._registry = registry()
        self.spec = SPEC

    def validator(self, name: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=self._registry)

    def check(self, name: str, instance: Any) -> None:
        errors = sorted(self.validator(name).iter_errors(instance), key=str)
        assert not errors, f"{name}: " + "; ".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:5])


@pytest.fixture(scope="session")
def tgi_schemas() -> TgiSchemas:
    return TgiSchemas()


SimFactory = Callable[..., Awaitable[SimTGI]]


@pytest.fixture
async def make_sim() -> AsyncIterator[SimFactory]:
    """Start simulated TGI servers with the given config fields (stopped after the test)."""
    started: list[SimTGI] = []

    async def make(**fields: Any) -> SimTGI:
        fields.setdefault("time_scale", FAST)
        sim = SimTGI(SimConfig(**fields))
        await sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
async def sim(make_sim: SimFactory) -> SimTGI:
    return await make_sim()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sse_events(body: bytes) -> list[bytes]:
    """The data payloads of an SSE body framed as axum frames it: ``data:<payload>\\n\\n`` each."""
    assert body.endswith(b"\n\n"), body[-50:]
    events = body[:-2].split(b"\n\n")
    out = []
    for event in events:
        assert event.startswith(b"data:"), event
        assert b"\n" not in event, event
        out.append(event[len(b"data:") :])
    return out
