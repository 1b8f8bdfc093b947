"""Fixtures for the simulator's tests: a running SimTGI on loopback, an HTTP session, TGI's OpenAPI schemas."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from sim.config import SimConfig
from sim.server import SimTGI
from tests.conftest import REFERENCE_DIR

SPEC_URI = "urn:tgi-openapi"

# Fast but not instantaneous: a decode step is ~1 ms, a prefill ~0.5 ms.
FAST = 0.1


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema: the type also admits null."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable_to_json_schema(v) for k, v in node.items() if k not in ("nullable", "discriminator")}
    if node.get("nullable") is True:
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


class TgiSchemas:
    """Validate JSON against a named schema of TGI's OpenAPI document (``$ref``s resolved within it)."""

    def __init__(self) -> None:
        spec = json.loads((REFERENCE_DIR / "tgi_openapi.json").read_text())
        doc = _nullable_to_json_schema(copy.deepcopy(spec))
        self._registry = Registry().with_resource(SPEC_URI, Resource(contents=doc, specification=DRAFT202012))
        self.spec = spec

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
